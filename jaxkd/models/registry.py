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
from jaxkd.models.transformer import Transformer
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


def _transformer(
    num_classes: int,
    *,
    num_layers: int,
    dim: int,
    num_heads: int,
    mlp_dim: int | None = None,
    patch_size: Sequence[int] | None = None,
    vocab_size: int | None = None,
    max_len: int | None = None,
    pad_id: int | None = None,
    pool: str = "cls",
    dropout_rate: float = 0.0,
    dtype: DTypeLike = jnp.float32,
) -> nn.Module:
    if patch_size is not None and (max_len is not None or pad_id is not None):
        raise ValueError("max_len and pad_id are options of token models (vocab_size), not of "
                         f"patch models (patch_size={patch_size!r})")
    if isinstance(patch_size, int):
        patch_size = (patch_size, patch_size)
    token_opts = {} if patch_size is not None else {
        "max_len": 128 if max_len is None else max_len, "pad_id": 0 if pad_id is None else pad_id}
    return Transformer(
        num_classes=num_classes, num_layers=num_layers, dim=dim, num_heads=num_heads,
        mlp_dim=mlp_dim, patch_size=None if patch_size is None else tuple(patch_size),
        vocab_size=vocab_size, pool=pool, dropout_rate=dropout_rate, dtype=_dtype(dtype),
        **token_opts)


def _vit(
    num_classes: int,
    *,
    num_layers: int,
    dim: int,
    num_heads: int,
    patch_size: Sequence[int] = (4, 4),
    mlp_dim: int | None = None,
    pool: str = "cls",
    dropout_rate: float = 0.0,
    dtype: DTypeLike = jnp.float32,
) -> nn.Module:
    return _transformer(num_classes, num_layers=num_layers, dim=dim, num_heads=num_heads,
                        mlp_dim=mlp_dim, patch_size=patch_size, pool=pool,
                        dropout_rate=dropout_rate, dtype=dtype)


def _seq(
    num_classes: int,
    *,
    num_layers: int,
    dim: int,
    num_heads: int,
    vocab_size: int,
    max_len: int = 128,
    pad_id: int = 0,
    mlp_dim: int | None = None,
    pool: str = "cls",
    dropout_rate: float = 0.0,
    dtype: DTypeLike = jnp.float32,
) -> nn.Module:
    return _transformer(num_classes, num_layers=num_layers, dim=dim, num_heads=num_heads,
                        mlp_dim=mlp_dim, vocab_size=vocab_size, max_len=max_len, pad_id=pad_id,
                        pool=pool, dropout_rate=dropout_rate, dtype=dtype)


# named transformer sizes: (num_layers, dim, num_heads); mlp_dim defaults to 4 * dim
TRANSFORMER_SIZES: dict[str, tuple[int, int, int]] = {
    "teacher": (6, 256, 8),
    "student": (3, 128, 8),
    "student2": (2, 128, 8),
}


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
    "transformer": _transformer,
    **{
        f"{kind}_{size}": _fixed(builder, num_layers=n, dim=d, num_heads=h)
        for kind, builder in (("vit", _vit), ("seq", _seq))
        for size, (n, d, h) in TRANSFORMER_SIZES.items()
    },
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
        ``dropout_rate``. ``transformer`` (see :mod:`jaxkd.models.transformer`):
        ``num_layers``, ``dim``, ``num_heads``, ``mlp_dim`` (default ``4 * dim``), either
        ``patch_size`` (images) or ``vocab_size`` with ``max_len`` (default 128) and
        ``pad_id`` (default 0) (token ids), ``pool`` (``"cls"`` or ``"mean"``),
        ``dropout_rate``. ``vit_teacher`` / ``vit_student`` / ``vit_student2`` (patch models,
        ``patch_size`` default ``(4, 4)``) and ``seq_teacher`` / ``seq_student`` /
        ``seq_student2`` (token models, ``vocab_size`` required) fix ``num_layers``, ``dim``,
        ``num_heads`` to 6/256/8, 3/128/8 and 2/128/8. Every model also takes ``quant`` (a
        mapping with ``weight_bits``, ``act_bits``, ``per_channel``, ``act_clip``, ``skip``):
        the low-precision version, see :mod:`jaxkd.models.quant`.

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
