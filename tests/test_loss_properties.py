"""Property-based tests (hypothesis) over shapes and dtypes for the feature losses and the
public input checks: each value against its numpy formula, wrong input rejected by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxkd import losses

from test_feature_losses import np_at, np_fsp, np_match

DTYPES = st.sampled_from([np.float32, np.float16, jnp.bfloat16])
# tolerance of a result computed from inputs of this dtype (they are rounded before use)
TOL = {np.float32: 1e-4, np.float16: 2e-2, jnp.bfloat16: 5e-2}

fitnets_jit = jax.jit(losses.fitnets_hint)
fsp_jit = jax.jit(losses.fsp_loss)
grad_at_jit = jax.jit(losses.gradient_attention_transfer, static_argnames=("p",))


def _arr(rng, shape, dtype):
    x = jnp.asarray(rng.normal(size=shape), dtype)
    return x, np.asarray(x.astype(jnp.float32), np.float64)  # the rounded values, for numpy


@settings(max_examples=20, deadline=None, derandomize=True)
@given(shape=st.lists(st.integers(1, 5), min_size=2, max_size=4), dtype=DTYPES, seed=st.integers(0, 999))
def test_fitnets_hint_property(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    (r, r64), (t, t64) = _arr(rng, shape, dtype), _arr(rng, shape, dtype)
    got = fitnets_jit(r, t)
    assert got.shape == (shape[0],) and got.dtype == jnp.float32
    want = ((r64 - t64) ** 2).reshape(shape[0], -1).mean(axis=1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=TOL[dtype], atol=TOL[dtype])
    np.testing.assert_array_equal(np.asarray(fitnets_jit(r, r)), 0.0)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(b=st.integers(1, 3), hw=st.lists(st.sampled_from([1, 2, 4]), min_size=3, max_size=3),
       chans=st.lists(st.integers(1, 4), min_size=3, max_size=3), t_scale=st.sampled_from([1, 2]),
       dtype=DTYPES, seed=st.integers(0, 999))
def test_fsp_loss_property(b, hw, chans, t_scale, dtype, seed):
    """Three maps per network (two FSP pairs); the teacher's maps may be larger (pooled)."""
    rng = np.random.default_rng(seed)
    s = [_arr(rng, (b, h, h, c), dtype) for h, c in zip(hw, chans)]
    t = [_arr(rng, (b, h * t_scale, h * t_scale, c), dtype) for h, c in zip(hw, chans)]
    got = fsp_jit([x for x, _ in s], [x for x, _ in t])
    assert got.shape == (b,) and bool(jnp.all(got >= 0))
    want = sum(((np_fsp(s[j][1], s[j + 1][1]) - np_fsp(t[j][1], t[j + 1][1])) ** 2).mean(axis=(1, 2))
               for j in range(2))
    np.testing.assert_allclose(np.asarray(got), want, rtol=5 * TOL[dtype], atol=5 * TOL[dtype])


@settings(max_examples=15, deadline=None, derandomize=True)
@given(b=st.integers(1, 3), h=st.integers(1, 4), c=st.integers(1, 3), factor=st.sampled_from([1, 2]),
       p=st.sampled_from([1, 2]), seed=st.integers(0, 999))
def test_gradient_attention_transfer_property(b, h, c, factor, p, seed):
    rng = np.random.default_rng(seed)
    (gs, gs64), (gt, gt64) = _arr(rng, (b, h * factor, h * factor, c), np.float32), _arr(rng, (b, h, h, 2), np.float32)
    got = grad_at_jit(gs, gt, p=p)
    a, bb = np_match(gs64, gt64)
    # the map: channel mean of |g|^p, flattened, L2-normalised (as attention_map's "code" mode, with |.|)
    ms, mt = np_at(np.abs(a), "code", p), np_at(np.abs(bb), "code", p)
    want = ((ms - mt) ** 2).sum(axis=1)
    assert got.shape == (b,) and np.all(np.asarray(got) <= 4 + 1e-5)  # unit vectors: distance^2 <= 4
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(b=st.integers(1, 5), c=st.integers(2, 9), dtype=DTYPES, seed=st.integers(0, 999))
def test_soft_cross_entropy_property(b, c, dtype, seed):
    rng = np.random.default_rng(seed)
    z, z64 = _arr(rng, (b, c), dtype)
    q = rng.dirichlet(np.ones(c), size=b)
    got = losses.soft_cross_entropy(z, jnp.asarray(q, jnp.float32))
    log_p = z64 - z64.max(1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    np.testing.assert_allclose(np.asarray(got), -(q * log_p).sum(1), rtol=TOL[dtype], atol=TOL[dtype])


@settings(max_examples=20, deadline=None, derandomize=True)
@given(rank=st.sampled_from([1, 2, 3, 5]), dtype=st.sampled_from([np.int32, np.float32, np.bool_]))
def test_feature_losses_reject_bad_rank_or_dtype_by_name(rank, dtype):
    bad = jnp.zeros((2,) * rank, dtype)
    good = jnp.zeros((2, 2, 2, 2), jnp.float32)
    if rank == 4 and dtype == np.float32:
        return
    with pytest.raises((TypeError, ValueError), match=r"student_features\[0\]"):
        losses.attention_transfer([bad], [good])
    with pytest.raises((TypeError, ValueError), match="feature_a"):
        losses.fsp_matrix(bad, good)
    with pytest.raises((TypeError, ValueError), match="student_grad"):
        losses.gradient_attention_transfer(bad, good)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(bs=st.integers(1, 4), bt=st.integers(1, 4))
def test_mismatched_batch_sizes_are_named(bs, bt):
    if bs == bt:
        return
    s, t = jnp.zeros((bs, 2, 2, 3)), jnp.zeros((bt, 2, 2, 3))
    with pytest.raises(ValueError, match="same batch size"):
        losses.attention_transfer([s], [t])
    with pytest.raises(ValueError, match="same batch size"):
        losses.fsp_loss([s, s], [t, t])
    with pytest.raises(ValueError, match="same shape"):
        losses.fitnets_hint(s, t)
    with pytest.raises(ValueError, match="same shape"):
        losses.hinton_kd(jnp.zeros((bs, 5)), jnp.zeros((bt, 5)))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(c=st.integers(2, 6), bad=st.sampled_from([-1, 0, 1]))
def test_labels_out_of_range_are_rejected_outside_jit(c, bad):
    """A label outside [0, C) would one-hot to zeros and give CE 0: refuse it (concrete inputs)."""
    label = c if bad == 1 else (-1 if bad == -1 else c - 1)
    y = jnp.asarray([0, label], jnp.int32)
    if bad == 0:
        assert bool(jnp.all(jnp.isfinite(losses.cross_entropy(jnp.zeros((2, c)), y))))
        return
    with pytest.raises(ValueError, match=rf"labels must be class indices in \[0, {c}\)"):
        losses.cross_entropy(jnp.zeros((2, c)), y)


def test_loop_rejects_labels_outside_num_classes():
    from jaxkd.train.loop import TrainingError, _check_labels

    _check_labels(np.array([0, 9]), 10, "digits")
    with pytest.raises(TrainingError, match=r"label\(s\) outside \[0, 10\) \(min 0, max 10\)"):
        _check_labels(np.array([0, 10]), 10, "digits")
