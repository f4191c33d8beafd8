"""Feature losses (FitNets, AT, gradient AT, FSP) and the FitNets regressor.

Each loss is checked against its formula written out independently in float64 numpy, on
hand-computed tiny maps, for gradients, for error messages, with hypothesis over small shapes,
and for 1-device vs 8-device data-sharded equality of the batch mean.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxkd import losses
from jaxkd.models.regressor import HintRegressor, make_hint_regressor, regressor_kind

RTOL, ATOL = 2e-5, 1e-6

# Jitted entry points: one compile per shape instead of one per primitive (keeps the file fast).
at_jit = jax.jit(losses.attention_transfer, static_argnames=("mode", "p", "beta"))
fsp_jit = jax.jit(losses.fsp_loss)


# ----------------------------------------------------------------------------- numpy references

def np_pool(x, h, w):
    """Average-pool NHWC x to (h, w) with explicit loops over non-overlapping windows."""
    b, xh, xw, c = x.shape
    kh, kw = xh // h, xw // w
    out = np.zeros((b, h, w, c))
    for i in range(h):
        for j in range(w):
            out[:, i, j, :] = x[:, i * kh:(i + 1) * kh, j * kw:(j + 1) * kw, :].mean(axis=(1, 2))
    return out


def np_match(a, b):
    h, w = min(a.shape[1], b.shape[1]), min(a.shape[2], b.shape[2])
    return np_pool(a, h, w), np_pool(b, h, w)


def np_at(f, mode, p):
    f = np.asarray(f, np.float64)
    q = (f ** p).mean(axis=3) if mode == "code" else (np.abs(f) ** p).sum(axis=3)
    q = q.reshape(q.shape[0], -1)
    norm = np.sqrt((q ** 2).sum(axis=1, keepdims=True))
    return q / np.maximum(norm, 1e-12)


def np_at_reference_scalar(fs_list, ft_list, mode, p, beta):
    """The reference's scalar loss (batch-level): code mode written like the PyTorch code; paper
    mode as the paper states it, sum_j beta_j / 2 * sum_b ||d_b||_2 with
    beta_j = beta / (B * H_j * W_j) ("10^3 divided by number of elements in attention map and
    batch size for each layer"); "paper_unscaled" as jaxkd had it, beta / 2 * mean_b ||d_b||."""
    total = 0.0
    for fs, ft in zip(fs_list, ft_list):
        fs, ft = np_match(np.asarray(fs, np.float64), np.asarray(ft, np.float64))
        d = np_at(fs, mode, p) - np_at(ft, mode, p)
        batch, hw = d.shape
        if mode == "code":
            total += beta * (d ** 2).mean()  # mean over B * H * W
        elif mode == "paper":
            total += beta / (batch * hw) / 2 * np.sqrt((d ** 2).sum(axis=1)).sum()
        else:
            total += beta / 2 * np.sqrt((d ** 2).sum(axis=1)).mean()
    return total


def np_at_per_example(fs_list, ft_list, mode, p, beta):
    out = 0.0
    for fs, ft in zip(fs_list, ft_list):
        fs, ft = np_match(np.asarray(fs, np.float64), np.asarray(ft, np.float64))
        d = np_at(fs, mode, p) - np_at(ft, mode, p)
        if mode == "code":
            out = out + beta * (d ** 2).mean(axis=1)
        else:
            out = out + beta / 2 * np.sqrt((d ** 2).sum(axis=1)) / (d.shape[1] if mode == "paper" else 1)
    return out


def np_fsp(a, b):
    a, b = np_match(np.asarray(a, np.float64), np.asarray(b, np.float64))
    bsz, h, w, ca = a.shape
    cb = b.shape[3]
    g = np.zeros((bsz, ca, cb))
    for n in range(bsz):
        for i in range(h):
            for j in range(w):
                g[n] += np.outer(a[n, i, j], b[n, i, j])
    return g / (h * w)


def np_fsp_reference_scalar(fs_list, ft_list):
    total = 0.0
    for j in range(len(fs_list) - 1):
        total += ((np_fsp(fs_list[j], fs_list[j + 1]) - np_fsp(ft_list[j], ft_list[j + 1])) ** 2).mean()
    return total


def _rand(rng, *shape):
    return rng.normal(size=shape).astype(np.float32)


def _j(xs):
    return [jnp.asarray(x) for x in xs]


# ----------------------------------------------------------------------------- FitNets

@pytest.mark.parametrize("shape", [(4, 8, 8, 16), (3, 5, 7, 2), (6, 10)])
def test_fitnets_matches_numpy(shape):
    rng = np.random.default_rng(0)
    r, t = _rand(rng, *shape), _rand(rng, *shape)
    got = np.asarray(losses.fitnets_hint(jnp.asarray(r), jnp.asarray(t)))
    assert got.shape == (shape[0],)
    d = r.astype(np.float64) - t
    np.testing.assert_allclose(got, (d ** 2).reshape(shape[0], -1).mean(1), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got.mean(), (d ** 2).mean(), rtol=RTOL)  # MSELoss() (mean)


def test_fitnets_gradient():
    rng = np.random.default_rng(1)
    r, t = _rand(rng, 3, 4, 4, 5), _rand(rng, 3, 4, 4, 5)
    g = jax.grad(lambda r_: jnp.mean(losses.fitnets_hint(r_, jnp.asarray(t))))(jnp.asarray(r))
    np.testing.assert_allclose(np.asarray(g), 2 * (r - t) / r.size, rtol=1e-5, atol=1e-7)
    g_t = jax.grad(lambda t_: jnp.mean(losses.fitnets_hint(jnp.asarray(r), t_)))(jnp.asarray(t))
    assert not np.any(np.asarray(g_t))  # teacher is not differentiated


def test_fitnets_errors():
    x = jnp.zeros((2, 4, 4, 3))
    with pytest.raises(ValueError, match=r"student_regressed and teacher_feature.*\(2, 4, 4, 3\).*\(2, 4, 4, 5\)"):
        losses.fitnets_hint(x, jnp.zeros((2, 4, 4, 5)))
    with pytest.raises(ValueError, match="student_regressed must have rank >= 2"):
        losses.fitnets_hint(jnp.zeros((4,)), jnp.zeros((4,)))
    with pytest.raises(TypeError, match="teacher_feature must be a floating-point"):
        losses.fitnets_hint(x, jnp.zeros((2, 4, 4, 3), jnp.int32))


# ----------------------------------------------------------------------------- attention transfer

AT_SHAPES = [
    # (student shapes, teacher shapes): same sizes; pooling both ways; different channel counts.
    ([(4, 8, 8, 3)], [(4, 8, 8, 3)]),
    ([(3, 8, 8, 4), (3, 4, 4, 6), (3, 2, 2, 8)], [(3, 4, 4, 16), (3, 4, 4, 32), (3, 4, 4, 2)]),
    ([(2, 6, 4, 5)], [(2, 3, 2, 7)]),
    ([(5, 4, 4, 1), (5, 2, 2, 2)], [(5, 8, 8, 3), (5, 2, 2, 9)]),
]


@pytest.mark.parametrize("mode", ["code", "paper", "paper_unscaled"])
@pytest.mark.parametrize("shapes", AT_SHAPES)
def test_attention_transfer_matches_numpy(mode, shapes):
    rng = np.random.default_rng([AT_SHAPES.index(shapes), mode == "code"])
    fs = [_rand(rng, *s) for s in shapes[0]]
    ft = [_rand(rng, *s) for s in shapes[1]]
    for p, beta in ((2, None), (1, 3.0), (4, 1000.0)):
        got = np.asarray(at_jit(_j(fs), _j(ft), mode=mode, p=p, beta=beta))
        beta = 1000.0 if beta is None else beta
        assert got.shape == (shapes[0][0][0],)
        np.testing.assert_allclose(got, np_at_per_example(fs, ft, mode, p, beta), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got.mean(), np_at_reference_scalar(fs, ft, mode, p, beta), rtol=1e-4)
    if shapes is AT_SHAPES[0]:  # eager (un-jitted) call agrees
        np.testing.assert_allclose(losses.attention_transfer(_j(fs), _j(ft), mode=mode),
                                   at_jit(_j(fs), _j(ft), mode=mode), rtol=1e-6)


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_attention_map_matches_numpy(mode):
    rng = np.random.default_rng(3)
    f = _rand(rng, 3, 5, 4, 6)
    for p in (1, 2, 3):
        got = np.asarray(losses.attention_map(jnp.asarray(f), mode=mode, p=p))
        assert got.shape == (3, 20)
        np.testing.assert_allclose(got, np_at(f, mode, p), rtol=1e-5, atol=1e-6)
    # even p: channel mean and channel sum give the same normalised map
    np.testing.assert_allclose(losses.attention_map(jnp.asarray(f), "code", 2),
                               losses.attention_map(jnp.asarray(f), "paper", 2), rtol=1e-5, atol=1e-7)


def test_attention_map_zero_feature_uses_eps():
    got = losses.attention_map(jnp.zeros((2, 2, 2, 3)))
    assert np.all(np.asarray(got) == 0)
    g = jax.jit(jax.grad(lambda f: jnp.sum(losses.attention_map(f))))(jnp.zeros((2, 2, 2, 3)))
    assert np.all(np.isfinite(np.asarray(g)))


def test_attention_transfer_hand_computed():
    s = jnp.array([[[[1.0], [0.0]], [[0.0], [0.0]]]])   # 1x2x2x1: a = [1, 0, 0, 0]
    t = jnp.array([[[[0.0], [0.0]], [[0.0], [2.0]]]])   # a = [0, 0, 0, 1]
    # code: 1000 * mean([1, 0, 0, 1]) = 500; paper: 1000/(2*2)/2 * sqrt(2) (4 map elements);
    # paper_unscaled: 1000/2 * sqrt(2)
    np.testing.assert_allclose(losses.attention_transfer([s], [t]), [500.0], rtol=1e-6)
    np.testing.assert_allclose(losses.attention_transfer([s], [t], mode="paper"),
                               [125.0 * np.sqrt(2.0)], rtol=1e-6)
    np.testing.assert_allclose(losses.attention_transfer([s], [t], mode="paper_unscaled"),
                               [500.0 * np.sqrt(2.0)], rtol=1e-6)
    s2 = jnp.ones((1, 2, 2, 1))                          # a = [.5, .5, .5, .5]
    t2 = jnp.array([[[[2.0], [0.0]], [[0.0], [0.0]]]])  # a = [1, 0, 0, 0]
    np.testing.assert_allclose(losses.attention_transfer([s2], [t2]), [250.0], rtol=1e-6)
    np.testing.assert_allclose(losses.attention_transfer([s2], [t2], mode="paper"), [125.0], rtol=1e-6)
    np.testing.assert_allclose(losses.attention_transfer([s2], [t2], mode="paper_unscaled"), [500.0], rtol=1e-6)
    # the example: one 8x8 pair at distance 1 weighs 1000/64/2 in paper mode
    a8 = np.zeros((1, 8, 8, 1), np.float32); a8[0, 0, 0, 0] = 1.0
    b8 = np.zeros((1, 8, 8, 1), np.float32); b8[0, 7, 7, 0] = 1.0
    np.testing.assert_allclose(losses.attention_transfer([jnp.asarray(a8)], [jnp.asarray(b8)], mode="paper"),
                               [1000.0 / 64 / 2 * np.sqrt(2.0)], rtol=1e-6)
    np.testing.assert_allclose(losses.attention_transfer([s2], [t2], beta=2.0), [0.5], rtol=1e-6)
    # two layer pairs are summed
    np.testing.assert_allclose(losses.attention_transfer([s, s2], [t, t2]), [750.0], rtol=1e-6)
    # channel mean: a teacher with two equal channels has the student's map -> 0
    t3 = jnp.concatenate([s, s], axis=-1)
    np.testing.assert_allclose(losses.attention_transfer([s], [t3]), [0.0], atol=1e-9)


def test_attention_transfer_pools_before_the_power():
    # Student 1x4x4x1: top-left 2x2 block [[2, 0], [0, 0]] (mean 0.5), top-right block all 1.
    s = np.zeros((1, 4, 4, 1), np.float32)
    s[0, 0, 0, 0] = 2.0
    s[0, 0:2, 2:4, 0] = 1.0
    t = np.array([1.0, 2.0, 0.0, 0.0], np.float32).reshape(1, 2, 2, 1)
    a_s = np.array([0.25, 1.0, 0, 0]) / np.sqrt(0.25 ** 2 + 1.0)   # pooled, then squared
    a_t = np.array([1.0, 4.0, 0, 0]) / np.sqrt(17.0)
    expected = 1000.0 * ((a_s - a_t) ** 2).mean()
    np.testing.assert_allclose(losses.attention_transfer([jnp.asarray(s)], [jnp.asarray(t)]),
                               [expected], rtol=1e-5)
    # the teacher may be the larger one as well
    np.testing.assert_allclose(losses.attention_transfer([jnp.asarray(t)], [jnp.asarray(s)]),
                               [expected], rtol=1e-5)


@pytest.mark.parametrize("mode", ["code", "paper", "paper_unscaled"])
def test_attention_transfer_gradient(mode):
    rng = np.random.default_rng(4)
    fs = _j([_rand(rng, 2, 4, 4, 3), _rand(rng, 2, 2, 2, 4)])
    ft = _j([_rand(rng, 2, 8, 8, 5), _rand(rng, 2, 2, 2, 6)])
    loss = jax.jit(lambda xs: jnp.mean(losses.attention_transfer(xs, ft, mode=mode)))
    grads = jax.jit(jax.grad(loss))(fs)
    for g, f in zip(grads, fs):
        assert g.shape == f.shape and np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g))
    # directional derivative against a central finite difference (float32, loose tolerance)
    v = [jnp.asarray(_rand(rng, *f.shape)) for f in fs]
    eps = 1e-3
    fd = (loss([f + eps * d for f, d in zip(fs, v)]) - loss([f - eps * d for f, d in zip(fs, v)])) / (2 * eps)
    ad = sum(jnp.vdot(g, d) for g, d in zip(grads, v))
    np.testing.assert_allclose(float(ad), float(fd), rtol=2e-2, atol=1e-3)
    # identical student and teacher: finite gradient (eagerly exactly zero, also for the
    # non-squared distance, whose gradient at 0 is taken as 0)
    g0 = jax.grad(lambda x: jnp.mean(losses.attention_transfer([x], fs[1:], mode=mode)))(fs[1])
    np.testing.assert_array_equal(np.asarray(g0), 0.0)


def test_attention_transfer_errors():
    a = jnp.zeros((2, 4, 4, 3))
    with pytest.raises(ValueError, match=r"teacher_features\[0\] must be an NHWC feature map of rank 4"):
        losses.attention_transfer([a], [jnp.zeros((2, 16, 3))])
    with pytest.raises(ValueError, match="same length"):
        losses.attention_transfer([a, a], [a])
    with pytest.raises(ValueError, match="at least 1"):
        losses.attention_transfer([], [])
    with pytest.raises(ValueError, match=r"same batch size.*student_features\[1\]"):
        losses.attention_transfer([a, a], [a, jnp.zeros((3, 4, 4, 3))])
    with pytest.raises(ValueError, match=r"cannot average-pool teacher_features\[0\] of spatial size 6x6 to 4x4"):
        losses.attention_transfer([a], [jnp.zeros((2, 6, 6, 3))])
    with pytest.raises(ValueError, match="unknown attention_transfer mode 'l2'"):
        losses.attention_transfer([a], [a], mode="l2")
    with pytest.raises(TypeError, match=r"student_features\[0\] must be a floating-point"):
        losses.attention_transfer([jnp.zeros((2, 4, 4, 3), jnp.int32)], [a])
    with pytest.raises(TypeError, match="must be a sequence"):
        losses.attention_transfer(a, a)
    with pytest.raises(ValueError, match="p must be a positive number"):
        losses.attention_map(a, p=0)
    # errors are raised at trace time under jit
    with pytest.raises(ValueError, match="cannot average-pool"):
        jax.jit(lambda x, y: losses.attention_transfer([x], [y]))(a, jnp.zeros((2, 3, 3, 1)))


@settings(max_examples=12, deadline=None, derandomize=True)
@given(b=st.integers(1, 3), h=st.integers(1, 3), w=st.integers(1, 3), fh=st.sampled_from([1, 2]),
       fw=st.sampled_from([1, 2]), cs=st.integers(1, 3), ct=st.integers(1, 3),
       mode=st.sampled_from(["code", "paper"]), student_larger=st.booleans(), seed=st.integers(0, 99))
def test_attention_transfer_property(b, h, w, fh, fw, cs, ct, mode, student_larger, seed):
    rng = np.random.default_rng(seed)
    big, small = (b, h * fh, w * fw), (b, h, w)
    s_shape, t_shape = (big, small) if student_larger else (small, big)
    fs, ft = _rand(rng, *s_shape, cs), _rand(rng, *t_shape, ct)
    got = np.asarray(at_jit([jnp.asarray(fs)], [jnp.asarray(ft)], mode=mode))
    assert got.shape == (b,) and np.all(got >= 0)
    np.testing.assert_allclose(got, np_at_per_example([fs], [ft], mode, 2, 1000.0), rtol=1e-4, atol=1e-4)
    # bounded: normalised maps are at distance <= 2 (code: mean of squares <= 4/(HW))
    assert np.all(got <= (4000.0 if mode == "code" else 1000.0 / (h * w)) + 1e-3)


# ----------------------------------------------------------------------------- gradient-based AT

def test_gradient_attention_map_matches_numpy():
    rng = np.random.default_rng(5)
    g = _rand(rng, 2, 3, 4, 3)
    for p in (1, 2):
        q = (np.abs(g.astype(np.float64)) ** p).sum(3).reshape(2, -1)
        q = q / np.sqrt((q ** 2).sum(1, keepdims=True))
        np.testing.assert_allclose(losses.gradient_attention_map(jnp.asarray(g), p=p), q, rtol=1e-5, atol=1e-7)


def test_gradient_attention_transfer_with_grad_inside_jit():
    """Input gradients of two linear softmax classifiers, computed with jax.grad inside jit."""
    rng = np.random.default_rng(6)
    B, H, W, C, K = 4, 4, 4, 3, 5
    x = _rand(rng, B, H, W, C)
    w_s, w_t = _rand(rng, H, W, C, K), _rand(rng, H, W, C, K)
    labels = rng.integers(0, K, size=B)

    def ce(w):
        return lambda x_: losses.cross_entropy(jnp.einsum("bhwc,hwck->bk", x_, w), jnp.asarray(labels))

    @jax.jit
    def objective(w_s_, x_):
        g_s = losses.input_gradient(ce(w_s_), x_)
        g_t = losses.input_gradient(ce(jnp.asarray(w_t)), x_)
        return jnp.mean(losses.gradient_attention_transfer(g_s, g_t))

    # numpy: d CE_i / d x_i = sum_k W[..., k] (softmax_ik - onehot_ik)
    def np_input_grad(w):
        z = np.einsum("bhwc,hwck->bk", x.astype(np.float64), w)
        pr = np.exp(z - z.max(1, keepdims=True))
        pr /= pr.sum(1, keepdims=True)
        pr[np.arange(B), labels] -= 1.0
        return np.einsum("hwck,bk->bhwc", w, pr)

    def np_map(g):
        q = np.abs(g).sum(3).reshape(B, -1)
        return q / np.sqrt((q ** 2).sum(1, keepdims=True))

    expected = ((np_map(np_input_grad(w_s)) - np_map(np_input_grad(w_t))) ** 2).sum(1).mean()
    np.testing.assert_allclose(float(objective(jnp.asarray(w_s), jnp.asarray(x))), expected, rtol=1e-4)
    # double backprop: gradient w.r.t. the student's weights, jitted
    gw = jax.jit(jax.grad(objective))(jnp.asarray(w_s), jnp.asarray(x))
    assert gw.shape == w_s.shape and np.all(np.isfinite(np.asarray(gw))) and np.any(np.asarray(gw))
    # gradient_attention = map of input_gradient
    grad_att = jax.jit(lambda w, x_: losses.gradient_attention(ce(w), x_))
    np.testing.assert_allclose(grad_att(jnp.asarray(w_t), jnp.asarray(x)),
                               np_map(np_input_grad(w_t)), rtol=1e-4, atol=1e-6)


def test_gradient_attention_errors():
    with pytest.raises(ValueError, match="student_grad must be an NHWC"):
        losses.gradient_attention_transfer(jnp.zeros((2, 4)), jnp.zeros((2, 4, 4, 1)))
    with pytest.raises(ValueError, match="same batch size"):
        losses.gradient_attention_transfer(jnp.zeros((2, 4, 4, 1)), jnp.zeros((3, 4, 4, 1)))


# ----------------------------------------------------------------------------- FSP

FSP_SHAPES = [
    # (student shapes, teacher shapes): channels equal position-wise, spatial sizes may differ.
    ([(3, 4, 4, 2), (3, 4, 4, 3)], [(3, 4, 4, 2), (3, 4, 4, 3)]),
    ([(2, 8, 8, 3), (2, 4, 4, 4), (2, 2, 2, 5), (2, 2, 2, 2)],
     [(2, 8, 8, 3), (2, 8, 8, 4), (2, 4, 4, 5), (2, 1, 1, 2)]),
    ([(4, 6, 3, 2), (4, 3, 3, 3)], [(4, 2, 1, 2), (4, 4, 2, 3)]),
]


@pytest.mark.parametrize("shapes", FSP_SHAPES)
def test_fsp_matches_numpy(shapes):
    rng = np.random.default_rng(len(shapes[0]))
    fs = [_rand(rng, *s) for s in shapes[0]]
    ft = [_rand(rng, *s) for s in shapes[1]]
    for j in range(len(fs) - 1):
        np.testing.assert_allclose(losses.fsp_matrix(jnp.asarray(fs[j]), jnp.asarray(fs[j + 1])),
                                   np_fsp(fs[j], fs[j + 1]), rtol=1e-5, atol=1e-6)
    got = np.asarray(fsp_jit(_j(fs), _j(ft)))
    assert got.shape == (shapes[0][0][0],)
    per_ex = sum(((np_fsp(fs[j], fs[j + 1]) - np_fsp(ft[j], ft[j + 1])) ** 2).mean(axis=(1, 2))
                 for j in range(len(fs) - 1))
    np.testing.assert_allclose(got, per_ex, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.mean(), np_fsp_reference_scalar(fs, ft), rtol=1e-5)


def test_fsp_hand_computed():
    f0 = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 2, 2, 1)
    f1 = jnp.array([1.0, 0.0, 0.0, 1.0]).reshape(1, 2, 2, 1)
    np.testing.assert_allclose(losses.fsp_matrix(f0, f1), [[[1.25]]])     # (1 + 4) / 4
    t0 = jnp.ones((1, 2, 2, 1))
    np.testing.assert_allclose(losses.fsp_matrix(t0, f1), [[[0.5]]])
    np.testing.assert_allclose(losses.fsp_loss([f0, f1], [t0, f1]), [0.5625])  # 0.75^2
    # pooling: f0 (2x2, mean 2.5) against a 1x1 map [[2]] -> G = 5; teacher ones -> G = 2
    g = jnp.full((1, 1, 1, 1), 2.0)
    np.testing.assert_allclose(losses.fsp_matrix(f0, g), [[[5.0]]])
    np.testing.assert_allclose(losses.fsp_loss([f0, g], [t0, g]), [9.0])
    # three maps -> two pairs summed: pair0 (f0,f1) vs (t0,f1): 0.5625; pair1 (f1,g) vs (f1,g): 0
    np.testing.assert_allclose(losses.fsp_loss([f0, f1, g], [t0, f1, g]), [0.5625])
    # two channels: G[c, d] = <a_c, b_d> / HW
    a = jnp.stack([f0, f1], axis=-1)[..., 0, :]   # 1x2x2x2
    np.testing.assert_allclose(losses.fsp_matrix(a, a), [[[30 / 4, 5 / 4], [5 / 4, 2 / 4]]])


def test_fsp_gradient():
    """The gradient of the batch-mean FSP loss w.r.t. every student map equals central differences
    of the float64 numpy formula (``np_fsp_reference_scalar``), element by element."""
    rng = np.random.default_rng(7)
    fs = [_rand(rng, 2, 4, 4, 2), _rand(rng, 2, 2, 2, 3), _rand(rng, 2, 2, 2, 2)]
    ft = [_rand(rng, 2, 2, 2, 2), _rand(rng, 2, 2, 2, 3), _rand(rng, 2, 1, 1, 2)]
    grads = jax.jit(jax.grad(lambda xs: jnp.mean(losses.fsp_loss(xs, _j(ft)))))(_j(fs))
    h = 1e-6
    for k, (g, f) in enumerate(zip(grads, fs)):
        want = np.zeros(f.shape)
        for idx in np.ndindex(f.shape):
            plus = [x.astype(np.float64).copy() for x in fs]
            minus = [x.astype(np.float64).copy() for x in fs]
            plus[k][idx] += h
            minus[k][idx] -= h
            want[idx] = (np_fsp_reference_scalar(plus, ft) - np_fsp_reference_scalar(minus, ft)) / (2 * h)
        assert np.abs(want).max() > 1e-3  # every map really feeds the loss
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-3, atol=1e-6, err_msg=f"map {k}")


def test_fsp_errors():
    a, b = jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 4, 4, 5))
    with pytest.raises(ValueError, match=r"pair 1 .*channel counts must match.*\(2, 4, 4, 5\).*\(2, 4, 4, 7\)"):
        losses.fsp_loss([a, b, b], [a, b, jnp.zeros((2, 4, 4, 7))])
    with pytest.raises(ValueError, match="at least 2"):
        losses.fsp_loss([a], [a])
    with pytest.raises(ValueError, match=r"pair 0 .*cannot average-pool"):
        losses.fsp_loss([a, jnp.zeros((2, 3, 3, 5))], [a, b])
    with pytest.raises(ValueError, match=r"teacher_features\[1\] must be an NHWC"):
        losses.fsp_loss([a, b], [a, jnp.zeros((2, 4, 5))])
    with pytest.raises(ValueError, match="feature_a and feature_b must have the same batch size"):
        losses.fsp_matrix(a, jnp.zeros((3, 4, 4, 3)))


# ----------------------------------------------------------------------------- regressor

@pytest.mark.parametrize("s_shape,t_shape,kind,kernel", [
    ((2, 8, 8, 4), (2, 4, 4, 6), "stride2", (3, 3, 4, 6)),
    ((2, 4, 4, 4), (2, 8, 8, 6), "transpose2", (4, 4, 4, 6)),
    ((2, 6, 5, 3), (2, 4, 4, 5), "valid", (3, 2, 3, 5)),
    ((2, 4, 4, 3), (2, 4, 4, 5), "valid", (1, 1, 3, 5)),
    ((2, 2, 2, 3), (2, 1, 1, 2), "stride2", (3, 3, 3, 2)),
])
def np_conv(x, k, stride, pad):
    """PyTorch Conv2d (cross-correlation) on NHWC ``x`` with an HWIO kernel, explicit loops."""
    x = np.pad(x, ((0, 0), (pad[0], pad[0]), (pad[1], pad[1]), (0, 0)))
    kh, kw = k.shape[:2]
    oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], oh, ow, k.shape[3]))
    for i in range(oh):
        for j in range(ow):
            patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
            out[:, i, j] = np.einsum("bhwc,hwco->bo", patch, k)
    return out


def np_conv_transpose(x, w_torch, stride=2, pad=1):
    """PyTorch ConvTranspose2d: every input pixel scatters ``x[y] * W[k]`` to output ``stride*y - pad + k``."""
    b, h, w, _ = x.shape
    kh, kw, _, co = w_torch.shape
    full = np.zeros((b, (h - 1) * stride + kh, (w - 1) * stride + kw, co))
    for y in range(h):
        for z in range(w):
            full[:, y * stride:y * stride + kh, z * stride:z * stride + kw] += np.einsum("bc,hwco->bhwo", x[:, y, z], w_torch)
    return full[:, pad:full.shape[1] - pad, pad:full.shape[2] - pad]


@pytest.mark.parametrize("s_shape,t_shape,kind,kernel", [
    ((2, 8, 8, 4), (2, 4, 4, 6), "stride2", (3, 3, 4, 6)),
    ((2, 4, 4, 4), (2, 8, 8, 6), "transpose2", (4, 4, 4, 6)),
    ((2, 6, 5, 3), (2, 4, 4, 5), "valid", (3, 2, 3, 5)),
    ((2, 4, 4, 3), (2, 4, 4, 5), "valid", (1, 1, 3, 5)),
    ((2, 2, 2, 3), (2, 1, 1, 2), "stride2", (3, 3, 3, 2)),
])
def test_hint_regressor_matches_pytorch_layers(s_shape, t_shape, kind, kernel):
    """Shapes and numbers: the layer PyTorch's ConvReg would use (3x3 stride-2 conv with padding 1,
    4x4 stride-2 transposed conv with padding 1, VALID conv), then BN (eval: running statistics;
    train: batch statistics) and ReLU, against explicit numpy loops."""
    assert regressor_kind(s_shape[1:3], t_shape[1:3]) == kind
    reg = make_hint_regressor(s_shape, t_shape)
    assert isinstance(reg, HintRegressor)
    x = np.random.default_rng(0).normal(size=s_shape).astype(np.float32)

    # Shapes of init by tracing only (random init compiles slowly on CPU), values from numpy.
    shapes = jax.eval_shape(lambda x_: reg.init(jax.random.key(0), x_, train=False), jnp.asarray(x))
    assert shapes["params"]["conv"]["kernel"].shape == kernel
    assert shapes["params"]["conv"]["bias"].shape == (t_shape[-1],)
    rng = np.random.default_rng(1)
    variables = jax.tree.map(lambda a: jnp.asarray(rng.uniform(-1.0, 1.0, a.shape), a.dtype), shapes)
    variables["batch_stats"]["bn"]["var"] = jnp.asarray(rng.uniform(0.5, 2.0, (t_shape[-1],)), jnp.float32)

    @jax.jit
    def apply_both(v, x_):
        y_train, state = reg.apply(v, x_, train=True, mutable=["batch_stats"])
        return y_train, state, reg.apply(v, x_, train=False)

    y, state, y_eval = apply_both(variables, jnp.asarray(x))
    assert y.shape == t_shape and y_eval.shape == t_shape
    v = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
    k, bias = v["params"]["conv"]["kernel"], v["params"]["conv"]["bias"]
    x64 = x.astype(np.float64)
    if kind == "stride2":
        conv = np_conv(x64, k, 2, (1, 1))
    elif kind == "transpose2":
        conv = np_conv_transpose(x64, k[::-1, ::-1])  # Flax's kernel is PyTorch's, flipped in space
    else:
        conv = np_conv(x64, k, 1, (0, 0))
    conv = conv + bias
    scale, shift = v["params"]["bn"]["scale"], v["params"]["bn"]["bias"]
    mean, var = v["batch_stats"]["bn"]["mean"], v["batch_stats"]["bn"]["var"]
    want_eval = np.maximum((conv - mean) / np.sqrt(var + 1e-5) * scale + shift, 0.0)
    np.testing.assert_allclose(np.asarray(y_eval), want_eval, rtol=1e-4, atol=1e-5)
    bm, bv = conv.mean(axis=(0, 1, 2)), conv.var(axis=(0, 1, 2))
    want_train = np.maximum((conv - bm) / np.sqrt(bv + 1e-5) * scale + shift, 0.0)
    np.testing.assert_allclose(np.asarray(y), want_train, rtol=1e-4, atol=1e-4)
    assert jax.tree.structure(state["batch_stats"]) == jax.tree.structure(variables["batch_stats"])
    # and the hint loss accepts it
    assert losses.fitnets_hint(y, jnp.zeros(t_shape)).shape == (s_shape[0],)


def test_hint_regressor_errors():
    with pytest.raises(ValueError, match="unsupported FitNets regressor shapes: student spatial size 4x4 vs teacher 6x6"):
        make_hint_regressor((2, 4, 4, 3), (2, 6, 6, 3))
    with pytest.raises(ValueError, match="unsupported FitNets regressor shapes"):
        make_hint_regressor((8, 2, 3), (4, 4, 3))
    with pytest.raises(ValueError, match="teacher_feature_shape must be NHWC"):
        make_hint_regressor((2, 4, 4, 3), (4, 4))
    reg = make_hint_regressor((4, 4, 3), (2, 2, 5))
    with pytest.raises(ValueError, match="does not match the regressor's student_hw"):
        reg.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)


# ----------------------------------------------------------------------------- sharding

def eight_devices_batch_means(ctx):
    """(In the 8-device child, tests/_eight_devices.py) every feature loss's batch mean, and AT's
    gradient, with the batch on one device and split over 8."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    rng = np.random.default_rng(0)
    B = 16
    r = lambda *s: rng.normal(size=(B,) + s).astype(np.float32)  # noqa: E731
    fs = [r(8, 8, 3), r(4, 4, 4), r(2, 2, 5)]
    ft = [r(4, 4, 6), r(4, 4, 4), r(2, 2, 5)]
    ft_fsp = [r(4, 4, 3), r(4, 4, 4), r(1, 1, 5)]
    hint_s, hint_t = r(4, 4, 5), r(4, 4, 5)
    gs, gt = r(4, 4, 3), r(8, 8, 1)
    args = (fs, ft, ft_fsp, hint_s, hint_t, gs, gt)

    def batch_means(fs, ft, ft_fsp, hint_s, hint_t, gs, gt):
        return jnp.stack([
            jnp.mean(losses.fitnets_hint(hint_s, hint_t)),
            jnp.mean(losses.attention_transfer(fs, ft, mode="code")),
            jnp.mean(losses.attention_transfer(fs, ft, mode="paper")),
            jnp.mean(losses.fsp_loss(fs, ft_fsp)),
            jnp.mean(losses.gradient_attention_transfer(gs, gt)),
        ])

    f = jax.jit(batch_means)
    one = jax.device_put(args, jax.devices()[0])
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = jax.device_put(args, NamedSharding(mesh, P("data")))
    assert len(sharded[0][0].sharding.device_set) == 8
    g = jax.jit(jax.grad(lambda fs_: jnp.mean(losses.attention_transfer(fs_, ft))))
    return {"one": np.asarray(f(*one)).tolist(), "eight": np.asarray(f(*sharded)).tolist(),
            "grad_one": [np.asarray(a).tolist() for a in g(one[0])],
            "grad_eight": [np.asarray(a).tolist() for a in g(sharded[0])]}


def test_batch_mean_is_global_under_data_sharding(eight_devices):
    out = eight_devices("test_feature_losses:eight_devices_batch_means")
    np.testing.assert_allclose(out["eight"], out["one"], rtol=1e-5, atol=1e-7)
    for a, b in zip(out["grad_one"], out["grad_eight"]):  # and the gradient of the batch mean
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)


def test_teachers_get_no_gradient():
    """Every feature loss holds the teacher's maps constant: the gradient w.r.t. them is exactly 0,
    while the student's is not."""
    rng = np.random.default_rng(11)
    fs = _j([_rand(rng, 2, 4, 4, 3), _rand(rng, 2, 2, 2, 3)])
    ft = _j([_rand(rng, 2, 4, 4, 3), _rand(rng, 2, 2, 2, 3)])
    cases = {
        "fitnets_hint": lambda s, t: losses.fitnets_hint(s[0], t[0]),
        "at code": lambda s, t: losses.attention_transfer(s, t, mode="code"),
        "at paper": lambda s, t: losses.attention_transfer(s, t, mode="paper"),
        "at paper_unscaled": lambda s, t: losses.attention_transfer(s, t, mode="paper_unscaled"),
        "fsp": lambda s, t: losses.fsp_loss(s, t),
        "gradient at": lambda s, t: losses.gradient_attention_transfer(s[0], t[0]),
    }
    for name, f in cases.items():
        g_s, g_t = jax.jit(jax.grad(lambda s, t: jnp.sum(f(s, t)), argnums=(0, 1)))(fs, ft)
        assert all(not np.any(np.asarray(g)) for g in g_t), name
        assert any(np.any(np.asarray(g)) for g in g_s), name
