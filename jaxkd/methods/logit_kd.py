"""The logit methods that lead today's tables, as recipes: ``dkd``, ``dist``, and logit
standardisation as an option of Hinton KD (``hinton_kd_ls``) and of both of these.

* ``dkd`` (Zhao et al., CVPR 2022; mdistiller's ``DKD``): ``ce_weight * CE + w(epoch) *
  (alpha * TCKD + beta * NCKD)`` with the warm-up ``w = min(epoch / warmup_epochs, 1)`` over
  1-based epochs of the stage (mdistiller: 20 on CIFAR-100, 1 on ImageNet). mdistiller's
  defaults: ``alpha = 1``, ``beta = 8`` (resnet32x4 -> resnet8x4; 6 for wrn40-2 -> wrn16-2 and
  vgg13 -> vgg8, 2 for resnet56 -> resnet20), ``T = 4``, CE weight 1.
* ``dist`` (Huang et al., NeurIPS 2022; the authors' DIST_KD CIFAR code): ``ce_weight * CE +
  kd_weight * tau**2 * (beta * inter + gamma * intra)`` with ``beta = gamma = 1``, ``tau = 4``,
  ``kd_weight = 2``, ``ce_weight = 1``. The intra-class term is a correlation over the batch: a
  batch-level term, computed on the global batch (8 devices give 1 device's numbers).
* ``standardize=True`` (Sun et al., CVPR 2024): z-score both networks' logits before the
  temperature softmax. The softmax at ``T`` of the raw teacher logits is then no longer what the
  loss reads, so a top-k teacher cache is refused (a full-logit cache serves it).
  ``hinton_kd_ls`` is Hinton KD with it switched on and the authors' CIFAR-100 weights
  (``T = 2``, KD weight 9, CE weight 0.1).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jaxkd import losses
from jaxkd.core import LossInputs, LossOutput, Recipe, register_recipe
from jaxkd.methods.common import ce_plus_kd
from jaxkd.methods.kd import _check_temperature, _check_weights

__all__ = ["dist_recipe", "dkd_recipe", "hinton_kd_ls_recipe"]


def dkd_warmup(epoch, warmup_epochs: float):
    """mdistiller's ``min(epoch / warmup, 1)`` with ``epoch`` 0-based here (1-based there)."""
    if not warmup_epochs:
        return jnp.float32(1.0)
    return jnp.minimum((epoch + 1).astype(jnp.float32) / float(warmup_epochs), 1.0)


def dkd_recipe(alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, ce_weight: Any = 1.0,
               warmup_epochs: float = 20, standardize: bool = False) -> Recipe:
    """Decoupled KD (:func:`jaxkd.losses.dkd`) with CE and mdistiller's linear warm-up.

    ``warmup_epochs`` counts epochs of the stage; a run shorter than it never reaches the full
    weight (set it to the run's scale, or 0 for none)."""
    _check_temperature(temperature)
    _check_weights(alpha=alpha, beta=beta, ce_weight=ce_weight)
    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, (int, float)) or warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be a number >= 0; got {warmup_epochs!r}")

    def loss(inp: LossInputs):
        w = dkd_warmup(inp.epoch, warmup_epochs)
        total, parts = ce_plus_kd(inp, ce_weight, 1.0, lambda i: w * losses.dkd(
            i.student_logits, i.teacher_logits, i.labels, alpha, beta, temperature, standardize))
        parts["dkd_warmup"] = w
        return total, parts

    return Recipe(name="dkd", loss=loss, uses_teacher=True, teacher_logits_only=True,
                  teacher_temperature=None if standardize else float(temperature))


def dist_recipe(beta: float = 1.0, gamma: float = 1.0, temperature: float = 4.0, kd_weight: Any = 2.0,
                ce_weight: Any = 1.0, standardize: bool = False) -> Recipe:
    """DIST: inter-class relation per example, intra-class relation as a batch-level term."""
    _check_temperature(temperature)
    _check_weights(beta=beta, gamma=gamma, kd_weight=kd_weight, ce_weight=ce_weight)
    if not isinstance(kd_weight, (int, float)):
        raise ValueError(f"dist's kd_weight must be a number (the intra term is over the batch); got {kd_weight!r}")

    def loss(inp: LossInputs):
        inter, intra = losses.dist_loss(inp.student_logits, inp.teacher_logits, beta, gamma, temperature,
                                        standardize)
        total, parts = ce_plus_kd(inp, ce_weight, kd_weight, lambda i: inter)
        parts["dist_inter"], parts["dist_intra"] = inter, intra
        return LossOutput(per_example=total, parts=parts, batch_terms={"dist_intra": kd_weight * intra})

    return Recipe(name="dist", loss=loss, uses_teacher=True, teacher_logits_only=True,
                  teacher_temperature=None if standardize else float(temperature))


def hinton_kd_ls_recipe(temperature: float = 2.0, alpha: Any = 9.0, gamma: Any = 0.1, mode: str = "kl") -> Recipe:
    """Hinton KD on z-scored logits (logit standardisation): ``gamma CE + alpha KD(std(s), std(t); T)``.

    Defaults from the authors' CIFAR-100 KD runs: ``T = 2``, KD weight 9, CE weight 0.1."""
    if mode not in losses.KD_MODES:
        raise ValueError(f"unknown hinton_kd mode {mode!r}; expected one of {losses.KD_MODES}")
    _check_temperature(temperature)
    _check_weights(alpha=alpha, gamma=gamma)

    def loss(inp: LossInputs):
        return ce_plus_kd(inp, gamma, alpha, lambda i: losses.hinton_kd(
            losses.standardize_logits(i.student_logits), losses.standardize_logits(i.teacher_logits),
            temperature, mode))

    # teacher_temperature None: a top-k cache cannot give the standardised logits
    return Recipe(name="hinton_kd_ls", loss=loss, uses_teacher=True, teacher_logits_only=True)


register_recipe("dkd", dkd_recipe)
register_recipe("dist", dist_recipe)
register_recipe("hinton_kd_ls", hinton_kd_ls_recipe)
