"""FitNets hint regressor: maps a student feature map onto the teacher's hint shape.

The layer is chosen from the spatial sizes (RepDistiller's ``ConvReg`` relations, as recorded
in references.md), always followed by BatchNorm + ReLU:

=======================================  ===================================================
student ``(H_s, W_s)`` vs teacher         layer (``C_t`` output channels, with bias)
=======================================  ===================================================
``H_s == 2 H_t`` and ``W_s == 2 W_t``      3x3 conv, stride 2, padding 1 (PyTorch-style)
``2 H_s == H_t`` and ``2 W_s == W_t``      4x4 transposed conv, stride 2 (PyTorch padding 1)
``H_s >= H_t`` and ``W_s >= W_t``          conv of kernel ``(1 + dH, 1 + dW)``, VALID padding
                                           (1x1 when the sizes are equal)
anything else                              ``ValueError``
=======================================  ===================================================

Initialisation follows PyTorch's ``nn.Conv2d`` / ``nn.ConvTranspose2d`` defaults
(``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for weight and bias, with PyTorch's ``fan_in``:
``k*k*C_in`` for a conv, ``k*k*C_out`` for a transposed conv); BatchNorm uses
:func:`jaxkd.models.layers.batch_norm` (PyTorch momentum/eps).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models.layers import batch_norm, check_positive_int, torch_linear_bias_init

Array = jax.Array

_conv_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# Flax's transposed-conv kernel is (kh, kw, C_in, C_out): its "fan_out" is PyTorch's fan_in
# for ConvTranspose2d (weight (C_in, C_out, kh, kw), fan_in computed from dim 1).
_conv_transpose_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")


def regressor_kind(student_hw: Sequence[int], teacher_hw: Sequence[int]) -> str:
    """``"stride2"``, ``"transpose2"`` or ``"valid"`` for the given spatial sizes (else error)."""
    (sh, sw), (th, tw) = tuple(student_hw), tuple(teacher_hw)
    for what, v in (("student height", sh), ("student width", sw), ("teacher height", th),
                    ("teacher width", tw)):
        check_positive_int(v, what)
    if sh == 2 * th and sw == 2 * tw:
        return "stride2"
    if 2 * sh == th and 2 * sw == tw:
        return "transpose2"
    if sh >= th and sw >= tw:
        return "valid"
    raise ValueError(
        f"unsupported FitNets regressor shapes: student spatial size {sh}x{sw} vs teacher "
        f"{th}x{tw}; supported: student 2x larger (stride-2 conv), 2x smaller (transposed "
        "conv), or larger/equal in both dimensions (VALID conv of kernel 1+dH x 1+dW)")


class HintRegressor(nn.Module):
    """FitNets regressor ``r(student feature) -> teacher feature shape``, NHWC.

    Attributes:
      out_channels: teacher channel count ``C_t``.
      student_hw: student spatial size ``(H_s, W_s)``.
      teacher_hw: teacher spatial size ``(H_t, W_t)``.
      dtype: computation dtype (parameters stay float32).
    """

    out_channels: int
    student_hw: tuple[int, int]
    teacher_hw: tuple[int, int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"x must be an NHWC feature map (B, H, W, C); got shape "
                             f"{getattr(x, 'shape', None)}")
        if tuple(x.shape[1:3]) != tuple(self.student_hw):
            raise ValueError(f"x spatial size {tuple(x.shape[1:3])} does not match the "
                             f"regressor's student_hw {tuple(self.student_hw)}")
        out = check_positive_int(self.out_channels, "out_channels")
        kind = regressor_kind(self.student_hw, self.teacher_hw)
        c_in = x.shape[-1]
        if kind == "stride2":
            layer = nn.Conv(out, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                            dtype=self.dtype, param_dtype=jnp.float32,
                            kernel_init=_conv_kernel_init,
                            bias_init=torch_linear_bias_init(9 * c_in), name="conv")
        elif kind == "transpose2":
            # PyTorch ConvTranspose2d(k=4, s=2, padding=1) -> out = 2H; in lax terms the
            # dilated input is padded by k - 1 - 1 = 2 on each side.
            layer = nn.ConvTranspose(out, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)),
                                     dtype=self.dtype, param_dtype=jnp.float32,
                                     kernel_init=_conv_transpose_kernel_init,
                                     bias_init=torch_linear_bias_init(16 * out), name="conv")
        else:
            kh = 1 + self.student_hw[0] - self.teacher_hw[0]
            kw = 1 + self.student_hw[1] - self.teacher_hw[1]
            layer = nn.Conv(out, (kh, kw), strides=(1, 1), padding="VALID", dtype=self.dtype,
                            param_dtype=jnp.float32, kernel_init=_conv_kernel_init,
                            bias_init=torch_linear_bias_init(kh * kw * c_in), name="conv")
        y = layer(x)
        y = batch_norm(train, self.dtype, name="bn")(y)
        return nn.relu(y)


class TokenRegressor(nn.Module):
    """FitNets regressor for token maps ``(B, L, D_s) -> (B, L, D_t)``: one linear projection per
    token (TinyBERT's ``W_h``), PyTorch ``nn.Linear`` initialisation, no normalisation."""

    out_features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if getattr(x, "ndim", None) != 3:
            raise ValueError(f"x must be a token map (B, L, D); got shape {getattr(x, 'shape', None)}")
        c_in = x.shape[-1]
        return nn.Dense(check_positive_int(self.out_features, "out_features"), dtype=self.dtype,
                        param_dtype=jnp.float32, kernel_init=_conv_kernel_init,
                        bias_init=torch_linear_bias_init(c_in), name="proj")(x)


def make_hint_regressor(student_feature_shape: Sequence[int],
                        teacher_feature_shape: Sequence[int], dtype: Any = jnp.float32,
                        layout: str = "NHWC") -> nn.Module:
    """Build the regressor for feature shapes in ``layout``: NHWC ``(B, H, W, C)`` or ``(H, W, C)``
    (a :class:`HintRegressor`), or token maps ``(B, L, D)`` with ``layout="NLC"`` (a
    :class:`TokenRegressor`, equal lengths ``L``).

    Raises:
      ValueError: for shapes of the wrong rank or an unsupported spatial relation.
    """
    if layout == "NLC":
        s, t = tuple(int(d) for d in student_feature_shape), tuple(int(d) for d in teacher_feature_shape)
        if len(s) not in (2, 3) or len(t) not in (2, 3) or s[-2] != t[-2]:
            raise ValueError(f"token maps must be (B, L, D) or (L, D) with the same length L; got student {s}, "
                             f"teacher {t}")
        return TokenRegressor(out_features=t[-1], dtype=dtype)
    if layout != "NHWC":
        raise ValueError(f"the hint regressor takes layout 'NHWC' or 'NLC'; got {layout!r}")
    shapes = []
    for name, shape in (("student_feature_shape", student_feature_shape),
                        ("teacher_feature_shape", teacher_feature_shape)):
        shape = tuple(int(d) for d in shape)
        if len(shape) not in (3, 4):
            raise ValueError(f"{name} must be NHWC (B, H, W, C) or (H, W, C); got {shape}")
        shapes.append(shape[-3:])
    (sh, sw, _), (th, tw, tc) = shapes
    regressor_kind((sh, sw), (th, tw))  # raises for unsupported relations
    return HintRegressor(out_channels=tc, student_hw=(sh, sw), teacher_hw=(th, tw), dtype=dtype)


__all__ = ["HintRegressor", "TokenRegressor", "make_hint_regressor", "regressor_kind"]
