"""Logit standardisation, DKD and DIST against formulas written out in numpy (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import losses


# ----------------------------------------------------------------------------- numpy references

def _np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _np_softmax(z):
    return np.exp(_np_log_softmax(z))


def _np_kl(p, q):
    """sum_c p log(p / q) per row, with 0 log 0 = 0."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return terms.sum(-1)


def _np_standardize(z, eps=1e-7):
    z = np.asarray(z, np.float64)
    return (z - z.mean(-1, keepdims=True)) / (z.std(-1, ddof=1, keepdims=True) + eps)


def _np_dkd_exact(s, t, y, T):
    """TCKD and NCKD by definition: binary KL of (p_g, 1 - p_g); KL over the other classes."""
    b = len(y)
    p_s, p_t = _np_softmax(s / T), _np_softmax(t / T)
    rows = np.arange(b)
    bs = np.stack([p_s[rows, y], 1 - p_s[rows, y]], -1)
    bt = np.stack([p_t[rows, y], 1 - p_t[rows, y]], -1)
    tckd = _np_kl(bt, bs)
    nckd = np.empty(b)
    for i in range(b):
        keep = np.arange(s.shape[1]) != y[i]
        nckd[i] = _np_kl(_np_softmax(t[i, keep] / T), _np_softmax(s[i, keep] / T))
    return tckd * T * T, nckd * T * T


def _np_dkd_mdistiller(s, t, y, T):
    """mdistiller's dkd_loss per example: probabilities summed under masks, target -1000 offset."""
    b, c = s.shape
    gt = np.zeros((b, c))
    gt[np.arange(b), y] = 1.0
    p_s, p_t = _np_softmax(s / T), _np_softmax(t / T)
    bs = np.stack([(p_s * gt).sum(1), (p_s * (1 - gt)).sum(1)], -1)
    bt = np.stack([(p_t * gt).sum(1), (p_t * (1 - gt)).sum(1)], -1)
    with np.errstate(divide="ignore", invalid="ignore"):  # log 0 when a part rounds to 0, as in torch
        tckd = (bt * (np.log(bt) - np.log(bs))).sum(1)
    q_t = _np_softmax(t / T - 1000.0 * gt)
    log_q_s = _np_log_softmax(s / T - 1000.0 * gt)
    nckd = np.where(q_t > 0, q_t * (np.log(np.where(q_t > 0, q_t, 1.0)) - log_q_s), 0.0).sum(1)
    return tckd * T * T, nckd * T * T


def _np_pearson_rows(a, b, eps=1e-8):
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + eps)


def _np_dist_reference(s, t, beta, gamma, tau):
    """The DIST module's scalar: tau^2 (beta (1 - mean row corr) + gamma (1 - mean column corr))."""
    y_s, y_t = _np_softmax(s / tau), _np_softmax(t / tau)
    inter = 1 - _np_pearson_rows(y_s, y_t).mean()
    intra = 1 - _np_pearson_rows(y_s.T, y_t.T).mean()
    return tau ** 2 * (beta * inter + gamma * intra)


def _rand(seed, b=6, c=5, scale=3.0):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(b, c)) * scale
    t = rng.normal(size=(b, c)) * scale
    y = rng.integers(0, c, size=b)
    return s, t, y


def _f32(*xs):
    return tuple(jnp.asarray(x, jnp.float32) for x in xs)


# ----------------------------------------------------------------------------- standardize_logits

def test_standardize_matches_numpy_ddof1_eps_on_std():
    z = np.random.default_rng(0).normal(size=(4, 7)) * 5 + 3
    got = np.asarray(losses.standardize_logits(jnp.float32(z)))
    np.testing.assert_allclose(got, _np_standardize(z), rtol=1e-5, atol=1e-5)
    # eps goes on the std, not under the square root: visible with a large eps
    got_big = np.asarray(losses.standardize_logits(jnp.float32(z), eps=0.5))
    np.testing.assert_allclose(got_big, _np_standardize(z, eps=0.5), rtol=1e-5, atol=1e-5)
    # the population std (ddof=0) would give a different answer
    assert not np.allclose(got, (z - z.mean(-1, keepdims=True)) / z.std(-1, keepdims=True), atol=1e-3)


def test_standardize_hand_case_and_axis():
    # mean 2, sample std 1 -> (-1, 0, 1) / (1 + 1e-7)
    got = np.asarray(losses.standardize_logits(jnp.array([[1.0, 2.0, 3.0]])))
    np.testing.assert_allclose(got, [[-1.0, 0.0, 1.0]], rtol=1e-6)
    z = np.random.default_rng(1).normal(size=(5, 3))
    np.testing.assert_allclose(np.asarray(losses.standardize_logits(jnp.float32(z), axis=0)),
                               _np_standardize(z.T).T, rtol=1e-5, atol=1e-5)


def test_standardize_invariant_to_shift_and_positive_scale():
    z = jnp.float32(np.random.default_rng(2).normal(size=(3, 6)))
    base = np.asarray(losses.standardize_logits(z))
    shift = jnp.float32([[5.0], [-40.0], [0.3]])
    np.testing.assert_allclose(np.asarray(losses.standardize_logits(z + shift)), base, atol=2e-5)
    # positive scaling: exact without eps, up to eps otherwise
    for a in (0.25, 7.0):
        np.testing.assert_allclose(np.asarray(losses.standardize_logits(a * z, eps=0.0)),
                                   np.asarray(losses.standardize_logits(z, eps=0.0)), atol=2e-5)
        np.testing.assert_allclose(np.asarray(losses.standardize_logits(a * z)), base, atol=1e-5)


def test_standardize_gradient_is_orthogonal_to_ones_and_to_centred_logits():
    rng = np.random.default_rng(3)
    z = jnp.float32(rng.normal(size=(4, 6)) * 2)
    w = jnp.float32(rng.normal(size=(4, 6)))
    g = np.asarray(jax.grad(lambda z_: jnp.sum(w * losses.standardize_logits(z_)))(z))
    assert np.abs(g).max() > 1e-2  # not trivially zero
    np.testing.assert_allclose(g.sum(-1), 0.0, atol=1e-5)  # shift invariance
    g0 = np.asarray(jax.grad(lambda z_: jnp.sum(w * losses.standardize_logits(z_, eps=0.0)))(z))
    centred = np.asarray(z) - np.asarray(z).mean(-1, keepdims=True)
    np.testing.assert_allclose((g0 * centred).sum(-1), 0.0, atol=1e-5)  # scale invariance (Euler)


def test_standardize_constant_row_is_zero_with_finite_gradient():
    z = jnp.full((2, 4), 3.0)
    np.testing.assert_array_equal(np.asarray(losses.standardize_logits(z)), 0.0)
    w = jnp.float32([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 1.0]])
    g = np.asarray(jax.grad(lambda z_: jnp.sum(w * losses.standardize_logits(z_, eps=0.5)))(z))
    # with std = 0 the map is (z - mean) / eps near the row: gradient (w - mean(w)) / eps
    expected = (np.asarray(w) - np.asarray(w).mean(-1, keepdims=True)) / 0.5
    np.testing.assert_allclose(g, expected, rtol=1e-6, atol=1e-6)


def test_standardized_hinton_kd_ignores_logit_magnitude():
    s, t, _ = _rand(4)
    s, t = _f32(s, t)
    kd = lambda s_: losses.hinton_kd(losses.standardize_logits(s_), losses.standardize_logits(t), 2.0)
    np.testing.assert_allclose(np.asarray(kd(10.0 * s + 3.0)), np.asarray(kd(s)), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- DKD

@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_terms_match_numpy_definition_and_mdistiller(T):
    s, t, y = _rand(5, b=8, c=6)
    tckd, nckd = losses.dkd_terms(*_f32(s, t), jnp.asarray(y), temperature=T)
    # float32 logs: absolute error ~1e-7 * T^2 on small KLs, hence atol 1e-5
    assert tckd.shape == nckd.shape == (8,)
    e_t, e_n = _np_dkd_exact(s, t, y, T)
    np.testing.assert_allclose(np.asarray(tckd), e_t, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(nckd), e_n, rtol=1e-4, atol=1e-5)
    m_t, m_n = _np_dkd_mdistiller(s, t, y, T)
    np.testing.assert_allclose(np.asarray(tckd), m_t, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(nckd), m_n, rtol=1e-4, atol=1e-5)
    got = losses.dkd(*_f32(s, t), jnp.asarray(y), alpha=1.5, beta=8.0, temperature=T)
    np.testing.assert_allclose(np.asarray(got), 1.5 * e_t + 8.0 * e_n, rtol=1e-4, atol=1e-5)
    # the batch mean is mdistiller's dkd_loss (sum over the batch / B)
    np.testing.assert_allclose(float(jnp.mean(got)), np.mean(1.5 * m_t + 8.0 * m_n), rtol=1e-4)


def test_dkd_hand_computed_three_classes():
    # T = 2, student uniform; teacher logits 2*log(.) so that p_t(T=2) = (1/5, 3/5, 1/5)
    T = 2.0
    s = jnp.zeros((2, 3))
    t = jnp.float32([[0.0, 2 * np.log(3.0), 0.0], [2 * np.log(2.0), 0.0, 0.0]])
    y = jnp.array([0, 0])
    tckd, nckd = losses.dkd_terms(s, t, y, temperature=T)
    # row 0: b_t = (1/5, 4/5), b_s = (1/3, 2/3); p_hat_t = (3/4, 1/4), p_hat_s = (1/2, 1/2)
    e_t0 = T * T * (0.2 * np.log(0.2 / (1 / 3)) + 0.8 * np.log(0.8 / (2 / 3)))
    e_n0 = T * T * (0.75 * np.log(1.5) + 0.25 * np.log(0.5))
    # row 1: p_t = (1/2, 1/4, 1/4): b_t = (1/2, 1/2); non-target part uniform like the student's
    e_t1 = T * T * 0.5 * np.log(9 / 8)
    np.testing.assert_allclose(np.asarray(tckd), [e_t0, e_t1], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(nckd), [e_n0, 0.0], rtol=1e-5, atol=1e-6)


def test_dkd_two_classes_is_hinton_kd_and_nckd_is_zero():
    s, t, y = _rand(6, b=5, c=2)
    tckd, nckd = losses.dkd_terms(*_f32(s, t), jnp.asarray(y), temperature=3.0)
    np.testing.assert_allclose(np.asarray(nckd), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(tckd), np.asarray(losses.hinton_kd(*_f32(s, t), 3.0)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("standardize", [False, True])
def test_dkd_decomposition_identity(T, standardize):
    # KD = TCKD + (1 - p_t[target]) NCKD (all three scaled by T^2)
    s, t, y = _rand(7, b=8, c=7)
    s32, t32 = _f32(s, t)
    tckd, nckd = losses.dkd_terms(s32, t32, jnp.asarray(y), temperature=T, standardize=standardize)
    if standardize:
        s32, t32 = losses.standardize_logits(s32), losses.standardize_logits(t32)
    kd = np.asarray(losses.hinton_kd(s32, t32, T))
    p_t_target = _np_softmax(np.asarray(t32, np.float64) / T)[np.arange(8), y]
    np.testing.assert_allclose(np.asarray(tckd) + (1 - p_t_target) * np.asarray(nckd), kd, rtol=1e-4, atol=1e-6)


def test_dkd_standardize_option_is_standardize_then_dkd():
    s, t, y = _rand(8)
    s32, t32 = _f32(s, t)
    got = losses.dkd(s32, t32, jnp.asarray(y), standardize=True, temperature=2.0)
    ref = losses.dkd(losses.standardize_logits(s32), losses.standardize_logits(t32), jnp.asarray(y), temperature=2.0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6)
    e_t, e_n = _np_dkd_exact(_np_standardize(s), _np_standardize(t), y, 2.0)
    np.testing.assert_allclose(np.asarray(got), e_t + 8.0 * e_n, rtol=1e-4, atol=1e-5)


def test_tckd_gradient_closed_form():
    # d TCKD / d s_j = T (b_s - b_t) (delta_jg - p_s,j) / (1 - b_s), b = target probability at T:
    # T (b_s - b_t) at the target, -T (b_s - b_t) p_hat_s,j elsewhere
    B, C, T = 6, 5, 3.0
    s, t, y = _rand(9, b=B, c=C)
    g = jax.grad(lambda s_: jnp.sum(losses.dkd_terms(s_, jnp.float32(t), jnp.asarray(y), T)[0]))(jnp.float32(s))
    p_s, p_t = _np_softmax(s / T), _np_softmax(t / T)
    rows = np.arange(B)
    b_s, b_t = p_s[rows, y], p_t[rows, y]
    onehot = np.eye(C)[y]
    expected = T * ((b_s - b_t) / (1 - b_s))[:, None] * (onehot - p_s)
    np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-4, atol=1e-6)


def test_nckd_gradient_closed_form_and_independent_of_target_logit():
    # d NCKD / d s_j = T (p_hat_s,j - p_hat_t,j) for j != g, 0 at the target
    B, C, T = 5, 6, 2.0
    s, t, y = _rand(10, b=B, c=C)
    g = jax.grad(lambda s_: jnp.sum(losses.dkd_terms(s_, jnp.float32(t), jnp.asarray(y), T)[1]))(jnp.float32(s))
    onehot = np.eye(C)[y].astype(bool)
    hat = lambda z: np.where(onehot, 0.0, _np_softmax(np.where(onehot, -np.inf, z / T)))
    expected = T * (hat(s) - hat(t))
    np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(g)[onehot], 0.0)
    moved = np.where(onehot, s + 50.0, s)
    np.testing.assert_allclose(np.asarray(losses.dkd_terms(*_f32(moved, t), jnp.asarray(y), T)[1]),
                               np.asarray(losses.dkd_terms(*_f32(s, t), jnp.asarray(y), T)[1]), rtol=1e-6)


def test_exact_exclusion_vs_mdistiller_offset():
    # typical logits: the -1000 offset hides the target entirely (difference below float64 noise)
    s, t, y = _rand(11, b=6, c=5, scale=10.0)
    _, exact = _np_dkd_exact(s, t, y, 4.0)
    _, offset = _np_dkd_mdistiller(s, t, y, 4.0)
    assert np.abs(exact - offset).max() < 1e-12
    # a target logit 1000*T above the others puts the target back into mdistiller's "non-target"
    # softmax with the weight of an ordinary class; the exact exclusion does not see it
    T = 1.0
    s = np.array([[1000.0, 0.0, 1.0]])
    t = np.array([[1000.0, 1.0, 0.0]])
    y = np.array([0])
    _, exact = _np_dkd_exact(s, t, y, T)
    _, offset = _np_dkd_mdistiller(s, t, y, T)
    got = float(losses.dkd_terms(*_f32(s, t), jnp.asarray(y), T)[1][0])
    np.testing.assert_allclose(got, exact[0], rtol=1e-5)
    np.testing.assert_allclose(exact[0], _np_kl(_np_softmax(np.array([1.0, 0.0])), _np_softmax(np.array([0.0, 1.0]))))
    assert abs(offset[0] - exact[0]) > 0.05, (offset, exact)  # 0.364 vs 0.462


def test_dkd_finite_when_student_is_certain():
    # p_s(target) rounds to 1 in float32: mdistiller's log(1 - p_s) would be log 0
    s = jnp.float32([[60.0, 0.0, 0.0]])
    t = jnp.float32([[2.0, 1.0, 0.0]])
    y = jnp.array([0])
    tckd, nckd = losses.dkd_terms(s, t, y, temperature=1.0)
    assert np.isfinite(np.asarray(tckd)).all() and np.isfinite(np.asarray(nckd)).all()
    # even in float64, 1 - p_s = 2 e^-60 rounds away; in log space log(1 - b_s) = log 2 - 60
    with np.errstate(divide="ignore"):
        assert not np.isfinite(_np_dkd_exact(np.asarray(s, np.float64), np.asarray(t, np.float64), np.array([0]), 1.0)[0]).all()
    b_t = np.exp(2.0) / (np.exp(2.0) + np.e + 1)
    log_b_s, log_1m_b_s = -np.log1p(2 * np.exp(-60.0)), np.log(2.0) - 60.0
    expected = b_t * (np.log(b_t) - log_b_s) + (1 - b_t) * (np.log(1 - b_t) - log_1m_b_s)
    np.testing.assert_allclose(float(tckd[0]), expected, rtol=1e-5)
    g = jax.grad(lambda s_: jnp.sum(losses.dkd(s_, t, y, temperature=1.0)))(s)
    assert np.isfinite(np.asarray(g)).all()


def test_dkd_teacher_gets_no_gradient_and_jits():
    s, t, y = _rand(12)
    s32, t32 = _f32(s, t)
    g = jax.grad(lambda t_: jnp.sum(losses.dkd(s32, t_, jnp.asarray(y))))(t32)
    np.testing.assert_array_equal(np.asarray(g), 0.0)
    jitted = jax.jit(losses.dkd, static_argnames=("standardize",))(s32, t32, jnp.asarray(y))
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(losses.dkd(s32, t32, jnp.asarray(y))), rtol=1e-6)


# ----------------------------------------------------------------------------- DIST

@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_dist_pearson_matches_np_corrcoef(tau):
    s, t, _ = _rand(13, b=7, c=5)
    y_s, y_t = _np_softmax(s / tau), _np_softmax(t / tau)
    inter = np.asarray(losses.dist_inter(*_f32(s, t), temperature=tau))
    rows = np.array([np.corrcoef(y_s[i], y_t[i])[0, 1] for i in range(7)])
    np.testing.assert_allclose(1 - inter, rows, atol=2e-5)
    intra = float(losses.dist_intra(*_f32(s, t), temperature=tau))
    cols = np.array([np.corrcoef(y_s[:, c], y_t[:, c])[0, 1] for c in range(5)])
    np.testing.assert_allclose(1 - intra, cols.mean(), atol=2e-5)


@pytest.mark.parametrize("beta,gamma,tau", [(1.0, 1.0, 4.0), (2.0, 0.5, 1.0)])
def test_dist_loss_matches_reference_module_value(beta, gamma, tau):
    s, t, _ = _rand(14, b=8, c=6)
    inter, intra = losses.dist_loss(*_f32(s, t), beta=beta, gamma=gamma, temperature=tau)
    assert inter.shape == (8,) and intra.shape == ()
    np.testing.assert_allclose(float(jnp.mean(inter) + intra), _np_dist_reference(s, t, beta, gamma, tau), rtol=1e-4)
    # the per-example inter part, tau^2 * beta * (1 - row correlation with the 1e-8 eps)
    y_s, y_t = _np_softmax(s / tau), _np_softmax(t / tau)
    np.testing.assert_allclose(np.asarray(inter), tau ** 2 * beta * (1 - _np_pearson_rows(y_s, y_t)), rtol=1e-4, atol=1e-5)


def test_dist_hand_computed():
    # 2 classes: centred rows are +-(p - 1/2)(1, -1), so the row correlation is the sign of
    # (p_s - 1/2)(p_t - 1/2): inter = 0 on the same side, 2 on opposite sides
    s = jnp.float32([[2.0, 0.0], [2.0, 0.0]])
    t = jnp.float32([[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(np.asarray(losses.dist_inter(s, t, 1.0)), [0.0, 2.0], atol=1e-6)
    # batch of 2: a centred column is +-(a_1 - a_2)/2 (1, -1), so the column correlation is the
    # sign of (y_s[0,c] - y_s[1,c])(y_t[0,c] - y_t[1,c])
    s = jnp.float32([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    t = jnp.float32([[0.0, 2.0, 0.0], [2.0, 0.0, 0.0]])
    # columns 0 and 1 move in opposite directions (correlation -1); column 2 is equal in both
    # rows, its centred column is zero and the correlation 0 / (0 + eps) = 0
    y_s, y_t = _np_softmax(np.asarray(s, np.float64)), _np_softmax(np.asarray(t, np.float64))
    np.testing.assert_array_equal(np.sign(np.round((y_s[0] - y_s[1]) * (y_t[0] - y_t[1]), 12)), [-1.0, -1.0, 0.0])
    np.testing.assert_allclose(float(losses.dist_intra(s, t, 1.0)), 1 - (-1 - 1 + 0) / 3, atol=1e-5)


def test_dist_intra_is_batch_level():
    s, t, _ = _rand(15, b=6, c=5)
    s32, t32 = _f32(s, t)
    assert losses.dist_intra(s32, t32).shape == ()
    np.testing.assert_allclose(float(losses.dist_intra(t32, t32)), 0.0, atol=1e-3)
    np.testing.assert_allclose(float(losses.dist_intra(t32, t32, temperature=1.0)), 0.0, atol=1e-5)
    # change example 0 only: intra (a function of the whole batch) changes; inter of the others does not
    s2 = s32.at[0].set(s32[0][::-1] * 2.0)
    assert abs(float(losses.dist_intra(s2, t32)) - float(losses.dist_intra(s32, t32))) > 1e-3
    np.testing.assert_allclose(np.asarray(losses.dist_inter(s2, t32))[1:], np.asarray(losses.dist_inter(s32, t32))[1:],
                               rtol=1e-6)
    # and the mean over two half batches is not the whole batch's value
    halves = (float(losses.dist_intra(s32[:3], t32[:3])) + float(losses.dist_intra(s32[3:], t32[3:]))) / 2
    assert abs(halves - float(losses.dist_intra(s32, t32))) > 1e-3


def test_dist_gradients_finite_at_degenerate_inputs():
    # one example: every centred column is zero; constant student row: centred row is zero
    s1, t1 = jnp.float32([[1.0, 2.0, 3.0]]), jnp.float32([[0.0, 1.0, 0.5]])
    np.testing.assert_allclose(float(losses.dist_intra(s1, t1)), 1.0, atol=1e-6)
    s = jnp.float32([[0.0, 0.0, 0.0], [1.0, 2.0, 0.0]])
    t = jnp.float32([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    for a, b in ((s1, t1), (s, t)):
        g = jax.grad(lambda s_: jnp.sum(losses.dist_loss(s_, b)[0]) + losses.dist_loss(s_, b)[1])(a)
        assert np.isfinite(np.asarray(g)).all()
    g = jax.grad(lambda t_: losses.dist_intra(s, t_) + jnp.sum(losses.dist_inter(s, t_)))(t)
    np.testing.assert_array_equal(np.asarray(g), 0.0)  # teacher is not differentiated


def test_dist_standardize_option():
    s, t, _ = _rand(16)
    s32, t32 = _f32(s, t)
    zs, zt = losses.standardize_logits(s32), losses.standardize_logits(t32)
    np.testing.assert_allclose(np.asarray(losses.dist_inter(s32, t32, 2.0, standardize=True)),
                               np.asarray(losses.dist_inter(zs, zt, 2.0)), rtol=1e-6)
    np.testing.assert_allclose(float(losses.dist_intra(s32, t32, 2.0, standardize=True)),
                               float(losses.dist_intra(zs, zt, 2.0)), rtol=1e-6)
    a, b = losses.dist_loss(s32, t32, temperature=2.0, standardize=True)
    np.testing.assert_allclose(float(jnp.mean(a) + b),
                               _np_dist_reference(_np_standardize(s), _np_standardize(t), 1.0, 1.0, 2.0), rtol=1e-4)


# ----------------------------------------------------------------------------- dtypes, NaN-free

@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_low_precision_inputs_are_upcast(dtype):
    s, t, y = _rand(17, b=4, c=5)
    s_l, t_l = jnp.asarray(s, dtype), jnp.asarray(t, dtype)
    outs = [losses.standardize_logits(s_l), *losses.dkd_terms(s_l, t_l, jnp.asarray(y)),
            losses.dkd(s_l, t_l, jnp.asarray(y)), *losses.dist_loss(s_l, t_l)]
    for v in outs:
        assert v.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(v)))
    ref = losses.dkd(*_f32(np.asarray(s_l, np.float32), np.asarray(t_l, np.float32)), jnp.asarray(y))
    np.testing.assert_allclose(np.asarray(outs[3]), np.asarray(ref), rtol=1e-6)


def test_no_nan_anywhere_in_forward_or_backward():
    # masked classes, zero-variance rows and a one-example batch, under jax_debug_nans
    s = jnp.float32([[0.0, 0.0, 0.0], [1.0, 5.0, -2.0]])
    t = jnp.float32([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    y = jnp.array([1, 0])

    def total(s_):
        inter, intra = losses.dist_loss(s_, t, standardize=True)
        one_inter, one_intra = losses.dist_loss(s_[:1], t[:1])
        return (jnp.sum(losses.dkd(s_, t, y, standardize=True)) + jnp.sum(losses.dkd(s_, t, y))
                + jnp.sum(inter) + intra + jnp.sum(one_inter) + one_intra)

    with jax.debug_nans(True):
        g = jax.grad(total)(s)
    assert np.isfinite(np.asarray(g)).all()


# ----------------------------------------------------------------------------- bad inputs

def test_bad_inputs_name_the_argument():
    s, t = jnp.ones((4, 3)), jnp.ones((4, 3))
    y = jnp.array([0, 1, 2, 0])
    for fn in (lambda a, b: losses.dkd(a, b, y), losses.dist_inter, losses.dist_intra, losses.dist_loss):
        with pytest.raises(ValueError, match="student_logits must have shape"):
            fn(jnp.ones((4,)), jnp.ones((4,)))
        with pytest.raises(ValueError, match="teacher_logits must have shape"):
            fn(s, jnp.ones((4, 3, 1)))
        with pytest.raises(ValueError, match="same shape"):
            fn(s, jnp.ones((4, 5)))
        with pytest.raises(TypeError, match="student_logits must be a floating-point"):
            fn(jnp.ones((4, 3), jnp.int32), t)
        with pytest.raises(TypeError, match="teacher_logits must be a floating-point"):
            fn(s, jnp.ones((4, 3), jnp.int32))
    with pytest.raises(ValueError, match="temperature"):
        losses.dkd(s, t, y, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        losses.dist_loss(s, t, temperature=-1.0)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 3\)"):
        losses.dkd(s, t, jnp.array([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="labels must be class indices"):
        losses.dkd_terms(s, t, jnp.array([0, -1, 1, 0]))
    with pytest.raises(TypeError, match="labels must be integer"):
        losses.dkd(s, t, jnp.zeros((4,)))
    with pytest.raises(ValueError, match="labels must have shape"):
        losses.dkd(s, t, jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match="at least 2 classes"):
        losses.dkd(jnp.ones((4, 1)), jnp.ones((4, 1)), jnp.zeros((4,), jnp.int32))
    with pytest.raises(TypeError, match="logits must be a floating-point"):
        losses.standardize_logits(jnp.ones((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="logits must have at least 2 entries"):
        losses.standardize_logits(jnp.ones((2, 1)))
    with pytest.raises(ValueError, match="axis"):
        losses.standardize_logits(jnp.ones((2, 3)), axis=2)
    with pytest.raises(ValueError, match="eps"):
        losses.standardize_logits(jnp.ones((2, 3)), eps=-1.0)


# ----------------------------------------------------------------------------- recipes (dkd, dist, hinton_kd_ls)

def _recipe_inputs(s, t, y, epoch=0):
    from jaxkd.core import LossInputs
    return LossInputs(student_logits=jnp.float32(s), student_features={}, teacher_logits=jnp.float32(t),
                      teacher_features={}, labels=jnp.asarray(y, jnp.int32), step=jnp.int32(0), aux_params={},
                      rng=jax.random.PRNGKey(0), stage_step=jnp.int32(0), epoch=jnp.int32(epoch))


def _np_ce(s, y):
    return -_np_log_softmax(s)[np.arange(len(y)), y]


@pytest.mark.parametrize("epoch,warmup,weight", [(0, 4, 0.25), (2, 4, 0.75), (7, 4, 1.0), (0, 0, 1.0)])
def test_dkd_recipe_is_ce_plus_warmed_up_dkd(epoch, warmup, weight):
    from jaxkd.core import as_loss_output
    from jaxkd.methods import build_recipe
    s, t, y = _rand(3)
    r = build_recipe({"name": "dkd", "beta": 2.0, "warmup_epochs": warmup}, "test")
    out = as_loss_output(r.loss(_recipe_inputs(s, t, y, epoch)))
    tckd, nckd = _np_dkd_exact(s, t, y, 4.0)
    # mdistiller: min(epoch / warmup, 1) with 1-based epochs -> (epoch + 1) / warmup here
    np.testing.assert_allclose(np.asarray(out.per_example), _np_ce(s, y) + weight * (tckd + 2.0 * nckd),
                               rtol=1e-4, atol=1e-5)
    assert r.teacher_temperature == 4.0 and r.teacher_logits_only


def test_dist_recipe_puts_the_intra_term_in_the_batch_terms():
    from jaxkd.core import as_loss_output
    from jaxkd.methods import build_recipe
    s, t, y = _rand(4, b=8, c=6)
    r = build_recipe({"name": "dist"}, "test")
    out = as_loss_output(r.loss(_recipe_inputs(s, t, y)))
    objective = float(np.mean(np.asarray(out.per_example)) + sum(float(v) for v in out.batch_terms.values()))
    # CE weight 1, KD weight 2 on the authors' module value (beta = gamma = 1, tau = 4)
    expected = _np_ce(s, y).mean() + 2.0 * _np_dist_reference(s, t, 1.0, 1.0, 4.0)
    np.testing.assert_allclose(objective, expected, rtol=1e-5)
    assert set(out.batch_terms) == {"dist_intra"}


def test_hinton_kd_ls_recipe_and_standardised_methods_refuse_top_k_caches():
    from jaxkd.core import as_loss_output
    from jaxkd.methods import build_recipe
    s, t, y = _rand(5)
    r = build_recipe({"name": "hinton_kd_ls"}, "test")
    out = as_loss_output(r.loss(_recipe_inputs(s, t, y)))
    zs, zt = _np_standardize(s), _np_standardize(t)
    kd = 4.0 * _np_kl(_np_softmax(zt / 2.0), _np_softmax(zs / 2.0))  # T = 2, times T^2
    np.testing.assert_allclose(np.asarray(out.per_example), 0.1 * _np_ce(s, y) + 9.0 * kd, rtol=1e-4, atol=1e-5)
    # no softmax-at-T of the raw teacher logits: undeclared, which a top-k cache refuses
    assert r.teacher_temperature is None
    assert build_recipe({"name": "dkd", "standardize": True}, "test").teacher_temperature is None
    assert build_recipe({"name": "dist", "standardize": True}, "test").teacher_temperature is None
