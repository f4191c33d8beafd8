"""Plain supervised training and Hinton knowledge distillation as recipes (``ce``, ``hinton_kd``)."""

from __future__ import annotations

from typing import Any

from jaxkd import losses
from jaxkd.core import LossInputs, Recipe, register_recipe
from jaxkd.methods.common import ce_plus_kd

__all__ = ["cross_entropy_recipe", "hinton_kd_recipe"]


def cross_entropy_recipe(label_smoothing: float = 0.0) -> Recipe:
    """Plain supervised training (teachers, baselines)."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing!r}")

    def loss(inp: LossInputs):
        ce = losses.cross_entropy(inp.student_logits, inp.labels, label_smoothing)
        return ce, {"ce": ce}

    return Recipe(name="ce", loss=loss)


def hinton_kd_recipe(temperature: float = 4.0, alpha: Any = 0.9, gamma: Any = 0.1, mode: str = "kl",
                     t2: bool = True) -> Recipe:
    """``gamma * CE(y, s) + alpha * hinton_kd(s, t; T, mode, t2)``.

    RepDistiller's CIFAR runs use gamma=0.1, alpha=0.9, T=4 (the defaults). Hinton's
    ``(1 - alpha) * CE + alpha * KD`` form is gamma = 1 - alpha. ``alpha``/``gamma`` may
    be schedules (:func:`~jaxkd.core.make_weight_schedule`). ``t2=False`` drops the ``T**2``
    factor of the KD term (the FitNets paper's stage 2: ``alpha`` 4 -> 1 on the unscaled term).
    """
    if not isinstance(t2, bool):
        raise ValueError(f"t2 must be True or False; got {t2!r}")
    if mode not in losses.KD_MODES:
        raise ValueError(f"unknown hinton_kd mode {mode!r}; expected one of {losses.KD_MODES}")
    _check_temperature(temperature)
    _check_weights(alpha=alpha, gamma=gamma)

    def loss(inp: LossInputs):
        return ce_plus_kd(inp, gamma, alpha,
                          lambda i: losses.hinton_kd(i.student_logits, i.teacher_logits, temperature, mode,
                                                           t2=t2))

    return Recipe(name="hinton_kd", loss=loss, uses_teacher=True, teacher_logits_only=True,
                  teacher_temperature=float(temperature))


def _check_temperature(temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0; got {temperature!r}")


def _check_weights(**weights) -> None:
    for name, w in weights.items():
        if isinstance(w, (int, float)) and not isinstance(w, bool) and w < 0:
            raise ValueError(f"{name} must be >= 0; got {w!r}")


register_recipe("ce", cross_entropy_recipe)
register_recipe("hinton_kd", hinton_kd_recipe)
