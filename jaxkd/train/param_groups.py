"""Per-group optimizers: the student's and the auxiliary modules' params each with their own.

A recipe's ``aux_optim`` (see :class:`~jaxkd.core.Recipe`) gives the auxiliary params
(``params["aux"]``: a jointly trained teacher, a discriminator, ...) an optimizer of their
own, built from ``config.optim`` updated with those keys (a full optimizer config works too),
with its own learning-rate schedule and state: one ``optax.multi_transform`` over the params
tree, so both still update in the one jitted step (``{}``: the same settings, separate
state). With ``aux_optim=None`` the stage's single optimizer is returned unchanged (same
transformation, same state structure).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import optax

from jaxkd.train import optim as optim_lib


def group_labels(params) -> dict:
    """``"student"`` for every student leaf, ``"aux"`` for every auxiliary one."""
    return {k: jax.tree.map(lambda _, k=k: "aux" if k == "aux" else "student", v) for k, v in params.items()}


def make_optimizer(optim: Mapping[str, Any], aux_optim: Mapping[str, Any] | None, steps_per_epoch: int,
                   num_epochs: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(optimizer, student lr schedule)`` for a stage; see the module docstring."""
    tx, schedule = optim_lib.make_optimizer(optim, steps_per_epoch, num_epochs)
    if aux_optim is None:
        return tx, schedule
    aux_tx, _ = optim_lib.make_optimizer({**dict(optim), **dict(aux_optim)}, steps_per_epoch, num_epochs)
    return optax.multi_transform({"student": tx, "aux": aux_tx}, group_labels), schedule
