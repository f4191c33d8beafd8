"""Layer helpers shared by the CIFAR models: PyTorch-equivalent initialisers and BatchNorm.

The RepDistiller models are PyTorch models; these helpers reproduce their defaults so a jaxkd
model starts from the same distribution and normalises the same way:

- conv kernels: ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``, i.e. an
  untruncated normal with variance ``2 / (k_h * k_w * c_out)``;
- linear layers: PyTorch's default ``nn.Linear`` init, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
  for the weight (and the bias, unless the model zeroes it);
- BatchNorm: PyTorch's momentum 0.1 is Flax's ``momentum=0.9`` (Flax keeps
  ``ra = m * ra + (1 - m) * batch``), ``eps=1e-5``, scale 1, bias 0. One difference remains:
  PyTorch updates the running variance with the unbiased batch variance (factor n/(n-1),
  n = batch * H * W elements per channel), Flax with the biased one.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import conv as conv_impl

Array = jax.Array

BN_MOMENTUM = 0.9  # Flax convention; equals PyTorch's momentum=0.1
BN_EPSILON = 1e-5

kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default ``nn.Linear`` bias init: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults; batch statistics in train mode, running ones in eval."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Conv:
    """Bias-free square conv with PyTorch's symmetric padding ``kernel // 2``.

    Explicit padding matters for strided convs: ``"SAME"`` would pad (0, 1) where PyTorch pads
    (1, 1), which shifts the sampling grid by one pixel. The convolution itself is
    :func:`jaxkd.models.conv.conv_general_dilated` (faster 1x1 and strided 3x3 convolutions on
    the CPU; the same parameters and, to float32 round-off, the same numbers).
    """
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kaiming_normal_fan_out,
        name=name,
        conv_general_dilated=conv_impl.conv_general_dilated,
    )


def torch_linear(features: int, fan_in: int, dtype: Any, name: str, zero_bias: bool) -> nn.Dense:
    """Dense layer initialised like PyTorch's ``nn.Linear`` (bias optionally zeroed)."""
    bias_init = nn.initializers.zeros if zero_bias else torch_linear_bias_init(fan_in)
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=torch_linear_kernel_init,
        bias_init=bias_init,
        name=name,
    )


def global_avg_pool(x: Array) -> Array:
    """Mean over all spatial axes: (B, *spatial, C) -> (B, C)."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))


def check_positive_int(value: Any, what: str) -> int:
    """Return ``value`` if it is a positive int, else raise ``ValueError`` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return int(value)


def check_rate(value: Any, what: str) -> float:
    """Return ``value`` if it is a probability in [0, 1), else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"{what} must be a float in [0, 1), got {value!r}")
    return float(value)


__all__ = [
    "BN_EPSILON",
    "BN_MOMENTUM",
    "batch_norm",
    "check_positive_int",
    "check_rate",
    "conv",
    "global_avg_pool",
    "kaiming_normal_fan_out",
    "torch_linear",
    "torch_linear_bias_init",
    "torch_linear_kernel_init",
]
