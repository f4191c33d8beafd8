"""Adapter from a Flax NNX module to jaxkd's pure :class:`~jaxkd.models.base.ModelFns`.

NNX modules are stateful Python objects; jaxkd's train loop wants pure functions of plain
dicts. ``from_nnx`` splits the module once (``nnx.split(module, nnx.Param, ...)``) into a
graph definition and two states, and every ``apply`` rebuilds a fresh module from the
graph definition and the dicts it is given, so nothing leaks between calls or out of a
``jax.jit`` trace.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from jaxkd.models.base import ApplyOutput, ModelFns, Variables, _add_sown, split_model_output

Array = jax.Array

__all__ = ["from_nnx"]


def _abstract(state: nnx.State) -> nnx.State:
    """Shape/dtype skeleton of a state (keeps the variable types, drops the arrays)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)


def _fill(template: nnx.State, pure: Mapping[str, Any]) -> nnx.State:
    """A new state with ``template``'s variable types and ``pure``'s values."""
    state = jax.tree.map(lambda a: a, template)  # fresh Variable objects
    nnx.replace_by_pure_dict(state, pure)
    return state


def from_nnx(module: nnx.Module, name: str) -> tuple[ModelFns, Variables]:
    """Wrap an NNX module as ``ModelFns`` plus its current variables.

    Args:
      module: an initialised NNX module whose ``__call__(x)`` returns logits or
        ``(logits, features)``. Train/eval mode is set with ``module.train()`` /
        ``module.eval()`` semantics (``deterministic`` and ``use_running_average`` of every
        submodule that has them).
      name: model name recorded in the returned ``ModelFns``.

    Returns:
      ``(fns, variables)`` with ``variables = {"params": ..., "model_state": ...}`` as plain
      nested dicts: ``params`` holds the ``nnx.Param`` values, ``model_state`` everything else
      (``BatchStat``, RNG keys and counts of ``nnx.Dropout`` streams, ...) and is omitted when
      empty. ``fns.init(rng, x)`` returns these variables (an NNX module is initialised when
      it is constructed, so ``rng`` and ``x`` are unused). ``fns.apply(variables, x, train,
      rng=None)`` returns ``(logits, features, new_model_state)``: in train mode
      ``new_model_state`` holds the updated BatchNorm statistics and RNG counts, in eval mode
      it is the input state. A given ``rng`` reseeds the module's ``"dropout"`` stream.
      ``features`` has ``"logits"`` plus whatever the module returned, plus every value it
      ``sow``s as an ``nnx.Intermediate`` (the call runs under ``nnx.capture``), keyed by
      attribute path: ``self.sow(nnx.Intermediate, "out", h)`` in ``self.block1`` gives the
      tap ``"block1/out"``, in the top module ``"out"`` (a value sown ``n`` times:
      ``"out/0"`` .. ``"out/n-1"``). Return ``(logits, {"embedding": pooled})`` to support
      embedding-based losses.
    """
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    params_template, rest_template = _abstract(params), _abstract(rest)
    variables: Variables = {"params": nnx.to_pure_dict(params)}
    rest_pure = nnx.to_pure_dict(rest)
    if rest_pure:
        variables["model_state"] = rest_pure

    def init(rng: Array, x: Array) -> Variables:
        del rng, x
        return jax.tree.map(lambda a: a, variables)

    def apply(
        variables: Mapping[str, Any], x: Array, train: bool, rng: Array | None = None
    ) -> ApplyOutput:
        state = {k: v for k, v in variables.items() if k != "params"}
        model = nnx.merge(
            graphdef,
            _fill(params_template, variables["params"]),
            _fill(rest_template, state.get("model_state", {})),
        )
        if train:
            model.train()
        else:
            model.eval()
        if rng is not None:
            nnx.reseed(model, dropout=rng)
        out, sown = nnx.capture(model, nnx.Intermediate)(x)
        logits, features = split_model_output(out)
        sown = nnx.to_pure_dict(sown)
        if sown:
            _add_sown(features, {"intermediates": sown}, name)
        if train and state:
            _, _, new_rest = nnx.split(model, nnx.Param, ...)
            state = {**state, "model_state": nnx.to_pure_dict(new_rest)}
        return logits, features, state

    return ModelFns(name=name, init=init, apply=apply), variables
