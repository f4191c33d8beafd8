"""Convolutions for the CIFAR models, with faster formulations for two cases on XLA:CPU.

:func:`conv_general_dilated` has the signature of ``lax.conv_general_dilated`` and is what the
models' ``nn.Conv`` layers call (``layers.conv`` passes it as ``conv_general_dilated``; the
parameters are unchanged). On the CPU it computes two kinds of 2-D NHWC/HWIO convolutions
differently, with the same math (float32 round-off only):

* **1x1, no padding** (the ResNet shortcuts): a strided slice and one matmul. XLA otherwise
  computes the weight gradient as a convolution with a 32x32 (or dilated 16x16) window, which
  took 9-32 ms against 5 ms for the ``x^T dy`` matmul at batch 64.
* **3x3, stride 2, padding 1, even height and width**: the forward pass is XLA's strided
  convolution, but its JVP uses the polyphase form of the input tangent: the four
  (row, column) parity phases of the input, each convolved at stride 1 with the taps that
  reach it. The transpose of that (the input gradient) is then four stride-1 convolutions,
  where XLA would otherwise run one convolution with ``lhs_dilation=2``, i.e. on an input that
  is three quarters inserted zeros (86 -> 46 ms for the 64->128 layer of resnet8x4). It is a
  ``custom_jvp``, so forward- and reverse-mode differentiation both work.

Measured effect on the resnet8x4 student train step (batch 64, 2-core CPU, same-process A/B):
0.95x the time (``benchmarks/README.md``, "Second round on the student step"). On other
platforms (GPU, TPU) ``lax.platform_dependent`` selects plain ``lax.conv_general_dilated``.
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax

Array = jax.Array

_NHWC_HWIO = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # lax.ConvDimensionNumbers for NHWC/HWIO/NHWC
_DN = ("NHWC", "HWIO", "NHWC")


def _plain_strided3x3(x: Array, w: Array, precision: Any) -> Array:
    return lax.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=_DN,
                                    precision=precision)


def _polyphase_strided3x3(x: Array, w: Array, precision: Any) -> Array:
    """3x3 / stride 2 / pad 1 as four stride-1 convolutions of the input's parity phases.

    Output row i reads padded rows 2i, 2i+1, 2i+2, i.e. input rows 2i-1 (tap 0), 2i (tap 1)
    and 2i+1 (tap 2): tap 1 hits the even phase at row i; taps 0 and 2 hit the odd phase at
    rows i-1 and i (a 2-tap kernel with one row of padding before). Columns likewise.
    """
    even, odd = (slice(1, 2), (0, 0)), (slice(0, 3, 2), (1, 0))  # (taps, padding) per phase
    out = None
    for p, (rows, rpad) in ((0, even), (1, odd)):
        for q, (cols, cpad) in ((0, even), (1, odd)):
            term = lax.conv_general_dilated(x[:, p::2, q::2, :], w[rows, cols], (1, 1), (rpad, cpad),
                                            dimension_numbers=_DN, precision=precision)
            out = term if out is None else out + term
    return out


def _strided3x3(precision: Any):
    @jax.custom_jvp
    def conv(x, w):
        return _plain_strided3x3(x, w, precision)

    @conv.defjvp
    def conv_jvp(primals, tangents):
        x, w = primals
        dx, dw = tangents
        y = _plain_strided3x3(x, w, precision)
        # linear in (dx, dw): transposition gives the input gradient as four stride-1
        # convolutions and the weight gradient as XLA's usual one
        dy = _polyphase_strided3x3(dx, w, precision) + _plain_strided3x3(x, dw, precision)
        return y, dy

    return conv


def _pointwise(x: Array, w: Array, stride: int, precision: Any) -> Array:
    if stride > 1:
        x = x[:, ::stride, ::stride, :]
    b, h, wd, c = x.shape
    y = lax.dot_general(x.reshape(b * h * wd, c), w.reshape(c, w.shape[-1]), (((1,), (0,)), ((), ())),
                        precision=precision)
    return y.reshape(b, h, wd, w.shape[-1])


def _fast_case(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
               feature_group_count) -> str | None:
    """'pointwise', 'strided3x3' or None (use lax.conv_general_dilated)."""
    if lhs.ndim != 4 or feature_group_count != 1 or isinstance(padding, str):
        return None
    if any(d != 1 for d in (lhs_dilation or (1, 1))) or any(d != 1 for d in (rhs_dilation or (1, 1))):
        return None
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if tuple(map(tuple, dn)) != _NHWC_HWIO:
        return None
    kh, kw = rhs.shape[:2]
    strides = tuple(window_strides)
    pads = tuple(tuple(p) for p in padding)
    if (kh, kw) == (1, 1) and pads == ((0, 0), (0, 0)) and strides[0] == strides[1]:
        return "pointwise"
    if ((kh, kw) == (3, 3) and strides == (2, 2) and pads == ((1, 1), (1, 1))
            and lhs.shape[1] % 2 == 0 and lhs.shape[2] % 2 == 0):
        return "strided3x3"
    return None


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None) -> Array:
    """``lax.conv_general_dilated``, with the CPU formulations of the module docstring."""

    def plain(lhs, rhs):
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, batch_group_count,
                                        precision=precision, preferred_element_type=preferred_element_type)

    case = None
    if batch_group_count == 1 and preferred_element_type is None:
        case = _fast_case(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                          feature_group_count)
    if case is None:
        return plain(lhs, rhs)
    if case == "pointwise":
        fast = lambda lhs, rhs: _pointwise(lhs, rhs, int(window_strides[0]), precision)  # noqa: E731
    else:
        fast = _strided3x3(precision)
    return lax.platform_dependent(lhs, rhs, cpu=fast, default=plain)


__all__ = ["conv_general_dilated"]
