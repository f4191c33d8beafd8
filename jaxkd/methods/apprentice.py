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
**Unverified** (issue 19): no code by the authors exists in the code, issue and web indexes
searched (queries on the title, "Apprentice" with "joint training"/"scheme A", the loss terms);
IntelLabs/distiller cites the paper but refuses a teacher-vs-labels loss
(``NotImplementedError``), so it is not a reimplementation of Scheme A. The weights 1 / 0.5 /
0.5 agree with a third-party reading note of the paper; whether the distillation gradient
reaches the teacher, and at which temperature ``z_T`` enters, remain unverified, so the
defaults stay as above.

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

from jaxkd.core import LossInputs, Recipe, make_weight_schedule, register_recipe
from jaxkd.losses import apprentice_kd, apprentice_loss  # noqa: F401  (re-exported: the method's losses)

PAPER_WEIGHTS = {"teacher_weight": 1.0, "student_weight": 0.5, "kd_weight": 0.5}



def apprentice_recipe(teacher_weight: Any = 1.0, student_weight: Any = 0.5, kd_weight: Any = 0.5,
                      temperature: float = 1.0, kd_to_teacher: bool = False, train_teacher: bool = True,
                      teacher_optim: Mapping[str, Any] | None = None) -> Recipe:
    """Apprentice joint training (see the module docstring); paper weights 1 / 0.5 / 0.5, T = 1.

    Args:
      teacher_weight, student_weight, kd_weight: loss weights (numbers or schedules).
      temperature: distillation temperature (the paper: 1). Configs written before jaxkd 0.2
        called it ``kd_temperature``; they still load (:func:`jaxkd.config.upgrade_config`).
      kd_to_teacher: the distillation term's gradient also reaches the teacher (paper: no).
      train_teacher: ``False`` keeps the teacher's params and batch stats bit-for-bit as they
        started (a frozen, pretrained teacher in train-mode forward; mainly for tests).
      teacher_optim: overrides of ``config.optim`` for the teacher's own optimizer (``{}``:
        the same settings, separate state).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    wt, ws, wkd = (make_weight_schedule(w) for w in (teacher_weight, student_weight, kd_weight))

    def loss(inp: LossInputs):
        if inp.teacher_logits is None:
            raise ValueError("apprentice needs the jointly trained teacher's logits")
        t, p = inp.stage_step, inp.stage_progress
        return apprentice_loss(inp.student_logits, inp.teacher_logits, inp.labels, wt(t, p), ws(t, p),
                               wkd(t, p), temperature, kd_to_teacher)

    trainable = None if train_teacher else (lambda path: not path.startswith("aux/teacher"))
    return Recipe(name="apprentice", loss=loss, trains_teacher=True, trainable=trainable,
                  aux_optim=dict(teacher_optim or {}))


register_recipe("apprentice", apprentice_recipe)
