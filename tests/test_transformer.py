"""The transformer encoder (jaxkd.models.transformer) and its registry entries.

Taps are checked against numpy recomputations (float64) on tiny models; the named sizes are
checked by shape only (``jax.eval_shape``), plus one real forward pass of ``vit_student``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd.models import count_params, create_model, list_models
from jaxkd.models.transformer import MASK_VALUE, Transformer

NAMED = {"teacher": (6, 256, 8), "student": (3, 128, 8), "student2": (2, 128, 8)}
VOCAB, PAD = 20, 0


def tiny_tokens(pool="cls", **kw):
    return create_model("transformer", 5, num_layers=2, dim=16, num_heads=2, vocab_size=VOCAB,
                        max_len=12, pool=pool, **kw)


def padded_ids():
    """Two right-padded sequences of length 7 (5 and 3 real tokens, ids 1..VOCAB-1)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, (2, 7)).astype(np.int32)
    ids[0, 5:] = PAD
    ids[1, 3:] = PAD
    return jnp.asarray(ids)


def np_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def expected_taps(batch, length, dim, heads, layers, num_classes):
    d_h = dim // heads
    shapes = {"embeddings": (batch, length, dim), "token_mask": (batch, length),
              "embedding": (batch, dim), "logits": (batch, num_classes)}
    for i in range(layers):
        shapes[f"layer{i}/hidden"] = (batch, length, dim)
        shapes[f"layer{i}/attn_scores"] = (batch, heads, length, length)
        shapes[f"layer{i}/attn_probs"] = (batch, heads, length, length)
        for n in "qkv":
            shapes[f"layer{i}/{n}"] = (batch, heads, length, d_h)
    return shapes


def expected_params(layers, dim, num_classes, embed, positions, cls, mlp=None):
    """Parameter count by formula: ``embed`` = the input projection's count."""
    mlp = mlp or 4 * dim
    block = 2 * 2 * dim + 4 * (dim * dim + dim) + (dim * mlp + mlp) + (mlp * dim + dim)
    return (embed + positions * dim + (dim if cls else 0) + layers * block + 2 * dim
            + dim * num_classes + num_classes)


def random_variables(fns, x, seed=0):
    """Variables of ``fns`` for input ``x`` with numpy random values (shapes from
    ``jax.eval_shape(fns.init)``): no RNG kernels to compile, which keeps the tests fast."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(fns.init, jax.random.key(0), x)
    return jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype), shapes)


def run(fns, variables, x, train=False, rng=None):
    """``fns.apply`` under ``jit`` (one compile instead of one per primitive)."""
    return jax.jit(fns.apply, static_argnums=2)(variables, x, train, rng)


def abstract_run(fns, x):
    variables = jax.eval_shape(fns.init, jax.random.key(0), x)
    out = jax.eval_shape(lambda v, x: fns.apply(v, x, False), variables, x)
    return variables, out


# ----------------------------------------------------------------------------- registry

def test_named_models_are_registered():
    for kind in ("vit", "seq"):
        for size in NAMED:
            assert f"{kind}_{size}" in list_models()
    assert "transformer" in list_models()


def test_vit_student_taps_on_fashion_mnist_shape():
    fns = create_model("vit_student", 10)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 28, 28, 1)), jnp.float32)
    variables = random_variables(fns, x, 0)
    logits, feats, state = run(fns, variables, x)
    assert state == {}
    # patch (4, 4): 7 * 7 = 49 patches + [CLS]
    want = expected_taps(2, 50, 128, 8, 3, 10)
    assert {k: tuple(v.shape) for k, v in feats.items()} == want
    assert np.isfinite(np.asarray(logits)).all()
    np.testing.assert_array_equal(feats["token_mask"], np.ones((2, 50)))
    np.testing.assert_allclose(np.asarray(feats["layer2/attn_probs"]).sum(-1), 1.0, rtol=1e-5)


def test_seq_student_taps_on_token_ids():
    fns = create_model("seq_student", 4, vocab_size=30)
    ids = jnp.zeros((2, 40), jnp.int32)
    _, (logits, feats, _) = abstract_run(fns, ids)
    assert {k: tuple(v.shape) for k, v in feats.items()} == expected_taps(2, 41, 128, 8, 3, 4)
    assert logits.dtype == jnp.float32


@pytest.mark.parametrize("size", sorted(NAMED))
def test_named_param_counts(size):
    layers, dim, heads = NAMED[size]
    vit, _ = abstract_run(create_model(f"vit_{size}", 10), jnp.zeros((2, 28, 28, 1)))
    assert count_params(vit["params"]) == expected_params(
        layers, dim, 10, embed=16 * dim + dim, positions=49, cls=True)
    vit7, _ = abstract_run(create_model(f"vit_{size}", 10, patch_size=(7, 7), pool="mean"),
                           jnp.zeros((2, 28, 28, 1)))
    assert count_params(vit7["params"]) == expected_params(
        layers, dim, 10, embed=49 * dim + dim, positions=16, cls=False)
    seq, _ = abstract_run(create_model(f"seq_{size}", 10, vocab_size=100),
                          jnp.zeros((2, 40), jnp.int32))
    assert count_params(seq["params"]) == expected_params(
        layers, dim, 10, embed=100 * dim, positions=128, cls=True)


def test_registry_kwargs_errors():
    with pytest.raises(ValueError, match="requires keyword argument.*vocab_size"):
        create_model("seq_student", 10)
    with pytest.raises(ValueError, match="unexpected keyword argument.*num_layers"):
        create_model("vit_student", 10, num_layers=4)
    with pytest.raises(ValueError, match="exactly one of patch_size"):
        create_model("transformer", 10, num_layers=1, dim=8, num_heads=2)
    with pytest.raises(ValueError, match="exactly one of patch_size"):
        create_model("transformer", 10, num_layers=1, dim=8, num_heads=2, patch_size=(4, 4),
                     vocab_size=10)
    with pytest.raises(ValueError, match="max_len and pad_id are options of token models"):
        create_model("transformer", 10, num_layers=1, dim=8, num_heads=2, patch_size=4,
                     max_len=16)
    with pytest.raises(ValueError, match="num_heads must divide dim"):
        create_model("transformer", 10, num_layers=1, dim=10, num_heads=3, patch_size=4)
    with pytest.raises(ValueError, match="pool must be one of"):
        create_model("transformer", 10, num_layers=1, dim=8, num_heads=2, patch_size=4,
                     pool="max")
    with pytest.raises(ValueError, match="pad_id must be an int in"):
        create_model("transformer", 10, num_layers=1, dim=8, num_heads=2, vocab_size=5,
                     pad_id=5)
    with pytest.raises(ValueError, match="patch_size must be a pair"):
        create_model("transformer", 10, num_layers=1, dim=8, num_heads=2, patch_size=(4, 0))


def test_wrong_input_kind_errors():
    patch = create_model("transformer", 3, num_layers=1, dim=8, num_heads=2, patch_size=(2, 2))
    tokens = tiny_tokens()
    with pytest.raises(ValueError, match="patch model.*float images"):
        patch.init(jax.random.key(0), jnp.zeros((2, 8), jnp.int32))
    with pytest.raises(ValueError, match="patch model.*float images"):
        patch.init(jax.random.key(0), jnp.zeros((2, 4, 4, 1), jnp.int32))
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        patch.init(jax.random.key(0), jnp.zeros((2, 5, 4, 1)))
    with pytest.raises(ValueError, match="token model.*integer token ids"):
        tokens.init(jax.random.key(0), jnp.zeros((2, 4, 4, 1)))
    with pytest.raises(ValueError, match="token model.*integer token ids"):
        tokens.init(jax.random.key(0), jnp.zeros((2, 6)))
    with pytest.raises(ValueError, match="exceeds max_len=12"):
        tokens.init(jax.random.key(0), jnp.ones((2, 13), jnp.int32))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, vocab_size=20\)"):
        tokens.init(jax.random.key(0), jnp.full((2, 6), VOCAB, jnp.int32))


# ----------------------------------------------------------------------------- taps

@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_attention_taps_recomputed_in_numpy(pool):
    fns = tiny_tokens(pool)
    ids = padded_ids()
    variables = random_variables(fns, ids, 1)
    _, feats, _ = run(fns, variables, ids)
    f = {k: np.asarray(v, np.float64) for k, v in feats.items()}
    real = np.asarray(ids) != PAD
    if pool == "cls":
        real = np.concatenate([np.ones((2, 1), bool), real], axis=1)
    np.testing.assert_array_equal(f["token_mask"], real.astype(np.float64))
    bias = np.where(real, 0.0, MASK_VALUE)[:, None, None, :]
    for i in range(2):
        q, k = f[f"layer{i}/q"], f[f"layer{i}/k"]
        scores = np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1]) + bias
        np.testing.assert_allclose(f[f"layer{i}/attn_scores"], scores, rtol=1e-5, atol=1e-4)
        probs = np_softmax(f[f"layer{i}/attn_scores"])
        np.testing.assert_allclose(f[f"layer{i}/attn_probs"], probs, rtol=1e-5, atol=1e-7)
        # padded keys get no attention at all
        assert (f[f"layer{i}/attn_probs"][np.broadcast_to(~real[:, None, None, :],
                                                          probs.shape)] == 0).all()


def test_embeddings_tap_and_head_recomputed():
    fns = tiny_tokens("mean")
    ids = padded_ids()
    variables = random_variables(fns, ids, 2)
    logits, feats, _ = run(fns, variables, ids)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    emb = p["token_embed"]["embedding"][np.asarray(ids)] + p["pos_embed"][:, :7]
    np.testing.assert_allclose(feats["embeddings"], emb, rtol=1e-6, atol=1e-6)
    # mean pooling: masked mean of LayerNorm(last hidden) over real tokens
    h = np.asarray(feats["layer1/hidden"], np.float64)
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    ln = (h - mu) / np.sqrt(var + 1e-6) * p["encoder_norm"]["scale"] + p["encoder_norm"]["bias"]
    real = (np.asarray(ids) != PAD)[..., None]
    pooled = (ln * real).sum(1) / real.sum(1)
    np.testing.assert_allclose(feats["embedding"], pooled, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits, pooled @ p["head"]["kernel"] + p["head"]["bias"],
                               rtol=1e-4, atol=1e-5)


def test_patch_embedding_order_rows():
    """patch (1, W) = one token per image row: the rows' projections, in order."""
    fns = create_model("transformer", 3, num_layers=1, dim=8, num_heads=2, patch_size=(1, 6),
                       pool="mean")
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 6, 2)), jnp.float32)
    variables = random_variables(fns, x, 0)
    _, feats, _ = run(fns, variables, x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    rows = np.asarray(x, np.float64).reshape(2, 5, 12)
    want = rows @ p["patch_embed"]["kernel"] + p["patch_embed"]["bias"] + p["pos_embed"]
    np.testing.assert_allclose(feats["embeddings"], want, rtol=1e-5, atol=1e-5)
    assert feats["layer0/attn_scores"].shape == (2, 2, 5, 5)


def test_signal_tokens_are_chunks_of_consecutive_samples():
    """A float signal (B, L, C) with patch (p, 1): L / p tokens of p consecutive samples."""
    fns = create_model("transformer", 3, num_layers=1, dim=8, num_heads=2, patch_size=(4, 1),
                       pool="mean")
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 12, 1)), jnp.float32)
    variables = random_variables(fns, x, 0)
    _, feats, _ = run(fns, variables, x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    chunks = np.asarray(x, np.float64).reshape(2, 3, 4)
    want = chunks @ p["patch_embed"]["kernel"] + p["patch_embed"]["bias"] + p["pos_embed"]
    np.testing.assert_allclose(feats["embeddings"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(feats["token_mask"], np.ones((2, 3)))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_more_padding_leaves_logits_unchanged(pool):
    fns = tiny_tokens(pool)
    ids = padded_ids()
    longer = jnp.concatenate([ids, jnp.zeros((2, 4), jnp.int32)], axis=1)
    variables = random_variables(fns, ids, 4)
    a, fa, _ = run(fns, variables, ids)
    b, fb, _ = run(fns, variables, longer)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fa["embedding"], fb["embedding"], rtol=1e-5, atol=1e-6)
    # the real tokens' hidden states do not see the padding either
    n = fa["layer1/hidden"].shape[1]
    real = np.asarray(fa["token_mask"]) > 0
    np.testing.assert_allclose(np.asarray(fa["layer1/hidden"])[real],
                               np.asarray(fb["layer1/hidden"])[:, :n][real], rtol=1e-5, atol=1e-5)


def test_all_padding_sequence_stays_finite():
    fns = tiny_tokens("mean")
    ids = jnp.zeros((2, 5), jnp.int32)
    variables = random_variables(fns, ids, 5)
    logits, feats, _ = run(fns, variables, ids)
    assert np.isfinite(np.asarray(logits)).all()
    assert np.isfinite(np.asarray(feats["layer0/attn_probs"])).all()


def test_dropout_uses_rng_and_bf16_keeps_float32_outputs():
    fns = tiny_tokens(dropout_rate=0.5)
    ids = padded_ids()
    variables = random_variables(fns, ids, 6)
    eval_logits, _, _ = run(fns, variables, ids)
    a, _, _ = run(fns, variables, ids, True, jax.random.key(0))
    b, _, _ = run(fns, variables, ids, True, jax.random.key(1))
    assert not np.allclose(a, b) and not np.allclose(a, eval_logits)
    bf = tiny_tokens(dtype="bfloat16")
    logits, feats, _ = run(bf, variables, ids)
    assert logits.dtype == jnp.float32
    assert feats["layer0/attn_scores"].dtype == jnp.float32
    assert feats["layer0/hidden"].dtype == jnp.bfloat16


def test_module_usable_directly():
    module = Transformer(num_classes=2, num_layers=1, dim=8, num_heads=4, patch_size=(2, 2))
    x = jnp.ones((1, 4, 4, 3))
    variables = module.init(jax.random.key(0), x, train=False)
    logits, feats = module.apply(variables, x, train=False)
    assert logits.shape == (1, 2) and feats["layer0/q"].shape == (1, 4, 5, 2)
