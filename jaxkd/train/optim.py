"""Optimizers and learning-rate schedules (optax), configured per epoch from ``config.optim``.

Keys: ``name``, ``lr``, ``schedule`` (constant | step | cosine), ``milestones`` (epochs, for
"step"), ``decay`` (factor at each milestone), ``warmup_epochs`` (linear warm-up from 0),
``weight_decay``, ``momentum`` and ``nesterov`` (SGD only), ``kwargs`` (passed to the optax
optimizer), ``clip_grad_norm`` and ``weight_decay_mask``.

* ``sgd``: PyTorch's SGD. Weight decay is added to the gradient before momentum
  (``grad + wd * param``), on every parameter unless masked, as RepDistiller does.
* ``adam``: Adam with PyTorch-style (coupled, L2) weight decay added to the gradient.
* ``adamw``: optax's AdamW, decoupled weight decay.
* any other optax optimizer by its name (``lamb``, ``lion``, ``rmsprop``, ``adafactor``, ...),
  called as ``optax.<name>(learning_rate=<schedule>, **kwargs)`` (big_vision's ``optax_name``).
  When it takes ``weight_decay`` itself (decoupled), ``weight_decay`` goes there (with the mask);
  otherwise it is added to the gradient first, as for ``sgd``.

``clip_grad_norm``: the gradient is first clipped to this global norm (PyTorch's
``clip_grad_norm_`` before ``step``). ``weight_decay_mask``: ``None`` decays every parameter;
else a list of regular expressions, and only parameters whose path (``"student/fc/kernel"``,
``"aux/regressor/conv/kernel"``) matches one of them decay, e.g. ``[".*kernel$"]``.

``reset_momentum_at_milestones`` (``sgd`` with the ``step`` schedule only): the momentum buffer is
zeroed at every milestone, on the first update at the new learning rate, as when a PyTorch script
re-creates its ``SGD`` at each learning-rate drop (bhheo/BSS_distillation, szagoruyko's
attention-transfer). PyTorch's first step after that sets the buffer to the gradient, which is what
a zeroed optax ``trace`` gives. Off by default.

The configs jaxkd shipped before these options (``sgd``/``adam``/``adamw`` without clipping or a
mask) build exactly the transformations they built then (tested against recorded updates).
"""

from __future__ import annotations

import difflib
import inspect
import re
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxkd.errors import ConfigError

SCHEDULES = ("constant", "step", "cosine")
BUILT_IN = ("sgd", "adam", "adamw")


def make_schedule(optim: Mapping[str, Any], steps_per_epoch: int, num_epochs: int) -> optax.Schedule:
    lr = float(optim["lr"])
    kind = optim.get("schedule", "constant")
    total = max(1, steps_per_epoch * num_epochs)
    warmup = int(round(float(optim.get("warmup_epochs", 0) or 0) * steps_per_epoch))
    if kind == "constant":
        main = optax.constant_schedule(lr)
    elif kind == "step":
        decay = float(optim.get("decay", 0.1))
        boundaries = {int(e) * steps_per_epoch - warmup: decay for e in optim.get("milestones", ())}
        main = optax.piecewise_constant_schedule(lr, boundaries)
    elif kind == "cosine":
        main = optax.cosine_decay_schedule(lr, max(1, total - warmup))
    else:
        raise ConfigError(f"config.optim.schedule must be one of {SCHEDULES}; got {kind!r}")
    if warmup:
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])
    return main


def decay_mask(patterns: Sequence[str] | None):
    """``None`` (every parameter decays) or a function ``params -> bool tree``: a leaf decays when
    its path (``"student/fc/kernel"``) matches one of the regular expressions."""
    if patterns is None:
        return None
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"config.optim.weight_decay_mask must be None or a list of regular expressions; "
                          f"got {patterns!r}")
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as e:
        raise ConfigError(f"config.optim.weight_decay_mask: bad regular expression: {e}") from None

    def mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: any(c.search(jax.tree_util.keystr(path, simple=True, separator="/")) for c in compiled),
            params)
    return mask


def _optax_optimizer(name: str):
    fn = getattr(optax, name, None)
    if name.startswith("_") or not callable(fn) or "learning_rate" not in _parameters(fn):
        names = sorted(n for n in dir(optax) if not n.startswith("_") and callable(getattr(optax, n))
                       and "learning_rate" in _parameters(getattr(optax, n)))
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"config.optim.name: {name!r} is not an optax optimizer{hint} (optimizers take a "
                          f"learning_rate: {', '.join(names)})")
    return fn


def _parameters(fn) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return ()


def make_optimizer(optim: Mapping[str, Any], steps_per_epoch: int, num_epochs: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns ``(optimizer, learning-rate schedule)`` for ``config.optim`` (see the module docstring)."""
    schedule = make_schedule(optim, steps_per_epoch, num_epochs)
    name = optim.get("name", "sgd")
    if not isinstance(name, str):
        raise ConfigError(f"config.optim.name must be a string; got {name!r}")
    wd = float(optim.get("weight_decay", 0.0) or 0.0)
    kwargs = dict(optim.get("kwargs") or {})
    mask = decay_mask(optim.get("weight_decay_mask"))
    coupled_decay = [optax.add_decayed_weights(wd, mask)] if wd else []
    reset = optim.get("reset_momentum_at_milestones", False)
    if not isinstance(reset, bool):
        raise ConfigError(f"config.optim.reset_momentum_at_milestones must be True or False; got {reset!r}")
    if reset and (name != "sgd" or optim.get("schedule", "constant") != "step"):
        raise ConfigError("config.optim.reset_momentum_at_milestones needs optim.name='sgd' and optim.schedule='step' "
                          f"(it resets SGD's momentum at the milestones); got name={name!r}, "
                          f"schedule={optim.get('schedule', 'constant')!r}")
    if name == "sgd":
        momentum = optim.get("momentum", 0.9)
        if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise ConfigError(f"config.optim.momentum must be in [0, 1); got {momentum!r}")
        if reset and momentum:
            if kwargs:
                raise ConfigError("config.optim.kwargs: not supported with reset_momentum_at_milestones")
            steps = [int(e) * steps_per_epoch for e in optim.get("milestones", ())]
            main = coupled_decay + [reset_at_steps(optax.trace(float(momentum), bool(optim.get("nesterov", False))),
                                                   steps),
                                    optax.scale_by_learning_rate(schedule)]
        else:
            main = coupled_decay + [_call("sgd", optax.sgd, schedule, {"momentum": float(momentum) or None,
                                                                        "nesterov": bool(optim.get("nesterov", False)),
                                                                        **kwargs})]
    elif name == "adam":
        main = coupled_decay + [_call("adam", optax.adam, schedule, kwargs)]
    elif name == "adamw":
        main = [_call("adamw", optax.adamw, schedule, {"weight_decay": wd, "mask": mask, **kwargs})]
    else:
        fn = _optax_optimizer(name)
        if "weight_decay" in _parameters(fn):
            extra = {"weight_decay": wd, **({"mask": mask} if mask is not None and "mask" in _parameters(fn) else {})}
            if mask is not None and "mask" not in _parameters(fn):
                raise ConfigError(f"config.optim.weight_decay_mask: optax.{name} takes no mask for its weight decay")
            main = [_call(name, fn, schedule, {**extra, **kwargs})]
        else:
            main = coupled_decay + [_call(name, fn, schedule, kwargs)]
    clip = optim.get("clip_grad_norm")
    if clip is not None:
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0:
            raise ConfigError(f"config.optim.clip_grad_norm must be None or a number > 0; got {clip!r}")
        main = [optax.clip_by_global_norm(float(clip))] + main
    # the state structures of earlier jaxkd versions (so their checkpoints resume): a chain for
    # sgd/adam even when it has one member, AdamW on its own
    tx = main[0] if name == "adamw" and len(main) == 1 else optax.chain(*main)
    return tx, schedule


def _call(name: str, fn, schedule, kwargs: dict):
    accepted = _parameters(fn)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"config.optim.kwargs: optax.{name} takes no argument(s) {unknown}; it takes "
                          f"{', '.join(a for a in accepted if a != 'learning_rate')}")
    return fn(learning_rate=schedule, **kwargs)


class ResetState(NamedTuple):
    """State of :func:`reset_at_steps`: the update count and the wrapped transformation's state."""
    count: jax.Array
    inner: Any


def reset_at_steps(inner: optax.GradientTransformation, steps: Sequence[int]) -> optax.GradientTransformation:
    """``inner`` whose state is re-initialised (``inner.init``) just before the updates whose
    0-based count is in ``steps``: e.g. a momentum ``trace`` zeroed at the learning-rate drops,
    like re-creating a PyTorch optimizer there. Only for transformations whose state carries no
    count of its own that must survive (a ``trace``, not a schedule)."""
    steps = tuple(sorted({int(s) for s in steps if int(s) > 0}))

    def init(params):
        return ResetState(count=jnp.zeros([], jnp.int32), inner=inner.init(params))

    def update(updates, state, params=None):
        inner_state = state.inner
        if steps:
            reset = jnp.any(state.count == jnp.asarray(steps, jnp.int32))
            fresh = inner.init(params if params is not None else updates)
            inner_state = jax.tree.map(lambda f, old: jnp.where(reset, f, old), fresh, inner_state)
        updates, inner_state = inner.update(updates, inner_state, params)
        return updates, ResetState(count=optax.safe_int32_increment(state.count), inner=inner_state)

    return optax.GradientTransformation(init, update)
