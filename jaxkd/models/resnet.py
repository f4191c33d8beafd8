"""CIFAR ResNets with basic blocks, in the layout of the RepDistiller KD benchmark.

Layout (RepDistiller ``models/resnet.py``; cross-checked against the PyTorch reference in
``shared/bench/torch_ref/models.py``), for ``depth = 6n + 2`` and ``widths = (w0, w1, w2, w3)``::

    stem   : 3x3 conv (w0, no bias) + BN + ReLU                H x W
    stage1 : n basic blocks, w1 channels, stride 1             H x W
    stage2 : n basic blocks, w2 channels, first block stride 2 H/2 x W/2
    stage3 : n basic blocks, w3 channels, first block stride 2 H/4 x W/4
    head   : global average pool -> linear(w3 -> num_classes)

(RepDistiller pools with ``AvgPool2d(8)``, the same thing for 32x32 inputs.)

Basic block: ``relu(bn_b(conv_b(relu(bn_a(conv_a(x))))) + shortcut(x))`` with 3x3 convs;
the shortcut is a strided 1x1 conv + BN when the stride or channel count changes, identity
otherwise. RepDistiller's ``resnet8 ... resnet110`` use widths (16, 16, 32, 64);
``resnet8x4`` / ``resnet32x4`` use (32, 64, 128, 256) (so their first block also has a 1x1
shortcut: 32 -> 64 channels). Parameters for 100 classes: resnet8x4 1,233,540 (1.23 M),
resnet32x4 7,433,860 (7.43 M), equal to the PyTorch models' ``parameters()`` (BN affine
included, running statistics excluded).

Feature taps (RepDistiller's ``is_feat=True`` list, by name): ``stem`` (f0), ``stage1..3``
(f1..f3, block outputs after the final ReLU), ``stage1_pre..stage3_pre`` (``preact=True``:
the last block's residual sum before its ReLU), ``embedding`` (f4, pooled vector), ``logits``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models.layers import (
    batch_norm,
    check_positive_int,
    conv,
    global_avg_pool,
    torch_linear,
)

Array = jax.Array

CIFAR_WIDTHS = (16, 16, 32, 64)
X4_WIDTHS = (32, 64, 128, 256)


def blocks_per_stage(depth: Any) -> int:
    """``n = (depth - 2) / 6`` for a basic-block CIFAR ResNet; ValueError unless depth = 6n+2."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"CIFAR ResNet depth must be of the form 6n + 2 with n >= 1 (8, 14, 20, 32, ...), "
            f"got {depth!r}"
        )
    return (depth - 2) // 6


class BasicBlock(nn.Module):
    """Post-activation basic block; returns ``(relu(sum), sum)`` so callers can tap preact."""

    features: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> tuple[Array, Array]:
        h = conv(self.features, 3, self.stride, self.dtype, "conv_a")(x)
        h = nn.relu(batch_norm(train, self.dtype, "bn_a")(h))
        h = conv(self.features, 3, 1, self.dtype, "conv_b")(h)
        h = batch_norm(train, self.dtype, "bn_b")(h)
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = conv(self.features, 1, self.stride, self.dtype, "shortcut_conv")(x)
            shortcut = batch_norm(train, self.dtype, "shortcut_bn")(shortcut)
        else:
            shortcut = x
        preact = h + shortcut
        return nn.relu(preact), preact


class CifarResNet(nn.Module):
    """CIFAR ResNet (RepDistiller layout, see the module docstring).

    Attributes:
      num_classes: classifier outputs.
      depth: 6n + 2.
      widths: (stem, stage1, stage2, stage3) channels.
      dtype: computation dtype (parameters stay float32; logits are returned as float32).
    """

    num_classes: int
    depth: int
    widths: tuple[int, int, int, int] = CIFAR_WIDTHS
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        check_positive_int(self.num_classes, "num_classes")
        blocks_per_stage(self.depth)
        if len(self.widths) != 4:
            raise ValueError(f"widths must have 4 entries (stem + 3 stages), got {self.widths!r}")
        for w in self.widths:
            check_positive_int(w, "every width")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, train: bool) -> tuple[Array, dict[str, Array]]:
        n = blocks_per_stage(self.depth)
        features: dict[str, Array] = {}
        x = jnp.asarray(x, self.dtype)
        x = conv(self.widths[0], 3, 1, self.dtype, "stem_conv")(x)
        x = nn.relu(batch_norm(train, self.dtype, "stem_bn")(x))
        features["stem"] = x
        for stage, (width, stride) in enumerate(zip(self.widths[1:], (1, 2, 2)), start=1):
            for i in range(n):
                block = BasicBlock(
                    width, stride if i == 0 else 1, self.dtype, name=f"stage{stage}_block{i}"
                )
                x, preact = block(x, train)
            features[f"stage{stage}"] = x
            features[f"stage{stage}_pre"] = preact
        embedding = global_avg_pool(x)
        features["embedding"] = embedding
        logits = torch_linear(self.num_classes, self.widths[3], self.dtype, "fc", False)(embedding)
        logits = logits.astype(jnp.float32)
        features["logits"] = logits
        return logits, features


__all__ = ["CIFAR_WIDTHS", "X4_WIDTHS", "BasicBlock", "CifarResNet", "blocks_per_stage"]
