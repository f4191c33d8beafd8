"""A small pre-LN transformer encoder (ViT / BERT style) whose attention is open to distillation.

One module, two kinds of input:

* **patch models** (``patch_size=(ph, pw)``) take float images ``(B, H, W, C)``, cut them into
  non-overlapping ``ph x pw`` patches (row-major: left to right, then top to bottom) and project
  each flattened patch linearly to ``dim``. ``H`` and ``W`` must be multiples of ``ph`` and ``pw``.
  For 28x28 images: ``(7, 7)`` gives 16 tokens, ``(4, 4)`` 49, ``(1, 28)`` the 28 rows (an image
  read as a sequence of row tokens). Float signals ``(B, L, C)`` (MNIST-1D: ``(B, 40, 1)``) are
  read as images of width 1: ``patch_size=(p, 1)`` gives ``L / p`` tokens of ``p`` samples each.
  Patch inputs have no padding (every ``token_mask`` entry is 1).
* **token models** (``vocab_size=V``) take integer ids ``(B, L)`` with ``L <= max_len``. Ids equal
  to ``pad_id`` are padding: every query gives them (as keys) the additive score
  :data:`MASK_VALUE` before the softmax (a finite value, so an all-padding row stays finite), and
  ``pool="mean"`` leaves them out. Positions are absolute, so pad on the right (as BERT does):
  then appending more padding leaves the logits unchanged.

Layout (``D = dim``, ``h = num_heads``, ``d_h = D / h``, ``M = mlp_dim``, default ``4 D``)::

    embed  : patch -> Dense(D)   or   id -> Embed(V, D)
             + learned position embedding (one per patch / per position < max_len)
             [CLS] (a learned vector, no position embedding) prepended when pool="cls"
             dropout                                        -> "embeddings" (input of block 0)
    block i: x + dropout(attn(LN(x)))                       (pre-LN, as ViT)
             x + dropout(Dense(D)(dropout(gelu(Dense(M)(LN(x))))))   -> "layer{i}/hidden"
    attn   : q, k, v = Dense(D)(x) each, split into h heads of d_h   -> "layer{i}/q|k|v"
             scores = q k^T / sqrt(d_h) + mask bias (0 or MASK_VALUE at padded keys)
                                                            -> "layer{i}/attn_scores"
             probs = softmax(scores) over keys              -> "layer{i}/attn_probs"
             Dense(D)(concat_heads(probs v))
    head   : LN -> pool ([CLS] token, or masked mean over real tokens) -> "embedding"
             -> Dense(num_classes)                           -> "logits"

Attention scores and probabilities are computed and returned in float32 whatever the compute
``dtype`` (the softmax is the numerically delicate part); everything else runs in ``dtype``,
parameters are float32 and logits come back float32. There is no dropout on the attention
probabilities, so the ``attn_probs`` tap is exactly what multiplies ``v``. Initialisers are
Flax's defaults, except the position embeddings (normal, stddev 0.02) and [CLS] (zeros).

Feature taps returned by ``__call__(x, train) -> (logits, features)``, with ``L`` tokens per
example (patches or ids, plus one for [CLS]):

========================= ================ ===================================================
tap                       shape            meaning
========================= ================ ===================================================
``embeddings``            ``[B, L, D]``    input of block 0 (after position embeddings, [CLS])
``layer{i}/hidden``       ``[B, L, D]``    output of block ``i`` (0-based, the residual stream)
``layer{i}/q|k|v``        ``[B, h, L, d_h]`` per-head queries, keys, values of block ``i``
``layer{i}/attn_scores``  ``[B, h, L, L]`` ``q k^T / sqrt(d_h)`` + mask bias, before softmax
``layer{i}/attn_probs``   ``[B, h, L, L]`` softmax of the scores over the last (key) axis
``token_mask``            ``[B, L]``       float, 1 for real tokens (and [CLS]), 0 for padding
``embedding``             ``[B, D]``       pooled vector after the final LayerNorm
``logits``                ``[B, C]``       classifier output
========================= ================ ===================================================

The layout of patch embedding, pre-LN blocks and learned position embeddings follows
big_vision's ViT (``big_vision/models/vit.py``); the additive mask value and the exposure of the
pre-softmax scores follow BERT as used by TinyBERT (``TinyBERT/transformer/modeling.py``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.models.layers import check_positive_int, check_rate

Array = jax.Array

MASK_VALUE = -10000.0
"""Additive attention score of a padded key (BERT's value, so TinyBERT's ``score <= -100``
test recognises it). ``exp(MASK_VALUE)`` underflows to exactly 0 in float32."""

POOLS: tuple[str, ...] = ("cls", "mean")


class SelfAttention(nn.Module):
    """Multi-head self-attention written out, returning its intermediate values as taps.

    ``__call__(x, bias) -> (out, taps)`` with ``x`` ``[B, L, D]``, ``bias`` broadcastable to
    ``[B, h, L, L]`` (float32, added to the scaled scores) and taps ``q``, ``k``, ``v``,
    ``attn_scores``, ``attn_probs`` (see the module docstring).
    """

    dim: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, bias: Array) -> tuple[Array, dict[str, Array]]:
        b, length, _ = x.shape
        head_dim = self.dim // self.num_heads

        def split_heads(name: str) -> Array:
            y = nn.Dense(self.dim, dtype=self.dtype, name=name)(x)
            return y.reshape(b, length, self.num_heads, head_dim).transpose(0, 2, 1, 3)

        q, k, v = split_heads("query"), split_heads("key"), split_heads("value")
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(head_dim) + bias
        probs = jax.nn.softmax(scores, axis=-1)
        context = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(self.dtype), v)
        context = context.transpose(0, 2, 1, 3).reshape(b, length, self.dim)
        out = nn.Dense(self.dim, dtype=self.dtype, name="out")(context)
        taps = {"q": q, "k": k, "v": v, "attn_scores": scores, "attn_probs": probs}
        return out, taps


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``."""

    dim: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, bias: Array, train: bool) -> tuple[Array, dict[str, Array]]:
        def dropout(y: Array) -> Array:
            return nn.Dropout(self.dropout_rate, deterministic=not train)(y)

        y = nn.LayerNorm(dtype=self.dtype, name="norm1")(x)
        y, taps = SelfAttention(self.dim, self.num_heads, self.dtype, name="attn")(y, bias)
        x = x + dropout(y)
        y = nn.LayerNorm(dtype=self.dtype, name="norm2")(x)
        y = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp_in")(y), approximate=False)
        y = nn.Dense(self.dim, dtype=self.dtype, name="mlp_out")(dropout(y))
        return x + dropout(y), taps


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class Transformer(nn.Module):
    """Pre-LN transformer encoder classifier on patches or tokens (see the module docstring).

    Exactly one of ``patch_size`` (patch model) and ``vocab_size`` (token model) is set.

    Attributes:
      num_classes: classifier outputs.
      num_layers: number of encoder blocks.
      dim: model width ``D``.
      num_heads: attention heads; must divide ``dim``.
      mlp_dim: hidden width of the MLPs; ``None`` means ``4 * dim``.
      patch_size: ``(ph, pw)`` for a patch model.
      vocab_size: number of token ids for a token model.
      max_len: longest token sequence (rows of the position table); token models only.
      pad_id: the padding id, masked in attention and mean pooling; token models only.
      pool: ``"cls"`` (prepend a learned [CLS] token, classify its final state) or ``"mean"``
        (masked mean of the final states over real tokens).
      dropout_rate: dropout after the embeddings, the attention output, inside and after the
        MLP (needs the ``"dropout"`` rng in train mode).
      dtype: computation dtype (parameters stay float32; attention scores/probabilities and
        logits are float32).
    """

    num_classes: int
    num_layers: int
    dim: int
    num_heads: int
    mlp_dim: int | None = None
    patch_size: tuple[int, int] | None = None
    vocab_size: int | None = None
    max_len: int = 128
    pad_id: int = 0
    pool: str = "cls"
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        check_positive_int(self.num_classes, "num_classes")
        check_positive_int(self.num_layers, "num_layers")
        check_positive_int(self.dim, "dim")
        check_positive_int(self.num_heads, "num_heads")
        if self.dim % self.num_heads:
            raise ValueError(
                f"num_heads must divide dim; got dim={self.dim}, num_heads={self.num_heads}")
        if self.mlp_dim is not None:
            check_positive_int(self.mlp_dim, "mlp_dim")
        if (self.patch_size is None) == (self.vocab_size is None):
            raise ValueError(
                "a transformer needs exactly one of patch_size (images) and vocab_size (token "
                f"ids); got patch_size={self.patch_size!r}, vocab_size={self.vocab_size!r}")
        if self.patch_size is not None:
            ps = self.patch_size
            if (isinstance(ps, (str, bytes)) or not isinstance(ps, Sequence) or len(ps) != 2
                    or not all(_is_int(p) and p >= 1 for p in ps)):
                raise ValueError(f"patch_size must be a pair of positive ints (ph, pw); got {ps!r}")
        else:
            check_positive_int(self.vocab_size, "vocab_size")
            check_positive_int(self.max_len, "max_len")
            if not _is_int(self.pad_id) or not 0 <= self.pad_id < self.vocab_size:
                raise ValueError(f"pad_id must be an int in [0, vocab_size={self.vocab_size}); "
                                 f"got {self.pad_id!r}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}; got {self.pool!r}")
        check_rate(self.dropout_rate, "dropout_rate")
        super().__post_init__()

    def _embed_patches(self, x: Array) -> tuple[Array, Array]:
        if x.ndim not in (3, 4) or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                "this transformer is a patch model (patch_size set): it takes float images "
                f"(B, H, W, C) or signals (B, L, C); got shape {tuple(x.shape)}, dtype {x.dtype}")
        if x.ndim == 3:  # a signal (B, L, C) is an image of width 1
            x = x[:, :, None, :]
        b, h, w, c = x.shape
        ph, pw = (int(p) for p in self.patch_size)  # type: ignore[union-attr]
        if h % ph or w % pw:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of patch_size ({ph}, {pw})")
        x = jnp.asarray(x, self.dtype)
        x = x.reshape(b, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, (h // ph) * (w // pw), ph * pw * c)
        x = nn.Dense(self.dim, dtype=self.dtype, name="patch_embed")(x)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, x.shape[1], self.dim))
        return x + pos.astype(self.dtype), jnp.ones(x.shape[:2], jnp.float32)

    def _embed_tokens(self, ids: Array) -> tuple[Array, Array]:
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(
                "this transformer is a token model (vocab_size set): it takes integer token ids "
                f"(B, L); got shape {tuple(ids.shape)}, dtype {ids.dtype}")
        length = ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len={self.max_len}")
        if not isinstance(ids, jax.core.Tracer) and ids.size:
            # an out-of-range id would be silently clipped by the lookup; checkable when the ids
            # are concrete (numpy, not jnp, so a concrete array closed over by a jit works too)
            concrete = np.asarray(ids)
            lo, hi = int(concrete.min()), int(concrete.max())
            if lo < 0 or hi >= self.vocab_size:  # type: ignore[operator]
                raise ValueError(
                    f"token ids must be in [0, vocab_size={self.vocab_size}); got values in "
                    f"[{lo}, {hi}]")
        x = nn.Embed(self.vocab_size, self.dim, dtype=self.dtype, name="token_embed")(ids)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, self.max_len, self.dim))
        mask = (ids != self.pad_id).astype(jnp.float32)
        return x + pos[:, :length].astype(self.dtype), mask

    @nn.compact
    def __call__(self, x: Array, train: bool) -> tuple[Array, dict[str, Array]]:
        x = jnp.asarray(x)
        if self.patch_size is not None:
            x, mask = self._embed_patches(x)
        else:
            x, mask = self._embed_tokens(x)
        if self.pool == "cls":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, self.dim))
            cls = jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, self.dim))
            x = jnp.concatenate([cls, x], axis=1)
            mask = jnp.concatenate([jnp.ones((x.shape[0], 1), jnp.float32), mask], axis=1)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        features: dict[str, Array] = {"token_mask": mask, "embeddings": x}
        bias = ((1.0 - mask) * MASK_VALUE)[:, None, None, :]
        mlp_dim = self.mlp_dim or 4 * self.dim
        for i in range(self.num_layers):
            block = EncoderBlock(self.dim, self.num_heads, mlp_dim, self.dropout_rate, self.dtype,
                                 name=f"block{i}")
            x, taps = block(x, bias, train)
            features[f"layer{i}/hidden"] = x
            for name, value in taps.items():
                features[f"layer{i}/{name}"] = value
        x = nn.LayerNorm(dtype=self.dtype, name="encoder_norm")(x)
        if self.pool == "cls":
            embedding = x[:, 0]
        else:
            weights = mask.astype(x.dtype)[..., None]
            embedding = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        features["embedding"] = embedding
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(embedding)
        logits = logits.astype(jnp.float32)
        features["logits"] = logits
        return logits, features


__all__ = ["MASK_VALUE", "POOLS", "EncoderBlock", "SelfAttention", "Transformer"]
