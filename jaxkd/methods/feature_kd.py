"""Feature-level distillation recipes: FitNets hints, attention transfer, FSP.

Each recipe is ``gamma * CE + alpha * hinton_kd + beta * feature_loss`` on named feature taps
(see :mod:`jaxkd.models` for the tap names); the losses themselves are the pure functions of
:mod:`jaxkd.losses.features`. Staging (FitNets' two stages, FSP's initialisation stage) is
declared in the config's ``stages``; the recipes below are the per-stage pieces:

* ``fitnets``: RepDistiller's one-stage FitNets, ``CE + 100 * hint`` trained jointly.
* ``fitnets_hint``: FitNets stage 1 (paper, torchdistill): only the student's layers up to
  the guided layer and the regressor train, on the hint loss alone.
* ``at``: attention transfer, ``CE (+ KD) + beta * AT`` summed over layer pairs.
* ``fsp``: FSP matrices of consecutive layers; RepDistiller uses it alone in an
  initialisation stage (layers up to the last tapped one train), followed by CE (+ KD).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp

from jaxkd import losses
from jaxkd.core import LossInputs, Recipe, aux_variables, register_recipe, with_aux_state
from jaxkd.methods.common import ce_plus_kd
from jaxkd.models.regressor import make_hint_regressor

DEFAULT_LAYERS = ("stage1", "stage2", "stage3")


def _logit_terms(inp: LossInputs, gamma: Any, alpha: Any, temperature: float):
    """``gamma * CE + alpha * KD`` (per example) and the parts that are switched on."""
    return ce_plus_kd(inp, gamma, alpha, lambda i: losses.hinton_kd(i.student_logits, i.teacher_logits, temperature))


def _taps(features, names: Sequence[str], who: str):
    missing = [n for n in names if n not in features]
    if missing:
        raise ValueError(f"{who} has no feature(s) {missing}; it has {sorted(features)}")
    return [features[n] for n in names]


def _hint_recipe(name: str, student_layer: str, teacher_layer: str, beta: float, gamma: Any, alpha: Any,
                 temperature: float, train_up_to: str | None, layout: str = "NHWC") -> Recipe:
    def init_aux(rng, s_feats, t_feats):
        s = _taps(s_feats, [student_layer], "the student")[0]
        t = _taps(t_feats, [teacher_layer], "the teacher")[0]
        regressor = make_hint_regressor(s.shape, t.shape, layout=layout)
        variables = regressor.init(rng, jnp.zeros((1, *s.shape[1:]), jnp.float32), train=False)
        return {k: {"regressor": v} for k, v in variables.items()}

    def loss(inp: LossInputs):
        s = _taps(inp.student_features, [student_layer], "the student")[0]
        t = _taps(inp.teacher_features, [teacher_layer], "the teacher")[0]
        regressor = make_hint_regressor(s.shape, t.shape, layout=layout)
        variables = aux_variables(inp.aux_params, inp.aux_state, "regressor")
        regressed, new_vars = regressor.apply(variables, s, train=True, mutable=["batch_stats"])
        hint = losses.fitnets_hint(regressed, t)
        total, parts = _logit_terms(inp, gamma, alpha, temperature)
        parts["hint"] = hint
        return total + beta * hint, parts, with_aux_state(inp.aux_state, "regressor", new_vars)

    return Recipe(name=name, loss=loss, uses_teacher=True, init_aux=init_aux, train_up_to=train_up_to)


def fitnets_recipe(student_layer: str = "stage2", teacher_layer: str = "stage2", beta: float = 100.0,
                   gamma: Any = 1.0, alpha: Any = 0.0, temperature: float = 4.0, layout: str = "NHWC") -> Recipe:
    """One-stage FitNets (RepDistiller): ``gamma CE + alpha KD + beta hint`` jointly, beta=100.

    RepDistiller's ``hint_layer=2`` is the output of the second stage (``"stage2"``).
    ``layout="NLC"``: transformer token maps (e.g. ``"layer1/hidden"``), a linear regressor.
    """
    return _hint_recipe("fitnets", student_layer, teacher_layer, beta, gamma, alpha, temperature, None, layout)


def fitnets_hint_recipe(student_layer: str = "stage2", teacher_layer: str = "stage2",
                        beta: float = 1.0, layout: str = "NHWC") -> Recipe:
    """FitNets stage 1 (the paper): the hint loss alone, training only the student's layers that
    feed ``student_layer`` plus the regressor; every other parameter and batch statistic of the
    student stays bit-for-bit as it was. Follow it with a ``hinton_kd`` stage whose ``alpha``
    decays (e.g. ``{"type": "linear", "init": 4.0, "end": 1.0}`` over the stage, gamma 1)."""
    return _hint_recipe("fitnets_hint", student_layer, teacher_layer, beta, 0.0, 0.0, 4.0, student_layer, layout)


def attention_recipe(student_layers: Sequence[str] = DEFAULT_LAYERS, teacher_layers: Sequence[str] | None = None,
                     beta: float | None = None, mode: str = "code", p: float = 2.0, gamma: Any = 1.0,
                     alpha: Any = 0.0, temperature: float = 4.0, gradient_beta: float = 0.0,
                     gradient_p: float = 1.0, layout: str = "NHWC") -> Recipe:
    """Attention transfer: ``gamma CE + alpha KD + AT`` (beta inside AT; default 1000, "code"
    mode as RepDistiller and the authors' code; ``mode="paper"`` for the paper's form with its
    per-layer weight ``beta / (H_j W_j)``, ``"paper_unscaled"`` for jaxkd's earlier paper mode).

    ``gradient_beta > 0`` adds gradient-based attention transfer: the attention maps of the
    student's and the teacher's cross-entropy gradients w.r.t. the (augmented) input, computed
    with ``jax.grad`` inside the same jitted step (the student's twice differentiated),
    weighted by ``gradient_beta``. ``layers=()`` with ``gradient_beta > 0`` uses it alone.
    ``layout``: of the tapped maps, ``"NHWC"``, ``"NCHW"`` or ``"NLC"`` (transformer token maps).
    """
    student_layers = tuple(student_layers)
    teacher_layers = tuple(teacher_layers or student_layers)

    def loss(inp: LossInputs):
        total, parts = _logit_terms(inp, gamma, alpha, temperature)
        if student_layers:
            at = losses.attention_transfer(_taps(inp.student_features, student_layers, "the student"),
                                           _taps(inp.teacher_features, teacher_layers, "the teacher"),
                                           mode=mode, p=p, beta=beta, layout=layout)
            parts["at"] = at
            total = total + at
        if gradient_beta:
            def ce_of(apply_fn):
                return lambda x: losses.cross_entropy(apply_fn(x)[0], inp.labels)
            s_grad = losses.input_gradient(ce_of(inp.student_apply), inp.inputs)
            t_grad = losses.input_gradient(ce_of(inp.teacher_apply), inp.inputs)
            parts["grad_at"] = losses.gradient_attention_transfer(s_grad, t_grad, p=gradient_p)
            total = total + gradient_beta * parts["grad_at"]
        return total, parts

    return Recipe(name="at", loss=loss, uses_teacher=True)


def fsp_recipe(student_layers: Sequence[str] = ("stem",) + DEFAULT_LAYERS,
               teacher_layers: Sequence[str] | None = None, beta: float = 1.0, gamma: Any = 0.0,
               alpha: Any = 0.0, temperature: float = 4.0, train_all: bool = False, layout: str = "NHWC") -> Recipe:
    """FSP: ``beta * fsp_loss`` over consecutive pairs of the tapped layers (+ optional CE/KD).

    With the defaults (``gamma=alpha=0``) it is RepDistiller's initialisation stage: only the
    student layers up to the last tapped one train (``train_all=True`` trains everything).
    Teacher and student need equal channel counts at every tap.
    """
    student_layers = tuple(student_layers)
    teacher_layers = tuple(teacher_layers or student_layers)

    def loss(inp: LossInputs):
        fsp = losses.fsp_loss(_taps(inp.student_features, student_layers, "the student"),
                              _taps(inp.teacher_features, teacher_layers, "the teacher"), layout=layout)
        total, parts = _logit_terms(inp, gamma, alpha, temperature)
        parts["fsp"] = fsp
        return total + beta * fsp, parts

    return Recipe(name="fsp", loss=loss, uses_teacher=True,
                  train_up_to=None if train_all else student_layers[-1])



register_recipe("fitnets", fitnets_recipe)
register_recipe("fitnets_hint", fitnets_hint_recipe)
register_recipe("at", attention_recipe)
register_recipe("fsp", fsp_recipe)
