"""Several teachers as one :class:`~jaxkd.models.ModelFns`, so the train step runs them unchanged.

The ensemble's ``apply(variables, x, train, rng=None)`` returns logits of shape ``[N, B, C]``
(teacher axis first), which the multi-teacher recipes (:mod:`jaxkd.methods.ensemble`) read
from ``LossInputs.teacher_logits``.

* Same architecture (:func:`stacked_ensemble`): the N variable trees are stacked along a new
  leading axis (:func:`stack_variables`) and one ``jax.vmap``-ped forward runs all teachers;
  every feature comes back with the leading teacher axis, ``[N, ...]``.
* Different architectures (:func:`tuple_ensemble`): the variables are a tuple, one tree per
  teacher, and the teachers run one after the other inside the same jit; the logits are
  stacked (same number of classes) and the other features are returned per teacher under
  ``"teacher<n>/<tap>"`` (their shapes differ).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.models.base import ModelFns

__all__ = ["stack_variables", "stacked_ensemble", "tuple_ensemble", "unstack_variables"]


def stack_variables(variables: Sequence[dict]) -> dict:
    """Stacks N variable trees of one architecture along a new leading axis (numpy, host)."""
    variables = list(variables)
    if not variables:
        raise ValueError("stack_variables needs at least one variable tree")
    first = jax.tree_util.tree_structure(variables[0])
    for i, v in enumerate(variables[1:], 1):
        if jax.tree_util.tree_structure(v) != first:
            raise ValueError(f"teacher {i} has a different variable tree from teacher 0; "
                             "stack only teachers of the same architecture")
    return jax.tree.map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *variables)


def unstack_variables(stacked: dict, n: int) -> list[dict]:
    """The inverse of :func:`stack_variables`."""
    return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n)]


def stacked_ensemble(model: ModelFns, num_teachers: int) -> ModelFns:
    """N teachers of the architecture ``model``, params stacked on a leading axis, one vmapped forward.

    ``init(rng, x)`` makes N independent initialisations (stacked); ``apply(stacked, x,
    train, rng=None)`` returns ``(logits [N, B, C], {tap: [N, ...]}, stacked new state)``.
    """
    if num_teachers < 1:
        raise ValueError(f"num_teachers must be >= 1; got {num_teachers}")

    def init(rng, x):
        return jax.vmap(lambda r: model.init(r, x))(jax.random.split(rng, num_teachers))

    def apply(variables, x, train=False, rng=None):
        return jax.vmap(lambda v: model.apply(v, x, train=train, rng=rng))(variables)

    return ModelFns(name=f"{num_teachers}x{model.name}", init=init, apply=apply)


def tuple_ensemble(models: Sequence[ModelFns]) -> ModelFns:
    """Teachers of different architectures; variables are a tuple (one tree per teacher).

    ``apply`` returns ``(logits [N, B, C], features, tuple of new states)`` where
    ``features`` holds ``"logits"`` (stacked) and every teacher's taps as ``"teacher<n>/<tap>"``.
    """
    models = tuple(models)
    if not models:
        raise ValueError("tuple_ensemble needs at least one model")

    def init(rng, x):
        return tuple(m.init(r, x) for m, r in zip(models, jax.random.split(rng, len(models))))

    def apply(variables, x, train=False, rng=None):
        if len(variables) != len(models):
            raise ValueError(f"expected variables for {len(models)} teachers; got {len(variables)}")
        outs = [m.apply(v, x, train=train, rng=rng) for m, v in zip(models, variables)]
        shapes = {o[0].shape for o in outs}
        if len(shapes) != 1:
            raise ValueError(f"the teachers' logits have different shapes {sorted(shapes)}; "
                             "an ensemble needs the same classes")
        logits = jnp.stack([o[0] for o in outs])
        features = {"logits": logits}
        for n, (_, feats, _) in enumerate(outs):
            features.update({f"teacher{n}/{k}": v for k, v in feats.items()})
        return logits, features, tuple(o[2] for o in outs)

    return ModelFns(name="+".join(m.name for m in models), init=init, apply=apply)
