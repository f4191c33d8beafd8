"""Multi-teacher recipes: ``gamma * CE + alpha * (ensemble KD term)``.

The config names several teachers (``config.teachers`` or a list in ``config.teacher.workdir``,
see :func:`jaxkd.train.setup.teacher_specs`); the step runs them as one ensemble model whose
logits are ``[N, B, C]`` (:mod:`jaxkd.models.ensemble`). A single teacher works too (N = 1).

* ``ensemble_kd`` (a): KD from the weighted average of the teachers' soft labels; weights
  uniform, fixed per teacher (``weights``) or per teacher and example from the teachers'
  confidence (``confidence="neg_entropy"`` or ``"max_prob"``, see
  :func:`jaxkd.losses.confidence_weights`).
* ``random_teacher_kd`` (b): each example (``per="example"``) or each batch
  (``per="batch"``) learns from one teacher drawn from the step's loss RNG (reproducible).
* ``relabel_kd`` (c): every teacher's soft labels as a separate target for the same example,
  i.e. the data set expanded N times, computed in one step (:func:`jaxkd.losses.relabel_kd`
  says what that changes). Its gradient is uniform averaging's (``ensemble_kd``).
* ``relabel_data_kd`` (c, as data): the data set itself expanded N times
  (``config.data.copies = N``, :class:`jaxkd.data.RepeatedSource`): each epoch holds every
  example N times, copy ``n`` carrying teacher ``n``'s soft labels, shuffled, so an epoch is N
  times as long and the copies meet the student in different batches and augmentations.

The losses are the pure functions of :mod:`jaxkd.losses.ensemble`.
"""

from __future__ import annotations

from typing import Any, Sequence

from jaxkd import losses
from jaxkd.core import LossInputs, Recipe, register_recipe
from jaxkd.methods.common import ce_plus_kd

__all__ = ["ensemble_kd_recipe", "random_teacher_kd_recipe", "relabel_data_kd_recipe", "relabel_kd_recipe"]


def _with_ce(name: str, kd_fn, temperature: float, alpha: Any, gamma: Any) -> Recipe:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    return Recipe(name=name, loss=lambda inp: ce_plus_kd(inp, gamma, alpha, kd_fn), uses_teacher=True,
                  multi_teacher=True)


def ensemble_kd_recipe(temperature: float = 4.0, alpha: Any = 0.9, gamma: Any = 0.1,
                       weights: Sequence[float] | None = None, confidence: str | None = None,
                       weight_temperature: float = 1.0) -> Recipe:
    """(a) ``gamma CE + alpha T^2 KL(sum_n w_n p_n || q)``.

    ``weights``: fixed per-teacher weights (normalised), or ``confidence`` (``"neg_entropy"``
    or ``"max_prob"``): per-example weights ``softmax_n(confidence / weight_temperature)``
    computed from the teachers' probabilities at temperature ``T``. Not both.
    """
    if weights is not None and confidence is not None:
        raise ValueError("give fixed weights or a confidence weighting, not both")
    if confidence is not None and confidence not in losses.CONFIDENCE_KINDS:
        raise ValueError(f"unknown confidence {confidence!r}; expected one of {losses.CONFIDENCE_KINDS}")
    if weights is not None:
        weights = tuple(float(w) for w in weights)
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum; got {weights}")

    def kd(inp: LossInputs):
        t = losses.as_teacher_stack(inp.teacher_logits)
        w = weights
        if w is not None and len(w) != t.shape[0]:
            raise ValueError(f"method.weights has {len(w)} entries for {t.shape[0]} teachers")
        if confidence is not None:
            w = losses.confidence_weights(t, confidence, temperature, weight_temperature)
        return losses.ensemble_kd(inp.student_logits, t, temperature, w)

    return _with_ce("ensemble_kd", kd, temperature, alpha, gamma)


def random_teacher_kd_recipe(temperature: float = 4.0, alpha: Any = 0.9, gamma: Any = 0.1,
                             per: str = "example") -> Recipe:
    """(b) ``gamma CE + alpha T^2 KL(p_k || q)``, ``k`` drawn per example or per batch from the
    step's loss RNG (the run's seed and the step fix it)."""
    if per not in ("example", "batch"):
        raise ValueError(f"per must be 'example' or 'batch'; got {per!r}")
    return _with_ce("random_teacher_kd",
                    lambda inp: losses.random_teacher_kd(inp.student_logits, inp.teacher_logits, inp.rng,
                                                         temperature, per),
                    temperature, alpha, gamma)


def relabel_kd_recipe(temperature: float = 4.0, alpha: Any = 0.9, gamma: Any = 0.1) -> Recipe:
    """(c) ``gamma CE + alpha (1/N) sum_n T^2 KL(p_n || q)``: each teacher's soft labels as a
    separate target for the same example (the N-times expanded data set, in one step)."""
    return _with_ce("relabel_kd",
                    lambda inp: losses.relabel_kd(inp.student_logits, inp.teacher_logits, temperature),
                    temperature, alpha, gamma)


def relabel_data_kd_recipe(temperature: float = 4.0, alpha: Any = 0.9, gamma: Any = 0.1) -> Recipe:
    """(c) on the expanded data set: ``gamma CE + alpha T^2 KL(p_{copy} || q)``, the teacher of
    each row picked by the batch's ``copy`` field. Needs ``config.data.copies`` equal to the
    number of teachers (checked when the step is traced)."""
    def kd(inp: LossInputs):
        batch = inp.batch or {}
        if "copy_onehot" not in batch:
            raise ValueError("relabel_data_kd needs batches with a 'copy' field: set config.data.copies to the "
                             "number of teachers")
        t = losses.as_teacher_stack(inp.teacher_logits)
        if batch["copy_onehot"].shape[-1] != t.shape[0]:
            raise ValueError(f"relabel_data_kd: config.data.copies={batch['copy_onehot'].shape[-1]} but there are "
                             f"{t.shape[0]} teachers; they must be equal")
        return losses.relabel_data_kd(inp.student_logits, t, batch["copy_onehot"], temperature)

    return _with_ce("relabel_data_kd", kd, temperature, alpha, gamma)


register_recipe("ensemble_kd", ensemble_kd_recipe)
register_recipe("random_teacher_kd", random_teacher_kd_recipe)
register_recipe("relabel_kd", relabel_kd_recipe)
register_recipe("relabel_data_kd", relabel_data_kd_recipe)
