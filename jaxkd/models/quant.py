"""Low-precision models by fake quantisation with a straight-through estimator (STE).

``fake_quant(x, bits)`` rounds ``x`` to a uniform grid of ``2**(bits-1) - 1`` positive levels
(signed) or ``2**bits - 1`` levels (unsigned) and back to floats; the backward pass is the
straight-through estimator: the gradient is passed unchanged where ``x`` is inside the
clipping range and is zero outside it.

:func:`quantize_model` wraps any :class:`~jaxkd.models.ModelFns` (every registered model, and
Linen models through :func:`~jaxkd.models.from_linen`):

* weights: every ``kernel`` param (Conv and Dense) is fake-quantised to ``weight_bits``,
  symmetric, with a scale per output channel (the last kernel axis; ``per_channel=True``)
  or one per tensor, ``scale = max|W| / (2**(bits-1) - 1)``: no clipping, so the STE is the
  identity. Biases and BatchNorm parameters stay in float (they fold into the accumulator in
  integer inference). The float params are the ones the optimizer updates (the "shadow"
  weights of quantisation-aware training).
* activations: the input of every ``nn.Conv``/``nn.Dense`` call is fake-quantised to
  ``act_bits`` (intercepted with ``flax.linen.intercept_methods``), per example, with a
  dynamic range ``max|x|`` of that example; unsigned (all ``2**bits - 1`` levels on
  ``[0, max]``) when the example's input is non-negative (after a ReLU), else signed.
  ``act_clip`` instead fixes the range to ``[0, act_clip]``/``[-act_clip, act_clip]`` (as
  WRPN/Apprentice clip activations to [0, 1]), and the STE then zeroes the gradient outside.
* ``skip``: names of modules (e.g. ``("hidden1", "fc")``: the first and the last layer, which
  the Apprentice paper keeps in full precision) left in float, weights and inputs.

In a config: ``model.kwargs.quant = {"weight_bits": 4, "act_bits": 4}`` on any registered
model (:func:`~jaxkd.models.create_model` takes ``quant=``). Evaluation (and the exported
checkpoint's use through ``create_model``) applies the same quantisation, so reported
accuracies are those of the low-precision network. Quantisation is simulated in float32:
this measures accuracy, not speed.
"""

from __future__ import annotations

from typing import Any, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models.base import ModelFns

QUANT_KEYS = ("weight_bits", "act_bits", "per_channel", "act_clip", "skip")


def _levels(bits: int, signed: bool) -> int:
    return 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1


def fake_quant(x: chex.Array, bits: int | None, *, signed: bool = True, axis: int | Sequence[int] | None = None,
               clip: float | None = None) -> chex.Array:
    """Uniform fake quantisation with a straight-through gradient.

    Args:
      x: float array.
      bits: bit width (``>= 2`` signed, ``>= 1`` unsigned); ``None`` returns ``x`` unchanged.
      signed: symmetric grid ``{-n..n} * scale`` with ``n = 2**(bits-1) - 1``; else
        ``{0..2**bits-1} * scale`` (negative inputs clip to 0).
      axis: axes that keep their own scale (e.g. ``-1``: per output channel of a kernel,
        ``0``: per example); ``None``: one scale for the whole tensor. Ignored with ``clip``.
      clip: fixed range ``[-clip, clip]`` (``[0, clip]`` unsigned) and ``scale = clip / n``;
        ``None``: the range is ``max|x|`` over the non-kept axes (treated as a constant).

    Returns:
      ``round(clip(x) / scale) * scale`` in the forward pass; the gradient is 1 where ``x``
      is inside the range (bounds included) and 0 where it was clipped.

    Example:
      >>> import jax.numpy as jnp
      >>> fake_quant(jnp.array([0.1, 0.6, -1.0]), bits=2)   # levels {-1, 0, 1} * max|x|
      Array([ 0.,  1., -1.], dtype=float32)
    """
    if bits is None:
        return x
    if int(bits) != bits or bits < (2 if signed else 1):
        raise ValueError(f"bits must be an int >= {2 if signed else 1} ({'signed' if signed else 'unsigned'}); "
                         f"got {bits!r}")
    n = _levels(int(bits), signed)
    lo = -1.0 if signed else 0.0
    if clip is not None:
        if clip <= 0:
            raise ValueError(f"clip must be > 0; got {clip}")
        # (not jnp.clip, whose gradient is 1/2 exactly at the bounds: here it is 1 on [lo, hi])
        xc = jnp.where(x > clip, clip, jnp.where(x < lo * clip, lo * clip, x)).astype(x.dtype)
        scale = jnp.asarray(clip / n, x.dtype)
    else:
        xc = x if signed else jnp.where(x < 0, 0.0, x).astype(x.dtype)
        if axis is None:
            reduce = tuple(range(x.ndim))
        else:
            keep = {a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis)}
            reduce = tuple(a for a in range(x.ndim) if a not in keep)
        m = jax.lax.stop_gradient(jnp.max(jnp.abs(xc), axis=reduce, keepdims=True))
        scale = jnp.where(m > 0, m / n, 1.0).astype(x.dtype)
    q = jnp.clip(jnp.round(xc / scale), lo * n, n) * scale
    return xc + jax.lax.stop_gradient(q - xc)


def quantize_activation(x: chex.Array, bits: int | None, clip: float | None = None) -> chex.Array:
    """Per-example activation quantisation: unsigned for a non-negative example, else signed."""
    if bits is None:
        return x
    axis = 0 if x.ndim > 1 else None
    signed = fake_quant(x, bits, signed=True, axis=axis, clip=clip)
    unsigned = fake_quant(x, bits, signed=False, axis=axis, clip=clip)
    if x.ndim > 1:
        nonneg = jnp.all(x >= 0, axis=tuple(range(1, x.ndim)), keepdims=True)
    else:
        nonneg = jnp.all(x >= 0)
    return jnp.where(nonneg, unsigned, signed)


def quantize_params(params: Any, bits: int | None, per_channel: bool = True, skip: Sequence[str] = ()) -> Any:
    """Every ``kernel`` leaf (ndim >= 2) not under a module named in ``skip``, fake-quantised."""
    if bits is None:
        return params
    skip = set(skip)

    def leaf(path, value):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if names and names[-1] == "kernel" and value.ndim >= 2 and not skip.intersection(names):
            return fake_quant(value, bits, signed=True, axis=-1 if per_channel else None)
        return value

    return jax.tree_util.tree_map_with_path(leaf, params)


def quantize_model(fns: ModelFns, weight_bits: int | None = None, act_bits: int | None = None,
                   per_channel: bool = True, act_clip: float | None = None, skip: Sequence[str] = ()) -> ModelFns:
    """``fns`` with fake-quantised weights and Conv/Dense inputs (see the module docstring)."""
    for b, name in ((weight_bits, "weight_bits"), (act_bits, "act_bits")):
        if b is not None and (not isinstance(b, int) or b < 2):
            raise ValueError(f"quant.{name} must be an int >= 2 or None; got {b!r}")
    skip = tuple(skip)

    def quantize_inputs(next_fun, args, kwargs, context):
        module = context.module
        if (act_bits is not None and context.method_name == "__call__" and isinstance(module, (nn.Conv, nn.Dense))
                and module.name not in skip and args):
            args = (quantize_activation(args[0], act_bits, act_clip),) + tuple(args[1:])
        return next_fun(*args, **kwargs)

    def apply(variables, x, train: bool, rng=None):
        variables = {**variables, "params": quantize_params(variables["params"], weight_bits, per_channel, skip)}
        if act_bits is None:
            return fns.apply(variables, x, train, rng=rng)
        with nn.intercept_methods(quantize_inputs):
            return fns.apply(variables, x, train, rng=rng)

    return ModelFns(name=fns.name, init=fns.init, apply=apply)


def quantize_from_config(fns: ModelFns, quant: Any) -> ModelFns:
    """:func:`quantize_model` from a ``quant`` mapping (``model.kwargs.quant``); checks its keys."""
    quant = dict(quant.to_dict() if hasattr(quant, "to_dict") else quant)
    unknown = sorted(set(quant) - set(QUANT_KEYS))
    if unknown:
        raise ValueError(f"quant got unknown key(s) {unknown}; it takes {list(QUANT_KEYS)}")
    if "skip" in quant:
        quant["skip"] = tuple(quant["skip"] or ())
    return quantize_model(fns, **quant)


__all__ = ["QUANT_KEYS", "fake_quant", "quantize_activation", "quantize_from_config", "quantize_model",
           "quantize_params"]
