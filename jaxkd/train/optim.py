"""Optimizers and learning-rate schedules (optax), configured per epoch.

``config.optim`` keys: ``name`` (sgd | adam | adamw), ``lr``, ``momentum``, ``nesterov``,
``weight_decay``, ``schedule`` (constant | step | cosine), ``milestones`` (epochs, for
"step"), ``decay`` (factor at each milestone), ``warmup_epochs``.

SGD's weight decay is PyTorch-style (``grad + wd * param`` before momentum), applied to
every parameter as RepDistiller does; AdamW's is decoupled.
"""

from __future__ import annotations

from typing import Any, Mapping

import optax

SCHEDULES = ("constant", "step", "cosine")
OPTIMIZERS = ("sgd", "adam", "adamw")


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
        raise ValueError(f"config.optim.schedule must be one of {SCHEDULES}; got {kind!r}")
    if warmup:
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])
    return main


def make_optimizer(optim: Mapping[str, Any], steps_per_epoch: int, num_epochs: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (optimizer, learning-rate schedule) for ``config.optim``."""
    schedule = make_schedule(optim, steps_per_epoch, num_epochs)
    name = optim.get("name", "sgd")
    wd = float(optim.get("weight_decay", 0.0) or 0.0)
    if name == "sgd":
        parts = [optax.add_decayed_weights(wd)] if wd else []
        parts.append(optax.sgd(schedule, momentum=float(optim.get("momentum", 0.9)) or None,
                               nesterov=bool(optim.get("nesterov", False))))
        return optax.chain(*parts), schedule
    if name == "adam":
        parts = [optax.add_decayed_weights(wd)] if wd else []
        parts.append(optax.adam(schedule))
        return optax.chain(*parts), schedule
    if name == "adamw":
        return optax.adamw(schedule, weight_decay=wd), schedule
    raise ValueError(f"config.optim.name must be one of {OPTIMIZERS}; got {name!r}")
