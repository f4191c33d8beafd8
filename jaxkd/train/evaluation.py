"""Evaluation passes: accuracy and mean cross-entropy over a whole split, and the selection key
that picks a run's best checkpoint (:func:`jaxkd.train.checkpoint.improves`)."""

from __future__ import annotations

import collections

import jax

from jaxkd import data as data_lib
from jaxkd.train import step as step_lib


def evaluate(eval_step, variables, source, batch_size: int, mesh) -> dict:
    """Accuracy and mean CE over the whole ``source`` (padded last batch masked)."""
    sums = collections.defaultdict(float)
    shard_index, shard_count = jax.process_index(), jax.process_count()
    for batch in data_lib.eval_batches(source, batch_size, shard_index=shard_index, shard_count=shard_count):
        batch = {k: batch[k] for k in ("image", "label", "mask")}
        out = jax.device_get(eval_step(variables, step_lib.shard_batch(batch, mesh)))
        for k, v in out.items():
            sums[k] += float(v)
    n = max(sums["count"], 1.0)
    return {"accuracy": sums["correct"] / n, "loss": sums["loss_sum"] / n, "count": int(sums["count"])}


def evaluate_for_selection(eval_step, variables, eval_src, val_src, batch_size: int, mesh):
    """``(eval-split result, validation result or None, selection key)``. The key picks the best
    checkpoint: ``(validation accuracy, -validation loss)`` when there is a validation set, else
    ``(eval-split accuracy,)``."""
    ev = evaluate(eval_step, variables, eval_src, batch_size, mesh)
    if val_src is None:
        return ev, None, (ev["accuracy"],)
    ev_val = evaluate(eval_step, variables, val_src, batch_size, mesh)
    return ev, ev_val, (ev_val["accuracy"], -ev_val["loss"])
