"""The functional model interface of jaxkd and the Linen adapter.

A model is a pair of pure functions bundled in :class:`ModelFns`::

    variables = fns.init(rng, x)        # {"params": ..., "batch_stats": ...} (plain dicts)
    logits, features, new_state = fns.apply(variables, x, train, rng=None)

``new_state`` is ``variables`` without ``"params"``: updated by a train-mode call (BatchNorm
statistics), returned unchanged by an eval-mode call, ``{}`` for a model without state, so a
train step writes ``variables = {"params": params, **new_state}``. ``features`` maps tap names
to arrays (NHWC for images) and always holds ``"logits"``; jaxkd's own models also always
hold ``"embedding"`` (the pooled pre-classifier vector), see :mod:`jaxkd.models`.
``train`` is a Python bool: mark it static under ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax.core import unfreeze
from flax.core.scope import DenyList

Array = jax.Array
Variables = dict[str, Any]
Features = dict[str, Array]
ApplyOutput = tuple[Array, Features, Variables]

__all__ = ["ModelFns", "count_params", "from_linen", "split_model_output"]


@dataclasses.dataclass(frozen=True)
class ModelFns:
    """A model as two pure functions.

    Attributes:
      name: registry name of the model (e.g. ``"resnet8x4"``).
      init: ``init(rng, x) -> variables``, a plain nested dict ``{"params": ...}`` plus the
        model's state collections (e.g. ``"batch_stats"``). ``x`` is an example batch.
      apply: ``apply(variables, x, train, rng=None) -> (logits, features, new_model_state)``.
        ``rng`` is the dropout key (ignored by models without dropout). In train mode the
        state (BatchNorm running statistics) is updated and returned; in eval mode BatchNorm
        uses the running statistics and the input state is returned unchanged.
    """

    name: str
    init: Callable[[Array, Array], Variables]
    apply: Callable[..., ApplyOutput]


def count_params(params: Any) -> int:
    """Number of scalars in a pytree of arrays (pass ``variables["params"]`` to count weights).

    Works on concrete arrays and on ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape``).
    """
    return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params)))


def split_model_output(out: Any) -> tuple[Array, Features]:
    """Normalise a module's output to ``(logits, features)``.

    Accepts ``logits`` or ``(logits, features_mapping)``; the returned features dict always
    has ``"logits"`` (set to the returned logits when the module did not provide it).
    """
    if isinstance(out, tuple):
        if len(out) != 2 or not isinstance(out[1], Mapping):
            raise ValueError(
                "a model must return logits or (logits, features: dict); got a tuple of "
                f"{len(out)} items"
            )
        logits, features = out[0], dict(out[1])
    else:
        logits, features = out, {}
    features.setdefault("logits", logits)
    return logits, features


def _is_sown(tree) -> bool:
    """A collection written by ``sow``: every value is a tuple (sow's default ``reduce_fn``)."""
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda v: isinstance(v, tuple))
    return bool(leaves) and all(isinstance(v, tuple) for v in leaves)


def _add_sown(features: dict, sown: Mapping[str, Any], name: str) -> None:
    """Adds what the module sowed to ``features``: ``"intermediates"`` under the module path
    (``"block0/attn_probs"``), other collections prefixed with theirs (``"attention/block0/probs"``).
    A value sown once is the array itself, sown ``n`` times ``".../0"`` .. ``".../n-1"``."""
    for coll, tree in sown.items():
        flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda v: isinstance(v, tuple))
        for path, value in flat:
            key = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
            key = key if coll == "intermediates" else f"{coll}/{key}"
            items = [(key, value[0])] if isinstance(value, tuple) and len(value) == 1 else (
                [(f"{key}/{i}", v) for i, v in enumerate(value)] if isinstance(value, tuple) else [(key, value)])
            for k, v in items:
                if k in features:
                    raise ValueError(f"from_linen({name!r}): the module sows {k!r} and also returns a feature of "
                                     "that name; rename one")
                features[k] = v


def from_linen(module: nn.Module, name: str) -> ModelFns:
    """Wrap a Linen module whose ``__call__(x, train)`` returns logits or (logits, features).

    ``init`` calls ``module.init`` in eval mode with the same key for the ``"params"`` and
    ``"dropout"`` streams. ``apply`` marks every non-``"params"`` collection mutable and passes
    ``rng`` as the ``"dropout"`` stream: state collections (``"batch_stats"``) come back updated in
    train mode (unchanged in eval mode), and everything the module ``sow``s, in any collection,
    comes back in the features (``"intermediates"`` by module path, e.g. ``"block0/attn_probs"``;
    other collections prefixed with their name). Nothing sown is dropped.

    If the module's features lack ``"embedding"``, the input of the last ``nn.Dense`` called
    in the forward pass (the classifier of a standard network) is used; a module that calls
    no ``nn.Dense`` must return ``(logits, {"embedding": ...})`` itself.
    """

    def init(rng: Array, x: Array) -> Variables:
        variables = unfreeze(module.init({"params": rng, "dropout": rng}, x, train=False))
        # what the module sowed during init is output, not state
        return {k: v for k, v in variables.items() if k == "params" or not _is_sown(v)}

    def apply(
        variables: Mapping[str, Any], x: Array, train: bool, rng: Array | None = None
    ) -> ApplyOutput:
        state = {k: v for k, v in variables.items() if k != "params"}
        rngs = None if rng is None else {"dropout": rng}
        dense_inputs: list[Array] = []

        def record_dense_input(next_fun, args, kwargs, context):
            if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
                dense_inputs.append(args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record_dense_input):
            # every collection but the params is mutable, so values the module sows (Flax's idiom
            # for attention weights and other taps) come back instead of being dropped
            out, updates = module.apply(variables, x, train=train, rngs=rngs, mutable=DenyList("params"))
        updates = unfreeze(updates)
        new_state = {**state, **{k: updates[k] for k in state if k in updates}} if train else state
        sown = {k: v for k, v in updates.items() if k not in state}
        logits, features = split_model_output(out)
        _add_sown(features, sown, name)
        if "embedding" not in features:
            if not dense_inputs:
                raise ValueError(
                    f"from_linen({name!r}): the module returned no 'embedding' feature and "
                    "called no nn.Dense; return (logits, {'embedding': pooled_vector})"
                )
            features["embedding"] = dense_inputs[-1]
        return logits, features, new_state

    return ModelFns(name=name, init=init, apply=apply)
