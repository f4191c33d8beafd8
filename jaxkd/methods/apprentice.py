"""Apprentice (Mishra & Marr, arXiv 1711.05852): teacher and student trained jointly.

Per example, with ``p_T = softmax(z_T)``, ``p_S = softmax(z_S)`` and labels ``y``::

    L = w_t * H(y, p_T) + w_s * H(y, p_S) + w_kd * H(softmax(z_T / T), softmax(z_S / T)) * T**2

``H(p, q) = -sum_c p_c log q_c`` is the cross-entropy. The paper's "Scheme A" (joint training
from scratch) weights the three terms alpha = 1, beta = 0.5, gamma = 0.5 (teacher CE, student
CE, distillation) and uses the teacher's plain softmax (T = 1); these are the defaults here.
By default the teacher is updated by its own cross-entropy only: the distillation term's
target ``p_T`` is held constant (``stop_gradient``), so that term trains the student alone.
That is how we (and ``../shared/references.md``) read the paper's joint scheme;
``kd_to_teacher=True`` lets the distillation gradient flow into the teacher as well (the term
then also pulls the teacher towards the student). The weights and the gradient routing are
our reading of the paper; the PDF could not be re-checked from this environment.

The teacher is ``config.teacher``, trained inside the same jitted step as the auxiliary
module ``aux/teacher`` (``Recipe.trains_teacher``), from scratch or from the finished run in
``config.teacher.workdir``; it has its own optimizer (``teacher_optim``: keys overriding
``config.optim``, e.g. ``{"lr": 0.1}``) via ``Recipe.aux_optim``; its params, batch stats and
optimizer state are in the run's checkpoints; its eval accuracy is logged each epoch
(``eval/teacher_accuracy``) and its best weights land in ``WORKDIR/joint_teacher``. The
student may be a low-precision model (``model.kwargs.quant``, see :mod:`jaxkd.models.quant`),
the case the paper studies.
"""

from __future__ import annotations

from typing import Any, Mapping

import chex
import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.core import LossInputs, Recipe, make_weight_schedule

PAPER_WEIGHTS = {"teacher_weight": 1.0, "student_weight": 0.5, "kd_weight": 0.5}


def apprentice_kd(student_logits: chex.Array, teacher_logits: chex.Array, temperature: float = 1.0,
                  teacher_grad: bool = False) -> chex.Array:
    """``H(softmax(z_T / T), softmax(z_S / T)) * T**2`` per example (``[B]``).

    With ``teacher_grad=False`` the teacher's distribution is a constant target; else the
    gradient reaches ``teacher_logits`` too.
    """
    t = teacher_logits if teacher_grad else jax.lax.stop_gradient(teacher_logits)
    target = jax.nn.softmax(t.astype(jnp.float32) / temperature, axis=-1)
    return losses.soft_cross_entropy(student_logits.astype(jnp.float32) / temperature, target) * temperature ** 2


def apprentice_loss(student_logits: chex.Array, teacher_logits: chex.Array, labels: chex.Array,
                    teacher_weight: Any = 1.0, student_weight: Any = 0.5, kd_weight: Any = 0.5,
                    temperature: float = 1.0, teacher_grad: bool = False) -> tuple[chex.Array, dict]:
    """The Apprentice loss per example and its parts ``{"teacher_ce", "ce", "kd"}`` (each ``[B]``).

    Args:
      student_logits, teacher_logits: ``[B, C]``.
      labels: ``[B]`` integer labels.
      teacher_weight, student_weight, kd_weight: the weights ``w_t, w_s, w_kd`` (numbers or
        arrays, e.g. a schedule's value).
      temperature: ``T`` of the distillation term (the paper: 1).
      teacher_grad: let the distillation term's gradient reach the teacher.

    Example:
      >>> import jax.numpy as jnp
      >>> z = jnp.array([[2.0, 0.0]]); y = jnp.array([0])
      >>> total, parts = apprentice_loss(z, z, y)
      >>> bool(jnp.allclose(total, parts["teacher_ce"] + 0.5 * parts["ce"] + 0.5 * parts["kd"]))
      True
    """
    teacher_ce = losses.cross_entropy(teacher_logits, labels)
    ce = losses.cross_entropy(student_logits, labels)
    kd = apprentice_kd(student_logits, teacher_logits, temperature, teacher_grad)
    total = teacher_weight * teacher_ce + student_weight * ce + kd_weight * kd
    return total, {"teacher_ce": teacher_ce, "ce": ce, "kd": kd}


def apprentice_recipe(teacher_weight: Any = 1.0, student_weight: Any = 0.5, kd_weight: Any = 0.5,
                      kd_temperature: float = 1.0, kd_to_teacher: bool = False, train_teacher: bool = True,
                      teacher_optim: Mapping[str, Any] | None = None) -> Recipe:
    """Apprentice joint training (see the module docstring); paper weights 1 / 0.5 / 0.5, T = 1.

    Args:
      teacher_weight, student_weight, kd_weight: loss weights (numbers or schedules).
      kd_temperature: distillation temperature (the paper: 1; named so that the shared
        ``config.method.temperature`` default of Hinton KD configs is not picked up).
      kd_to_teacher: the distillation term's gradient also reaches the teacher (paper: no).
      train_teacher: ``False`` keeps the teacher's params and batch stats bit-for-bit as they
        started (a frozen, pretrained teacher in train-mode forward; mainly for tests).
      teacher_optim: overrides of ``config.optim`` for the teacher's own optimizer (``{}``:
        the same settings, separate state).
    """
    if kd_temperature <= 0:
        raise ValueError(f"kd_temperature must be > 0; got {kd_temperature}")
    wt, ws, wkd = (make_weight_schedule(w) for w in (teacher_weight, student_weight, kd_weight))

    def loss(inp: LossInputs):
        if inp.teacher_logits is None:
            raise ValueError("apprentice needs the jointly trained teacher's logits")
        t, p = inp.stage_step, inp.stage_progress
        return apprentice_loss(inp.student_logits, inp.teacher_logits, inp.labels, wt(t, p), ws(t, p),
                               wkd(t, p), kd_temperature, kd_to_teacher)

    trainable = None if train_teacher else (lambda path: not path.startswith("aux/teacher"))
    return Recipe(name="apprentice", loss=loss, trains_teacher=True, trainable=trainable,
                  aux_optim=dict(teacher_optim or {}))
