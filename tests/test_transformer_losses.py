"""Self-attention KD losses (TinyBERT, MiniLM, MiniLMv2) in jaxkd.losses.transformer.

Each loss is checked against its formula written out independently in float64 numpy (loops
over examples, padded positions removed by slicing rather than masking), with and without
padding in every mode, for error messages, gradients, and on the taps of a tiny transformer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import losses
from jaxkd.models import create_model
from jaxkd.models.transformer import MASK_VALUE

RTOL, ATOL = 2e-5, 1e-6
B, H, L = 3, 2, 5
# example 0 all real, example 1 right-padded, example 2 padded in the middle and at the end
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0]], np.float32)


def rand(*shape, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def masked_scores(seed):
    """Attention scores as the model returns them: BERT's -10000 added at padded keys."""
    bias = np.where(MASK > 0, 0.0, MASK_VALUE)[:, None, None, :]
    return (rand(B, H, L, L, seed=seed, scale=2.0) + bias).astype(np.float32)


def np_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def real_index(mask, b):
    return np.flatnonzero(np.ones(L) if mask is None else mask[b])


# ----------------------------------------------------------------------------- numpy references

def np_tinybert_attention(s, t, mask, mode):
    s, t = np.float64(s), np.float64(t)
    out = []
    for b in range(s.shape[0]):
        if mode == "reference":
            sb, tb = s[b].copy(), t[b].copy()
            sb[sb <= -100] = 0.0
            tb[tb <= -100] = 0.0
            if mask is not None:
                sb[:, :, mask[b] == 0] = 0.0
                tb[:, :, mask[b] == 0] = 0.0
            out.append(np.mean((sb - tb) ** 2))
        else:
            i = real_index(mask, b)
            out.append(np.mean((s[b][:, i][:, :, i] - t[b][:, i][:, :, i]) ** 2))
    return np.array(out)


def np_tinybert_hidden(s, t, mask, mode):
    s, t = np.float64(s), np.float64(t)
    if mode == "reference":
        return ((s - t) ** 2).mean(axis=(1, 2))
    return np.array([np.mean((s[b, real_index(mask, b)] - t[b, real_index(mask, b)]) ** 2)
                     for b in range(s.shape[0])])


def np_prediction(s, t, temperature, mode):
    p_t = np_softmax(np.float64(t) / temperature)
    loss = -(p_t * np_log_softmax(np.float64(s) / temperature)).sum(-1)
    return loss / s.shape[-1] if mode == "reference" else loss


def np_kl_mean(p_t, p_s):
    """Mean over heads and rows of KL(p_t || p_s); ``[H, n, n]`` distributions over n keys."""
    kl = np.where(p_t > 0, p_t * (np.log(np.where(p_t > 0, p_t, 1.0)) - np.log(p_s)), 0.0)
    return kl.sum(-1).mean()


def np_attention_kl(ps, pt, mask):
    out = []
    for b in range(ps.shape[0]):
        i = real_index(mask, b)
        out.append(np_kl_mean(np.float64(pt[b][:, i][:, :, i]), np.float64(ps[b][:, i][:, :, i])))
    return np.array(out)


def np_relation(x, y):
    """softmax(x y^T / sqrt(d)) for ``[H, n, d]`` inputs."""
    return np_softmax(np.einsum("hqd,hkd->hqk", x, y) / np.sqrt(x.shape[-1]))


def np_value_relation(vs, vt, mask):
    out = []
    for b in range(vs.shape[0]):
        i = real_index(mask, b)
        xs, xt = np.float64(vs[b][:, i]), np.float64(vt[b][:, i])
        out.append(np_kl_mean(np_relation(xt, xt), np_relation(xs, xs)))
    return np.array(out)


def np_v2(s_qkv, t_qkv, r, mask, relations):
    def regroup(x):  # [B, H, L, d] -> [B, R, L, H*d/R] via concat heads then split
        bb, hh, ll, dd = x.shape
        flat = np.float64(x).transpose(0, 2, 1, 3).reshape(bb, ll, hh * dd)
        return np.stack([flat[:, :, j * (hh * dd // r):(j + 1) * (hh * dd // r)]
                         for j in range(r)], axis=1)

    s = dict(zip("qkv", map(regroup, s_qkv)))
    t = dict(zip("qkv", map(regroup, t_qkv)))
    out = np.zeros(s_qkv[0].shape[0])
    for rel in relations:
        for b in range(len(out)):
            i = real_index(mask, b)
            rt = np_relation(t[rel[0]][b][:, i], t[rel[1]][b][:, i])
            rs = np_relation(s[rel[0]][b][:, i], s[rel[1]][b][:, i])
            out[b] += np_kl_mean(rt, rs)
    return out


def probs_from(scores):
    return np_softmax(np.float64(scores)).astype(np.float32)


# ----------------------------------------------------------------------------- layer map

def test_uniform_layer_map():
    assert losses.uniform_layer_map(3, 6) == [1, 3, 5]
    assert losses.uniform_layer_map(3, 6, one_based=True) == [2, 4, 6]
    assert losses.uniform_layer_map(2, 6, one_based=True) == [3, 6]
    assert losses.uniform_layer_map(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="divisible"):
        losses.uniform_layer_map(4, 6)
    with pytest.raises(ValueError, match="num_student_layers must be a positive int"):
        losses.uniform_layer_map(0, 6)


# ----------------------------------------------------------------------------- TinyBERT

@pytest.mark.parametrize("mode", ["masked", "reference"])
@pytest.mark.parametrize("use_mask", [False, True])
def test_tinybert_attention_matches_numpy(mode, use_mask):
    mask = MASK if use_mask else None
    s, t = (masked_scores(1), masked_scores(2)) if use_mask else (rand(B, H, L, L, seed=1),
                                                                  rand(B, H, L, L, seed=2))
    got = losses.tinybert_attention_loss(jnp.asarray(s), jnp.asarray(t), None if mask is None
                                         else jnp.asarray(mask), mode=mode)
    assert got.shape == (B,)
    np.testing.assert_allclose(got, np_tinybert_attention(s, t, mask, mode), rtol=RTOL, atol=ATOL)


def test_tinybert_attention_modes_on_padding():
    s, t = masked_scores(1), masked_scores(2)
    # reference without a mask: the -10000 scores are found by the official threshold alone
    ref_nomask = losses.tinybert_attention_loss(s, t, mode="reference")
    np.testing.assert_allclose(ref_nomask, losses.tinybert_attention_loss(s, t, MASK, "reference"),
                               rtol=RTOL)
    # ... and with a mask, the padded keys of unbiased scores are zeroed too: the same value
    raw_s, raw_t = rand(B, H, L, L, seed=1, scale=2.0), rand(B, H, L, L, seed=2, scale=2.0)
    np.testing.assert_allclose(losses.tinybert_attention_loss(raw_s, raw_t, MASK, "reference"),
                               ref_nomask, rtol=RTOL)
    # masked mode: a right-padded example scores as its unpadded version
    masked = losses.tinybert_attention_loss(s, t, MASK)
    short = losses.tinybert_attention_loss(s[1:2, :, :3, :3], t[1:2, :, :3, :3])
    np.testing.assert_allclose(masked[1], short[0], rtol=RTOL)
    # reference keeps padded rows (and zeroed padded keys) in the mean: differs
    assert not np.allclose(masked[1], ref_nomask[1])
    np.testing.assert_allclose(losses.tinybert_attention_loss(s, s, MASK), 0.0, atol=0)


def test_tinybert_attention_errors():
    a = jnp.zeros((B, H, L, L))
    with pytest.raises(ValueError, match="same number of heads"):
        losses.tinybert_attention_loss(a, jnp.zeros((B, H + 1, L, L)))
    with pytest.raises(ValueError, match="student_scores must have rank 4"):
        losses.tinybert_attention_loss(jnp.zeros((B, L, L)), a)
    with pytest.raises(TypeError, match="teacher_scores must be a floating-point array"):
        losses.tinybert_attention_loss(a, jnp.zeros((B, H, L, L), jnp.int32))
    with pytest.raises(ValueError, match=r"mask must have shape \[B, L\] = \[3, 5\]"):
        losses.tinybert_attention_loss(a, a, jnp.ones((B, L + 1)))
    with pytest.raises(ValueError, match="unknown tinybert_attention_loss mode 'official'"):
        losses.tinybert_attention_loss(a, a, mode="official")


@pytest.mark.parametrize("mode", ["masked", "reference"])
@pytest.mark.parametrize("use_mask", [False, True])
def test_tinybert_hidden_matches_numpy(mode, use_mask):
    mask = MASK if use_mask else None
    s, t = rand(B, L, 6, seed=3), rand(B, L, 6, seed=4)
    got = losses.tinybert_hidden_loss(s, t, mask, mode=mode)
    assert got.shape == (B,)
    np.testing.assert_allclose(got, np_tinybert_hidden(s, t, mask, mode), rtol=RTOL, atol=ATOL)


def test_tinybert_hidden_errors():
    with pytest.raises(ValueError, match="student_hidden_projected and teacher_hidden must have "
                                         "the same shape .project"):
        losses.tinybert_hidden_loss(jnp.zeros((B, L, 4)), jnp.zeros((B, L, 6)))
    with pytest.raises(ValueError, match=r"teacher_hidden must have rank 3 \[B, L, D\]"):
        losses.tinybert_hidden_loss(jnp.zeros((B, L, 4)), jnp.zeros((B, L * 4)))
    with pytest.raises(ValueError, match="unknown tinybert_hidden_loss mode"):
        losses.tinybert_hidden_loss(jnp.zeros((B, L, 4)), jnp.zeros((B, L, 4)), mode="mean")


@pytest.mark.parametrize("mode", ["soft_ce", "reference"])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_tinybert_prediction_matches_numpy(mode, temperature):
    s, t = rand(B, 7, seed=5, scale=3.0), rand(B, 7, seed=6, scale=3.0)
    got = losses.tinybert_prediction_loss(s, t, temperature, mode)
    np.testing.assert_allclose(got, np_prediction(s, t, temperature, mode), rtol=RTOL, atol=ATOL)


def test_tinybert_prediction_errors():
    with pytest.raises(ValueError, match="same shape"):
        losses.tinybert_prediction_loss(jnp.zeros((B, 4)), jnp.zeros((B, 5)))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        losses.tinybert_prediction_loss(jnp.zeros((B, 4)), jnp.zeros((B, 4)), 0.0)
    with pytest.raises(ValueError, match="unknown tinybert_prediction_loss mode 'kl'"):
        losses.tinybert_prediction_loss(jnp.zeros((B, 4)), jnp.zeros((B, 4)), mode="kl")


# ----------------------------------------------------------------------------- MiniLM

@pytest.mark.parametrize("use_mask", [False, True])
def test_minilm_attention_kl_matches_numpy(use_mask):
    mask = MASK if use_mask else None
    if use_mask:
        ps, pt = probs_from(masked_scores(7)), probs_from(masked_scores(8))
        assert (ps[:, :, :, 3:][1] == 0).all()  # padded keys carry zero probability
    else:
        ps, pt = probs_from(rand(B, H, L, L, seed=7)), probs_from(rand(B, H, L, L, seed=8))
    got = losses.minilm_attention_kl(ps, pt, mask)
    np.testing.assert_allclose(got, np_attention_kl(ps, pt, mask), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(losses.minilm_attention_kl(pt, pt, mask), 0.0, atol=1e-6)


def test_minilm_attention_kl_errors():
    p = jnp.full((B, H, L, L), 1.0 / L)
    with pytest.raises(ValueError, match="student_probs and teacher_probs must have the same "
                                         "number of heads"):
        losses.minilm_attention_kl(p, jnp.full((B, H * 2, L, L), 1.0 / L))
    with pytest.raises(ValueError, match="student_probs must be square"):
        losses.minilm_attention_kl(p[..., :3], p[..., :3])


@pytest.mark.parametrize("use_mask", [False, True])
def test_minilm_value_relation_matches_numpy(use_mask):
    mask = MASK if use_mask else None
    vs, vt = rand(B, H, L, 3, seed=9), rand(B, H, L, 8, seed=10)  # head sizes differ
    got = losses.minilm_value_relation(vs, vt, mask)
    np.testing.assert_allclose(got, np_value_relation(vs, vt, mask), rtol=RTOL, atol=ATOL)
    if use_mask:  # a right-padded example scores as its unpadded version
        short = losses.minilm_value_relation(vs[1:2, :, :3], vt[1:2, :, :3])
        np.testing.assert_allclose(got[1], short[0], rtol=RTOL)


def test_minilm_value_relation_errors():
    with pytest.raises(ValueError, match="student_v and teacher_v must have the same number of heads"):
        losses.minilm_value_relation(jnp.zeros((B, 2, L, 4)), jnp.zeros((B, 4, L, 2)))
    with pytest.raises(ValueError, match="same batch size, head count and length"):
        losses.minilm_value_relation(jnp.zeros((B, 2, L, 4)), jnp.zeros((B, 2, L + 1, 4)))
    with pytest.raises(ValueError, match=r"student_v must have rank 4 \[B, H, L, d_h\]"):
        losses.minilm_value_relation(jnp.zeros((B, L, 4)), jnp.zeros((B, 2, L, 4)))


def v2_inputs():
    s = tuple(rand(B, 2, L, 6, seed=20 + j) for j in range(3))   # student: 2 heads x 6 = 12
    t = tuple(rand(B, 4, L, 4, seed=30 + j) for j in range(3))   # teacher: 4 heads x 4 = 16
    return s, t


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("relations", [("qq", "kk", "vv"), ("vv",), ("qk", "vv")])
def test_minilm_v2_matches_numpy(use_mask, relations):
    mask = MASK if use_mask else None
    s, t = v2_inputs()
    got = losses.minilm_v2_relations(s, t, 4, mask, relations)
    np.testing.assert_allclose(got, np_v2(s, t, 4, mask, relations), rtol=RTOL, atol=ATOL)


def test_minilm_v2_relations_sum_and_one_head_value_relation():
    s, t = v2_inputs()
    total = losses.minilm_v2_relations(s, t, 2, MASK)
    parts = sum(losses.minilm_v2_relations(s, t, 2, MASK, (r,)) for r in ("qq", "kk", "vv"))
    np.testing.assert_allclose(total, parts, rtol=RTOL)
    # with as many relation heads as the models' heads, "vv" is MiniLM's value relation
    s1 = tuple(x[:, :, :, :4] for x in s)
    t1 = tuple(x[:, :2] for x in t)
    np.testing.assert_allclose(losses.minilm_v2_relations(s1, t1, 2, MASK, ("vv",)),
                               losses.minilm_value_relation(s1[2], t1[2], MASK), rtol=RTOL)


def test_minilm_v2_errors():
    s, t = v2_inputs()
    with pytest.raises(ValueError, match=r"num_relation_heads=5 must divide .* of student_qkv\[0\]"):
        losses.minilm_v2_relations(s, t, 5)
    with pytest.raises(ValueError, match=r"num_relation_heads=3 must divide .* of teacher_qkv\[0\]"):
        losses.minilm_v2_relations(s, t, 3)
    with pytest.raises(TypeError, match=r"student_qkv must be a sequence \(q, k, v\)"):
        losses.minilm_v2_relations(s[:2], t, 4)
    with pytest.raises(ValueError, match="each relation must be two letters"):
        losses.minilm_v2_relations(s, t, 4, relations=("qv", "xx"))
    with pytest.raises(ValueError, match="must not repeat"):
        losses.minilm_v2_relations(s, t, 4, relations=("qq", "qq"))
    with pytest.raises(ValueError, match="same batch size and length"):
        losses.minilm_v2_relations(s, tuple(x[:, :, :4] for x in t), 4)
    with pytest.raises(ValueError, match=r"teacher_qkv\[1\] and teacher_qkv\[0\] must have the same shape"):
        losses.minilm_v2_relations(s, (t[0], t[1][..., :2], t[2]), 4)


# ----------------------------------------------------------------------------- gradients

GRAD_CASES = {
    "attention_masked": (lambda s, t: losses.tinybert_attention_loss(s, t, MASK), "scores"),
    "attention_reference": (lambda s, t: losses.tinybert_attention_loss(s, t, MASK, "reference"),
                            "scores"),
    "hidden_masked": (lambda s, t: losses.tinybert_hidden_loss(s, t, MASK), "hidden"),
    "hidden_reference": (lambda s, t: losses.tinybert_hidden_loss(s, t, MASK, "reference"),
                         "hidden"),
    "prediction": (lambda s, t: losses.tinybert_prediction_loss(s, t, 2.0), "logits"),
    "prediction_reference": (lambda s, t: losses.tinybert_prediction_loss(s, t, 2.0, "reference"),
                             "logits"),
    "attention_kl": (lambda s, t: losses.minilm_attention_kl(jax.nn.softmax(s), jax.nn.softmax(t),
                                                             MASK), "scores"),
    "value_relation": (lambda s, t: losses.minilm_value_relation(s, t, MASK), "v"),
    "v2": (lambda s, t: losses.minilm_v2_relations((s, s * 0.5, s * 2.0), (t, t, t), 2, MASK),
           "v"),
}
GRAD_INPUTS = {"scores": lambda seed: masked_scores(seed), "hidden": lambda seed: rand(B, L, 6, seed=seed),
               "logits": lambda seed: rand(B, 7, seed=seed), "v": lambda seed: rand(B, H, L, 4, seed=seed)}


@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_gradients_finite_and_nonzero(case):
    fn, kind = GRAD_CASES[case]
    s, t = jnp.asarray(GRAD_INPUTS[kind](11)), jnp.asarray(GRAD_INPUTS[kind](12))
    g_s, g_t = jax.jit(jax.grad(lambda s, t: jnp.mean(fn(s, t)), argnums=(0, 1)))(s, t)
    assert np.isfinite(np.asarray(g_s)).all()
    assert np.abs(np.asarray(g_s)).max() > 0
    np.testing.assert_array_equal(g_t, 0.0)  # the teacher is not differentiated


# ----------------------------------------------------------------------------- with the models

def test_losses_on_transformer_taps():
    """A 1-layer student and a 2-layer teacher (different widths, same heads) on padded ids."""
    kw = dict(vocab_size=11, max_len=8, pool="cls")
    student = create_model("transformer", 3, num_layers=1, dim=8, num_heads=2, **kw)
    teacher = create_model("transformer", 3, num_layers=2, dim=12, num_heads=2, **kw)
    ids = jnp.asarray([[3, 4, 5, 6, 0, 0], [7, 8, 0, 0, 0, 0]], jnp.int32)

    def variables(fns, seed):
        rng = np.random.default_rng(seed)
        shapes = jax.eval_shape(fns.init, jax.random.key(0), ids)
        return jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype), shapes)

    t_feats = teacher.apply(variables(teacher, 1), ids, False)[1]
    s_vars = variables(student, 2)
    (j,) = losses.uniform_layer_map(1, 2)
    assert j == 1

    def loss(params):
        _, f, _ = student.apply({"params": params}, ids, False)
        mask = f["token_mask"]
        att = losses.tinybert_attention_loss(f["layer0/attn_scores"], t_feats[f"layer{j}/attn_scores"],
                                             mask)
        kl = losses.minilm_attention_kl(f["layer0/attn_probs"], t_feats[f"layer{j}/attn_probs"], mask)
        vr = losses.minilm_value_relation(f["layer0/v"], t_feats[f"layer{j}/v"], mask)
        v2 = losses.minilm_v2_relations(
            tuple(f[f"layer0/{n}"] for n in "qkv"), tuple(t_feats[f"layer{j}/{n}"] for n in "qkv"),
            4, mask)
        return jnp.mean(att + kl + vr + v2)

    value, grads = jax.jit(jax.value_and_grad(loss))(s_vars["params"])
    assert np.isfinite(float(value)) and float(value) > 0
    leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(g).all() for g in leaves)
    assert np.abs(np.asarray(grads["block0"]["attn"]["query"]["kernel"])).max() > 0
