"""Recipes: what a distillation method adds to the one generic train step.

A :class:`Recipe` names the loss (a pure function of the student's and the teacher's
outputs), whether a teacher is needed, optional auxiliary trainable modules (a FitNets
regressor, a discriminator, ...) and which parameter groups train. The train step in
:mod:`jaxkd.train.step` is the same for every recipe.

Weights such as Hinton's ``alpha`` and ``gamma`` may be constants or schedules
(see :func:`make_weight_schedule`), evaluated at the global step inside jit.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from jaxkd import losses
from jaxkd.core import LossFn, LossInputs, Recipe, make_weight_schedule

__all__ = ["RECIPES", "LossFn", "LossInputs", "Recipe", "build_recipe", "cross_entropy_recipe",
           "hinton_kd_recipe", "make_weight_schedule"]


def cross_entropy_recipe(label_smoothing: float = 0.0) -> Recipe:
    """Plain supervised training (teachers, baselines)."""

    def loss(inp: LossInputs):
        ce = losses.cross_entropy(inp.student_logits, inp.labels, label_smoothing)
        return ce, {"ce": ce}

    return Recipe(name="ce", loss=loss)


def hinton_kd_recipe(temperature: float = 4.0, alpha: Any = 0.9, gamma: Any = 0.1,
                     mode: str = "kl") -> Recipe:
    """``gamma * CE(y, s) + alpha * hinton_kd(s, t; T, mode)``.

    RepDistiller's CIFAR runs use gamma=0.1, alpha=0.9, T=4 (the defaults). Hinton's
    ``(1 - alpha) * CE + alpha * KD`` form is gamma = 1 - alpha. ``alpha``/``gamma`` may
    be schedules (:func:`make_weight_schedule`).
    """
    if mode not in losses.KD_MODES:
        raise ValueError(f"unknown hinton_kd mode {mode!r}; expected one of {losses.KD_MODES}")
    alpha_fn, gamma_fn = make_weight_schedule(alpha), make_weight_schedule(gamma)

    def loss(inp: LossInputs):
        ce = losses.cross_entropy(inp.student_logits, inp.labels)
        kd = losses.hinton_kd(inp.student_logits, inp.teacher_logits, temperature, mode)
        total = (gamma_fn(inp.stage_step, inp.stage_progress) * ce
                 + alpha_fn(inp.stage_step, inp.stage_progress) * kd)
        return total, {"ce": ce, "kd": kd}

    return Recipe(name="hinton_kd", loss=loss, uses_teacher=True, teacher_logits_only=True,
                  teacher_temperature=float(temperature))


# Methods of other families live in jaxkd.methods (they depend only on jaxkd.core).
from jaxkd.methods.bss import bss_recipe  # noqa: E402
from jaxkd.methods.feature_kd import (attention_recipe, fitnets_hint_recipe, fitnets_recipe,  # noqa: E402
                                      fsp_recipe)
from jaxkd.methods.apprentice import apprentice_recipe  # noqa: E402
from jaxkd.methods.label_refinery import label_refinery_recipe  # noqa: E402
from jaxkd.methods.ensemble import ensemble_kd_recipe, random_teacher_kd_recipe, relabel_kd_recipe  # noqa: E402
from jaxkd.methods.meal import meal_v2_recipe  # noqa: E402

RECIPES: dict[str, Callable[..., Recipe]] = {
    "ce": cross_entropy_recipe,
    "hinton_kd": hinton_kd_recipe,
    "bss": bss_recipe,
    "fitnets": fitnets_recipe,
    "fitnets_hint": fitnets_hint_recipe,
    "at": attention_recipe,
    "fsp": fsp_recipe,
    "apprentice": apprentice_recipe,
    "label_refinery": label_refinery_recipe,
    "ensemble_kd": ensemble_kd_recipe,
    "random_teacher_kd": random_teacher_kd_recipe,
    "relabel_kd": relabel_kd_recipe,
    "meal_v2": meal_v2_recipe,
}


def build_recipe(method: Mapping[str, Any]) -> Recipe:
    """Builds a recipe from ``config.method`` (``name`` plus that recipe's keyword options)."""
    method = dict(method)
    name = method.pop("name", None)
    if name not in RECIPES:
        import difflib
        close = difflib.get_close_matches(str(name), RECIPES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown method {name!r}; available: {sorted(RECIPES)}.{hint}")
    factory = RECIPES[name]
    import inspect
    accepted = set(inspect.signature(factory).parameters)
    unknown = sorted(set(method) - accepted)
    if unknown:
        raise ValueError(f"method {name!r} does not take option(s) {unknown}; it takes {sorted(accepted)}")
    return factory(**method)
