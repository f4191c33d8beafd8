"""Wide ResNets (pre-activation) in the layout of the RepDistiller KD benchmark.

Layout (RepDistiller ``models/wrn.py``, after Zagoruyko & Komodakis), for
``depth = 6n + 4`` and widen factor ``k``::

    stem   : 3x3 conv (16, no bias), no BN / ReLU (the blocks pre-activate)  H x W
    stage1 : n blocks, 16k channels, stride 1                               H x W
    stage2 : n blocks, 32k channels, first block stride 2                   H/2 x W/2
    stage3 : n blocks, 64k channels, first block stride 2                   H/4 x W/4
    head   : BN + ReLU -> global average pool -> linear(64k -> num_classes)

Block (``in -> out`` channels): ``a = relu(bn1(x))``; ``h = conv2(dropout(relu(bn2(conv1(a)))))``
with 3x3 convs, ``conv1`` strided; the output is ``x + h`` when ``in == out`` and
``shortcut_conv(a) + h`` (strided 1x1 conv of the *activated* input) otherwise.
Init as RepDistiller: convs Kaiming-normal (fan_out), BN scale 1 / bias 0, linear bias 0 and
PyTorch's default linear weight. Dropout (``dropout_rate``, default 0) needs the ``rng``
argument of ``apply`` in train mode.

Feature taps, matching RepDistiller's ``is_feat=True`` list by position:

- ``stem``: the stem conv output (f0; no activation in a pre-activation network).
- ``stage1..3``: the raw stage outputs, i.e. the residual stream *before* any BN/ReLU (f1..f3
  with ``preact=False``). In a pre-activation network nothing activates a stage's output
  until the next layer does, so this is the WRN meaning of "stage output".
- ``stage1_pre..stage3_pre``: RepDistiller's ``preact=True`` features: the stage output after
  the BatchNorm that the next layer applies to it (``bn1`` of the next stage's first block;
  the head BN for stage3), before that layer's ReLU. jaxkd takes these from the forward pass
  itself; RepDistiller calls those BN layers a second time, which in train mode updates their
  running statistics twice per step.
- ``embedding``: the pooled vector after the head BN + ReLU (f4); ``logits``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models.layers import (
    batch_norm,
    check_positive_int,
    check_rate,
    conv,
    global_avg_pool,
    torch_linear,
)

Array = jax.Array


def wrn_blocks_per_stage(depth: Any) -> int:
    """``n = (depth - 4) / 6`` for a WRN; ValueError unless depth = 6n + 4 with n >= 1."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(
            f"WRN depth must be of the form 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), "
            f"got {depth!r}"
        )
    return (depth - 4) // 6


class WideBasicBlock(nn.Module):
    """Pre-activation wide block; returns ``(output, bn1(x))`` so callers can tap preact."""

    features: int
    stride: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> tuple[Array, Array]:
        equal_in_out = x.shape[-1] == self.features
        if equal_in_out and self.stride != 1:
            raise ValueError("a WRN block with equal in/out channels must have stride 1")
        preact = batch_norm(train, self.dtype, "bn1")(x)
        a = nn.relu(preact)
        h = conv(self.features, 3, self.stride, self.dtype, "conv1")(a)
        h = nn.relu(batch_norm(train, self.dtype, "bn2")(h))
        h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
        h = conv(self.features, 3, 1, self.dtype, "conv2")(h)
        if equal_in_out:
            shortcut = x
        else:
            shortcut = conv(self.features, 1, self.stride, self.dtype, "shortcut_conv")(a)
        return shortcut + h, preact


class WideResNet(nn.Module):
    """Wide ResNet WRN-depth-k (RepDistiller layout, see the module docstring).

    Attributes:
      num_classes: classifier outputs.
      depth: 6n + 4.
      widen_factor: k; stage widths are (16k, 32k, 64k).
      dropout_rate: dropout between the two convs of each block (0 disables it).
      dtype: computation dtype (parameters stay float32; logits are returned as float32).
    """

    num_classes: int
    depth: int
    widen_factor: int = 1
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        check_positive_int(self.num_classes, "num_classes")
        wrn_blocks_per_stage(self.depth)
        check_positive_int(self.widen_factor, "widen_factor")
        check_rate(self.dropout_rate, "dropout_rate")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, train: bool) -> tuple[Array, dict[str, Array]]:
        n = wrn_blocks_per_stage(self.depth)
        k = self.widen_factor
        features: dict[str, Array] = {}
        x = jnp.asarray(x, self.dtype)
        x = conv(16, 3, 1, self.dtype, "stem_conv")(x)
        features["stem"] = x
        for stage, (width, stride) in enumerate(((16 * k, 1), (32 * k, 2), (64 * k, 2)), start=1):
            for i in range(n):
                block = WideBasicBlock(
                    width,
                    stride if i == 0 else 1,
                    self.dropout_rate,
                    self.dtype,
                    name=f"stage{stage}_block{i}",
                )
                x, preact = block(x, train)
                if i == 0 and stage > 1:
                    # bn1 of this block normalises the previous stage's output.
                    features[f"stage{stage - 1}_pre"] = preact
            features[f"stage{stage}"] = x
        preact = batch_norm(train, self.dtype, "head_bn")(x)
        features["stage3_pre"] = preact
        embedding = global_avg_pool(nn.relu(preact))
        features["embedding"] = embedding
        logits = torch_linear(self.num_classes, 64 * k, self.dtype, "fc", True)(embedding)
        logits = logits.astype(jnp.float32)
        features["logits"] = logits
        return logits, features


__all__ = ["WideBasicBlock", "WideResNet", "wrn_blocks_per_stage"]
