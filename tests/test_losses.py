"""Hinton KD and cross-entropy against formulas written out in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import losses


def _np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _np_softmax(z):
    return np.exp(_np_log_softmax(z))


def _np_hinton(s, t, T, mode):
    p_t = _np_softmax(t / T)
    log_p_s = _np_log_softmax(s / T)
    if mode == "soft_ce":
        v = -(p_t * log_p_s).sum(-1)
    else:
        v = (p_t * (np.log(p_t) - log_p_s)).sum(-1)
        if mode == "legacy_mean":
            v = v / s.shape[-1]
    return v * T * T


@pytest.mark.parametrize("mode", ["kl", "soft_ce", "legacy_mean"])
@pytest.mark.parametrize("T", [1.0, 4.0, 20.0])
def test_hinton_kd_matches_numpy(mode, T):
    rng = np.random.default_rng(0)
    s = rng.normal(size=(16, 10)).astype(np.float64) * 3
    t = rng.normal(size=(16, 10)).astype(np.float64) * 3
    got = np.asarray(losses.hinton_kd(jnp.float32(s), jnp.float32(t), temperature=T, mode=mode))
    assert got.shape == (16,)
    np.testing.assert_allclose(got, _np_hinton(s, t, T, mode), rtol=2e-5, atol=1e-6)


def test_legacy_mean_equals_elementwise_mean_of_kl_terms():
    # peterliht's KLDivLoss(): mean over all B*C elements of p_t*(log p_t - log p_s), times T^2.
    rng = np.random.default_rng(1)
    s, t, T = rng.normal(size=(8, 5)), rng.normal(size=(8, 5)), 6.0
    p_t = _np_softmax(t / T)
    elementwise = p_t * (np.log(p_t) - _np_log_softmax(s / T))
    expected = elementwise.mean() * T * T
    got = float(jnp.mean(losses.hinton_kd(jnp.float32(s), jnp.float32(t), T, mode="legacy_mean")))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("mode", ["kl", "soft_ce"])
def test_hinton_kd_gradient(mode):
    rng = np.random.default_rng(2)
    B, C, T = 12, 7, 4.0
    s, t = rng.normal(size=(B, C)).astype(np.float32), rng.normal(size=(B, C)).astype(np.float32)
    g = jax.grad(lambda s_: jnp.mean(losses.hinton_kd(s_, jnp.asarray(t), T, mode=mode)))(jnp.asarray(s))
    expected = T * (_np_softmax(s / T) - _np_softmax(t / T)) / B
    np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-4, atol=1e-6)


def test_teacher_gets_no_gradient():
    s, t = jnp.ones((2, 3)), jnp.arange(6.0).reshape(2, 3)
    g = jax.grad(lambda t_: jnp.sum(losses.hinton_kd(s, t_)))(t)
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(9, 4)).astype(np.float32)
    y = rng.integers(0, 4, size=9)
    got = np.asarray(losses.cross_entropy(jnp.asarray(z), jnp.asarray(y)))
    expected = -_np_log_softmax(z.astype(np.float64))[np.arange(9), y]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    eps = 0.1
    q = np.full((9, 4), eps / 4)
    q[np.arange(9), y] += 1 - eps
    got_ls = np.asarray(losses.cross_entropy(jnp.asarray(z), jnp.asarray(y), label_smoothing=eps))
    np.testing.assert_allclose(got_ls, -(q * _np_log_softmax(z.astype(np.float64))).sum(-1), rtol=1e-5)


def test_clear_errors():
    with pytest.raises(ValueError, match="same shape"):
        losses.hinton_kd(jnp.ones((4, 10)), jnp.ones((4, 100)))
    with pytest.raises(ValueError, match="student_logits must be an array of logits with a class axis"):
        losses.hinton_kd(jnp.ones(()), jnp.ones(()))
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        losses.cross_entropy(jnp.ones((4, 3)), jnp.ones((4,), jnp.int32), axis=2)
    with pytest.raises(ValueError, match="unknown hinton_kd mode"):
        losses.hinton_kd(jnp.ones((4, 3)), jnp.ones((4, 3)), mode="batchmean")
    with pytest.raises(ValueError, match="temperature"):
        losses.hinton_kd(jnp.ones((4, 3)), jnp.ones((4, 3)), temperature=0.0)
    with pytest.raises(TypeError, match="integer"):
        losses.cross_entropy(jnp.ones((4, 3)), jnp.ones((4,)))
    with pytest.raises(ValueError, match="labels must have shape"):
        losses.cross_entropy(jnp.ones((4, 3)), jnp.ones((5,), jnp.int32))


from hypothesis import given, settings, strategies as st  # noqa: E402

_dtypes = st.sampled_from([np.float32, np.float16, jnp.bfloat16])


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 6), c=st.integers(2, 12), T=st.floats(0.5, 20.0), shift=st.floats(-50, 50),
       dtype=_dtypes, mode=st.sampled_from(["kl", "soft_ce", "legacy_mean"]), seed=st.integers(0, 2**16))
def test_hinton_kd_properties(b, c, T, shift, dtype, mode, seed):
    rng = np.random.default_rng(seed)
    s = jnp.asarray(rng.normal(size=(b, c)) * 3, dtype)
    t = jnp.asarray(rng.normal(size=(b, c)) * 3, dtype)
    v = losses.hinton_kd(s, t, T, mode)
    assert v.shape == (b,) and v.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(v)))
    if mode != "soft_ce":
        assert bool(jnp.all(v >= -1e-4))  # KL is non-negative
        np.testing.assert_allclose(np.asarray(losses.hinton_kd(t, t, T, mode)), 0.0, atol=1e-5)
    # softmax is shift-invariant per row: adding a constant to the student logits changes nothing
    shifted = losses.hinton_kd((s.astype(jnp.float32) + shift), t, T, mode)
    np.testing.assert_allclose(np.asarray(shifted), np.asarray(losses.hinton_kd(s.astype(jnp.float32), t, T, mode)),
                               rtol=1e-3, atol=1e-3)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 6), c=st.integers(2, 12), dtype=_dtypes, seed=st.integers(0, 2**16))
def test_cross_entropy_properties(b, c, dtype, seed):
    rng = np.random.default_rng(seed)
    z = jnp.asarray(rng.normal(size=(b, c)) * 3, dtype)
    y = jnp.asarray(rng.integers(0, c, b), jnp.int32)
    v = losses.cross_entropy(z, y)
    assert v.shape == (b,) and bool(jnp.all(v >= 0)) and bool(jnp.all(jnp.isfinite(v)))
    # uniform logits give log(C)
    np.testing.assert_allclose(np.asarray(losses.cross_entropy(jnp.zeros((b, c), dtype), y)), np.log(c), rtol=1e-2)


@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), axis_pick=st.integers(0, 3))
@settings(max_examples=15, deadline=None)
def test_any_rank_with_a_class_axis_gives_the_shape_without_it(shape, axis_pick):
    """The optax convention: logits ``[..., C]`` (classes on ``axis``) give one value per
    remaining position."""
    axis = axis_pick % len(shape)
    rng = np.random.default_rng(len(shape) + axis)
    s, t = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(2))
    rest = tuple(d for i, d in enumerate(shape) if i != axis)
    assert losses.hinton_kd(s, t, 2.0, axis=axis).shape == rest
    assert losses.soft_cross_entropy(s, jax.nn.softmax(t, axis=axis), axis=axis).shape == rest
    labels = jnp.asarray(rng.integers(0, shape[axis], rest), jnp.int32)
    assert losses.cross_entropy(s, labels, axis=axis).shape == rest


def test_logit_losses_equal_optax_on_the_same_inputs():
    """[B, L, C] per-token logits, classes last and (transposed) on axis 1, against optax's own."""
    import optax

    rng = np.random.default_rng(3)
    s = jnp.asarray(rng.normal(size=(4, 5, 7)) * 2, jnp.float32)
    t = jnp.asarray(rng.normal(size=(4, 5, 7)) * 3, jnp.float32)
    y = jnp.asarray(rng.integers(0, 7, (4, 5)), jnp.int32)
    p_t = jax.nn.softmax(t)
    np.testing.assert_allclose(losses.cross_entropy(s, y), optax.softmax_cross_entropy_with_integer_labels(s, y),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(losses.cross_entropy(jnp.moveaxis(s, -1, 1), y, axis=1),
                               optax.softmax_cross_entropy_with_integer_labels(s, y), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(losses.cross_entropy(s, y, label_smoothing=0.1),
                               optax.softmax_cross_entropy(s, optax.smooth_labels(jax.nn.one_hot(y, 7), 0.1)),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(losses.soft_cross_entropy(s, p_t), optax.softmax_cross_entropy(s, p_t),
                               rtol=1e-6, atol=1e-6)
    for T in (1.0, 4.0):
        want = T ** 2 * optax.losses.kl_divergence(jax.nn.log_softmax(s / T), jax.nn.softmax(t / T))
        np.testing.assert_allclose(losses.hinton_kd(s, t, T), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(losses.hinton_kd(jnp.moveaxis(s, -1, 0), jnp.moveaxis(t, -1, 0), T, axis=0),
                                   want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(losses.hinton_kd(s, t, T, "soft_ce"),
                                   T ** 2 * optax.softmax_cross_entropy(s / T, jax.nn.softmax(t / T)),
                                   rtol=1e-5, atol=1e-6)
