"""Model registry: ``create_model(name, num_classes, **kwargs)`` and ``list_models()``."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxkd.models.base import ModelFns, from_linen
from jaxkd.models.resnet import CIFAR_WIDTHS, X4_WIDTHS, CifarResNet
from jaxkd.models.small import MLP, SmallCNN
from jaxkd.models.wrn import WideResNet

__all__ = ["create_model", "list_models", "register_model"]

DTypeLike = Any


def _dtype(dtype: DTypeLike) -> Any:
    if dtype is None:
        return jnp.dtype(jnp.float32)
    try:
        return jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"dtype must name a JAX dtype, got {dtype!r}") from e


def _resnet(
    num_classes: int,
    *,
    depth: int,
    widths: Sequence[int] = CIFAR_WIDTHS,
    dtype: DTypeLike = jnp.float32,
) -> nn.Module:
    return CifarResNet(num_classes, depth, tuple(widths), _dtype(dtype))


def _wrn(
    num_classes: int,
    *,
    depth: int,
    widen_factor: int,
    dropout_rate: float = 0.0,
    dtype: DTypeLike = jnp.float32,
) -> nn.Module:
    return WideResNet(num_classes, depth, widen_factor, dropout_rate, _dtype(dtype))


def _cnn(
    num_classes: int,
    *,
    width: int = 32,
    hidden: int = 128,
    dropout_rate: float = 0.0,
    dtype: DTypeLike = jnp.float32,
) -> nn.Module:
    return SmallCNN(num_classes, width, hidden, dropout_rate, _dtype(dtype))


def _mlp(
    num_classes: int,
    *,
    hidden: Sequence[int] = (256,),
    dropout_rate: float = 0.0,
    dtype: DTypeLike = jnp.float32,
) -> nn.Module:
    if isinstance(hidden, int):
        hidden = (hidden,)
    return MLP(num_classes, tuple(hidden), dropout_rate, _dtype(dtype))


def _fixed(builder: Callable[..., nn.Module], **fixed: Any) -> Callable[..., nn.Module]:
    """A builder with some keyword arguments fixed (they are no longer accepted)."""

    def build(num_classes: int, **kwargs: Any) -> nn.Module:
        return builder(num_classes, **fixed, **kwargs)

    params = [
        p for p in inspect.signature(builder).parameters.values() if p.name not in fixed
    ]
    build.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return build


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet": _resnet,
    **{
        f"resnet{d}": _fixed(_resnet, depth=d, widths=CIFAR_WIDTHS)
        for d in (8, 14, 20, 32, 44, 56, 110)
    },
    "resnet8x4": _fixed(_resnet, depth=8, widths=X4_WIDTHS),
    "resnet32x4": _fixed(_resnet, depth=32, widths=X4_WIDTHS),
    "wrn": _wrn,
    **{
        f"wrn_{d}_{k}": _fixed(_wrn, depth=d, widen_factor=k)
        for d, k in ((16, 1), (16, 2), (40, 1), (40, 2), (28, 4))
    },
    "cnn": _cnn,
    "mlp": _mlp,
}


def register_model(name: str, builder: Callable[..., Any], *, overwrite: bool = False) -> None:
    """Makes ``name`` available to :func:`create_model` and to configs (``model.name``).

    ``builder(num_classes, **kwargs)`` returns a Linen module (``__call__(x, train)`` giving
    logits or ``(logits, features)``) or a ready :class:`ModelFns` (e.g. the first element of
    :func:`~jaxkd.models.from_nnx` for an NNX model).
    """
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"model {name!r} is already registered; pass overwrite=True to replace it")
    if "num_classes" not in inspect.signature(builder).parameters:
        raise ValueError(f"builder for {name!r} must take num_classes as its first argument")
    _REGISTRY[name] = builder


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_REGISTRY)


def _check_kwargs(name: str, builder: Callable[..., nn.Module], kwargs: dict[str, Any]) -> None:
    params = dict(inspect.signature(builder).parameters)
    params.pop("num_classes")
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(
            f"model {name!r} got unexpected keyword argument(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(params) or 'none'}"
        )
    missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty]
    missing = [p for p in missing if p not in kwargs]
    if missing:
        raise ValueError(f"model {name!r} requires keyword argument(s) {', '.join(missing)}")


def create_model(name: str, num_classes: int, **kwargs: Any) -> ModelFns:
    """Build a registered model as pure ``init`` / ``apply`` functions.

    Args:
      name: one of :func:`list_models` (``"resnet8x4"``, ``"wrn_40_2"``, ``"cnn"``, ...).
        ``"resnet"`` and ``"wrn"`` are the generic families and need ``depth`` (and
        ``widen_factor`` for ``"wrn"``).
      num_classes: number of classifier outputs.
      **kwargs: model options. All accept ``dtype`` (computation dtype, e.g.
        ``"bfloat16"``; parameters stay float32). ``resnet``: ``depth`` (6n+2), ``widths``
        (4 ints). ``wrn``: ``depth`` (6n+4), ``widen_factor``; WRNs: ``dropout_rate``.
        ``cnn``: ``width``, ``hidden``, ``dropout_rate``. ``mlp``: ``hidden`` (widths),
        ``dropout_rate``. Every model also takes ``quant`` (a mapping with ``weight_bits``,
        ``act_bits``, ``per_channel``, ``act_clip``, ``skip``): the low-precision version, see
        :mod:`jaxkd.models.quant`.

    Raises:
      ValueError: unknown name (the message lists the available ones and close matches),
        unknown or missing keyword arguments, or invalid values (e.g. a ResNet depth that is
        not 6n + 2).
    """
    builder = _REGISTRY.get(name)
    if builder is None:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}.{hint} Available models: {', '.join(list_models())}"
        )
    quant = kwargs.pop("quant", None)
    _check_kwargs(name, builder, kwargs)
    built = builder(num_classes, **kwargs)
    fns = built if isinstance(built, ModelFns) else from_linen(built, name)
    if quant:
        from jaxkd.models.quant import quantize_from_config
        fns = quantize_from_config(fns, quant)
    return fns
