"""Small models for small inputs: a CNN teacher and an MLP student (jaxkd's own designs).

``SmallCNN`` works on images (B, H, W, C) and on 1-D signals (B, L, C) alike: the conv kernel
rank follows the input rank (kernel ``(3,) * (x.ndim - 2)``); a (B, L) input gets a channel
axis. Layout, ``w = width``::

    stage1 : conv 3 (w, no bias) + BN -> max pool 2 -> ReLU   size / 2
    stage2 : conv 3 (2w, no bias) + BN -> max pool 2 -> ReLU  size / 4
    head   : flatten -> dense(hidden) + ReLU -> dropout -> dense(num_classes)

Pooling before the ReLU gives the same stage output as the usual conv-BN-ReLU-pool (ReLU and
max commute) and lets ``stageN_pre`` tap the pre-activation at the stage's resolution.
Pooling pads to ``ceil(size / 2)``, so odd and size-1 axes work. For 28x28x1 inputs: stage1
14x14xw, stage2 7x7x2w; 8x8x1: 4x4, 2x2; (40, 1) signals: 20, 10.

``MLP``: flatten -> (dense + ReLU) per hidden width -> dropout -> dense(num_classes); any input
shape. Both use Flax's default initialisers.

Feature taps: SmallCNN ``stage1``, ``stage2`` (after ReLU), ``stage1_pre``, ``stage2_pre``
(pooled BN output before the ReLU), ``embedding`` (the hidden dense activations, the
pre-classifier vector), ``logits``; MLP ``hidden1..hiddenK``, ``embedding`` (the last hidden
layer, or the flattened input when there is none), ``logits``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models.layers import batch_norm, check_positive_int, check_rate

Array = jax.Array


class SmallCNN(nn.Module):
    """Two conv stages + dense head for small images or 1-D signals (see module docstring).

    Attributes:
      num_classes: classifier outputs.
      width: channels of stage1 (stage2 has twice as many).
      hidden: width of the dense layer before the classifier.
      dropout_rate: dropout on the hidden dense activations (needs ``rng`` in train mode).
      dtype: computation dtype (parameters stay float32; logits are returned as float32).
    """

    num_classes: int
    width: int = 32
    hidden: int = 128
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        check_positive_int(self.num_classes, "num_classes")
        check_positive_int(self.width, "width")
        check_positive_int(self.hidden, "hidden")
        check_rate(self.dropout_rate, "dropout_rate")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, train: bool) -> tuple[Array, dict[str, Array]]:
        x = jnp.asarray(x, self.dtype)
        if x.ndim == 2:
            x = x[..., None]
        if x.ndim < 3:
            raise ValueError(f"SmallCNN needs (B, *spatial, C) or (B, L) inputs, got {x.shape}")
        spatial = x.ndim - 2
        features: dict[str, Array] = {}
        for stage, width in enumerate((self.width, 2 * self.width), start=1):
            h = nn.Conv(
                width,
                (3,) * spatial,
                padding="SAME",
                use_bias=False,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=f"conv{stage}",
            )(x)
            h = batch_norm(train, self.dtype, f"bn{stage}")(h)
            h = nn.max_pool(h, (2,) * spatial, strides=(2,) * spatial, padding="SAME")
            features[f"stage{stage}_pre"] = h
            x = nn.relu(h)
            features[f"stage{stage}"] = x
        h = x.reshape(x.shape[0], -1)
        h = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="hidden")(h))
        features["embedding"] = h
        h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(h).astype(jnp.float32)
        features["logits"] = logits
        return logits, features


class MLP(nn.Module):
    """Flatten + ReLU hidden layers + linear classifier (see module docstring).

    Attributes:
      num_classes: classifier outputs.
      hidden: widths of the hidden layers, e.g. ``(256,)``; ``()`` gives logistic regression.
      dropout_rate: dropout before the classifier (needs ``rng`` in train mode).
      dtype: computation dtype (parameters stay float32; logits are returned as float32).
    """

    num_classes: int
    hidden: Sequence[int] = (256,)
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        check_positive_int(self.num_classes, "num_classes")
        if isinstance(self.hidden, (int, str)) or not isinstance(self.hidden, Sequence):
            raise ValueError(f"hidden must be a sequence of widths, got {self.hidden!r}")
        for w in self.hidden:
            check_positive_int(w, "every hidden width")
        check_rate(self.dropout_rate, "dropout_rate")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, train: bool) -> tuple[Array, dict[str, Array]]:
        h = jnp.asarray(x, self.dtype).reshape(x.shape[0], -1)
        features: dict[str, Array] = {}
        for i, width in enumerate(self.hidden, start=1):
            h = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"hidden{i}")(h))
            features[f"hidden{i}"] = h
        features["embedding"] = h
        h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(h).astype(jnp.float32)
        features["logits"] = logits
        return logits, features


__all__ = ["MLP", "SmallCNN"]
