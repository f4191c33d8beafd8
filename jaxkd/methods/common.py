"""What several recipes share: the weighted cross-entropy + distillation terms."""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

from jaxkd import losses
from jaxkd.core import LossInputs, make_weight_schedule


def ce_plus_kd(inp: LossInputs, gamma: Any, alpha: Any, kd: Callable[[LossInputs], Any] | None):
    """``gamma * CE(y, s) + alpha * kd(inp)`` per example, and the parts that are switched on.

    ``gamma``/``alpha`` are numbers or schedules (:func:`~jaxkd.core.make_weight_schedule`,
    evaluated at the stage's step); a term whose weight is the constant 0 is neither computed nor
    logged (a feature method without KD reads no teacher logits). Returns ``(total [B], parts)``
    with ``parts["ce"]``/``parts["kd"]`` per example.
    """
    total = jnp.zeros(inp.student_logits.shape[0], jnp.float32)
    parts = {}
    if not (isinstance(gamma, (int, float)) and gamma == 0):
        parts["ce"] = losses.cross_entropy(inp.student_logits, inp.labels)
        total = total + make_weight_schedule(gamma)(inp.stage_step, inp.stage_progress) * parts["ce"]
    if kd is not None and not (isinstance(alpha, (int, float)) and alpha == 0):
        parts["kd"] = kd(inp)
        total = total + make_weight_schedule(alpha)(inp.stage_step, inp.stage_progress) * parts["kd"]
    return total, parts


__all__ = ["ce_plus_kd"]
