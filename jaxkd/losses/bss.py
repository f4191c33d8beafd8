"""The student loss of BSS (Heo et al., arXiv 1805.05532) and its weight schedules.

``CE(clean) + r * softCE_T(clean) + r_adv * softCE_T(adversarial)`` with ``T = 3`` and no
``T**2`` factor; the boundary-supporting samples themselves come from
:func:`jaxkd.methods.bss.boundary_supporting_samples`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxkd.losses.logits import cross_entropy, soft_cross_entropy

Array = jax.Array

__all__ = ["BSSLossTerms", "bss_loss", "bss_weights"]


def bss_weights(epoch, num_epochs=80) -> tuple[Array, Array]:
    """Loss weights of the BSS schedule: ``r = 3 (1 - e/E) + 1``,
    ``r_adv = max(2 (1 - 4e / (3E)), 0)`` (``r_adv`` is zero from ``e = 3E/4`` on).

    ``epoch`` is used as given (it may be fractional or traced); with 0-based epochs the first
    epoch gets ``r = 4``, ``r_adv = 2``.
    """
    e = jnp.asarray(epoch, jnp.float32)
    total = jnp.asarray(num_epochs, jnp.float32)
    r = 3.0 * (1.0 - e / total) + 1.0
    r_adv = jnp.maximum(2.0 * (1.0 - 4.0 * e / (3.0 * total)), 0.0)
    return r, r_adv


class BSSLossTerms(NamedTuple):
    """Pieces of the BSS student loss (see :func:`bss_loss`).

    Attributes:
      total: scalar, ``mean(clean) + r_adv * adversarial_mean``.
      clean: ``[B]`` per example ``CE + r * softCE_T`` on the clean batch.
      adversarial: ``[k]`` per adversarial row ``softCE_T``, zero on rows not in ``adv_mask``.
      adversarial_mean: scalar, mean of ``adversarial`` over the rows in ``adv_mask`` (0 if none).
      r, r_adv: the weights from :func:`bss_weights`.
    """

    total: Array
    clean: Array
    adversarial: Array
    adversarial_mean: Array
    r: Array
    r_adv: Array


def _soft_ce_t(student_logits: Array, teacher_logits: Array, temperature: float) -> Array:
    t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
    s = student_logits.astype(jnp.float32) / temperature
    return soft_cross_entropy(s, jax.nn.softmax(t, axis=-1))


def bss_loss(student_logits: Array, teacher_logits: Array, labels: Array,
             student_adv_logits: Array, teacher_adv_logits: Array, adv_mask: Array,
             epoch, num_epochs=80, temperature: float = 3.0) -> BSSLossTerms:
    """The BSS student loss ``CE + r softCE_T(clean) + r_adv softCE_T(adversarial)``.

    ``softCE_T(s, t) = -sum_c softmax(t/T)_c log softmax(s/T)_c`` with no ``T**2`` factor; the
    teacher logits are not differentiated. The clean terms are per example (``[B]``, averaged
    in ``total``); the adversarial term is averaged over the valid adversarial rows
    (``adv_mask``, e.g. :attr:`BSSResult.valid_mask`), and is zero when no row is valid.

    Args:
      student_logits, teacher_logits: ``[B, C]`` on the clean batch.
      labels: ``[B]`` integer labels.
      student_adv_logits, teacher_adv_logits: ``[k, C]`` on the BSS samples (e.g.
        ``BSSResult.teacher_logits`` for the teacher).
      adv_mask: ``[k]`` bool.
      epoch, num_epochs: for :func:`bss_weights`.
      temperature: ``T`` (3 in the paper).
    """
    r, r_adv = bss_weights(epoch, num_epochs)
    clean = cross_entropy(student_logits, labels) + r * _soft_ce_t(student_logits, teacher_logits,
                                                                    temperature)
    mask = adv_mask.astype(jnp.float32)
    adversarial = jnp.where(adv_mask, _soft_ce_t(student_adv_logits, teacher_adv_logits, temperature),
                            0.0)
    adversarial_mean = jnp.sum(adversarial) / jnp.maximum(jnp.sum(mask), 1.0)
    total = jnp.mean(clean) + r_adv * adversarial_mean
    return BSSLossTerms(total=total, clean=clean, adversarial=adversarial,
                        adversarial_mean=adversarial_mean, r=r, r_adv=r_adv)
