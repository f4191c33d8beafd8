"""Self-attention distillation of transformers: TinyBERT (two stages) and MiniLM (v1, v2).

Both read the taps of :mod:`jaxkd.models.transformer` (``embeddings``, ``layer{i}/hidden``,
``layer{i}/attn_scores|attn_probs|q|k|v``, ``token_mask``) of a transformer student and a
transformer teacher that cut the input into the same tokens (same ``L``); the losses are the pure
per-example functions of :mod:`jaxkd.losses.transformer`. Padding: the student's ``token_mask``
tap (1 real, 0 padding; all ones for patch inputs) is passed to every term.

``tinybert`` (Jiao et al., 2020; the official ``TinyBERT/task_distill.py``) is one recipe with a
``stage`` option; a run declares its two stages in ``config.stages`` (:func:`tinybert_stages`
builds them):

* ``stage="intermediate"`` (``--pred_distill`` off): ``att + rep``, unweighted sums as in the
  official code. ``att`` sums :func:`~jaxkd.losses.tinybert_attention_loss` over the layer
  pairs ``(i, g(i))`` of the layer map (default :func:`~jaxkd.losses.uniform_layer_map`, any
  other list of teacher layers can be given); ``rep`` sums
  :func:`~jaxkd.losses.tinybert_hidden_loss` over the embeddings (``0 -> 0``) and the same pairs
  of ``layer{i}/hidden``, the student's states projected by ONE learnable ``Dense(D_t)``, the
  official ``fit_dense`` shared by the embeddings and every layer. It is the auxiliary module
  ``aux/tinybert_fit``, declared once (``init_aux``) and trained with the student's optimizer.
  The classifier gets no gradient in this stage (``gamma=0``, as the official code).
* ``stage="prediction"`` (``--pred_distill``): the soft cross-entropy at ``T`` of
  :func:`~jaxkd.losses.tinybert_prediction_loss`, by default in the official class-averaging
  mode (``prediction_mode="reference"``: ``(-p_T log_softmax(z_S / T)).mean()`` over examples
  *and* classes); no hard-label term (``gamma=0``). ``aux/tinybert_fit`` is frozen (bit for bit).
  It reads the teacher only through ``softmax(z_T / T)``, so a teacher-output cache serves it.

``minilm`` (Wang et al., 2020): ``beta * (AT + VR)`` on the last layers, ``AT`` the KL of the
teacher's from the student's attention distributions per head
(:func:`~jaxkd.losses.minilm_attention_kl`), ``VR`` the KL of the value relations
``softmax(V V^T / sqrt(d_h))`` (:func:`~jaxkd.losses.minilm_value_relation`); the widths may
differ, the head counts must match. ``version="v2"`` (Wang et al., 2021) replaces both by the
multi-head self-attention relations Q-Q, K-K, V-V with ``num_relation_heads`` relation heads
(:func:`~jaxkd.losses.minilm_v2_relations`), head counts then free. The papers distil with
these terms alone (``gamma=alpha=0``, the default) and fine-tune afterwards: a second stage with
method ``ce`` (or ``hinton_kd``); ``gamma`` / ``alpha`` add CE / Hinton KD in the same stage.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.core import (
    LossInputs,
    LossOutput,
    Recipe,
    make_weight_schedule,
    register_recipe,
)
from jaxkd.losses.transformer import (
    MINILM_V2_RELATIONS,
    PREDICTION_MODES,
    TINYBERT_MODES,
)
from jaxkd.methods.common import ce_plus_kd

__all__ = ["FIT_MODULE", "TINYBERT_STAGES", "minilm_recipe", "num_layers", "resolve_layer",
           "resolve_layer_map", "tinybert_recipe", "tinybert_stages"]

TINYBERT_STAGES: tuple[str, ...] = ("intermediate", "prediction")
FIT_MODULE = "tinybert_fit"  # the auxiliary module: TinyBERT's shared projection (fit_dense)

_LAYER_TAP = re.compile(r"^layer(\d+)/attn_scores$")


def num_layers(features: Mapping[str, Any], who: str) -> int:
    """The number of blocks of a transformer from its taps (``layer0..layer{N-1}/attn_scores``)."""
    found = sorted(int(m.group(1)) for m in map(_LAYER_TAP.match, features) if m)
    if not found:
        raise ValueError(f"{who} has no transformer taps (layer{{i}}/attn_scores); it has {sorted(features)[:8]}... "
                         "use a transformer model (jaxkd.models.transformer)")
    if found != list(range(len(found))):
        raise ValueError(f"{who}'s layer taps are not layer0..layer{len(found) - 1}: {found}")
    return len(found)


def resolve_layer(layer: int, count: int, name: str) -> int:
    """A layer index in ``[-count, count)`` (negative from the end) as ``0..count-1``."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not -count <= layer < count:
        raise ValueError(f"{name} must be an int in [-{count}, {count}) (the model has {count} layers); got {layer!r}")
    return layer % count


def resolve_layer_map(layer_map: Sequence[int] | None, student_layers: int, teacher_layers: int) -> list[int]:
    """The teacher layer (0-based) each student layer learns from: the uniform map ``g(m) = m N / M``
    when ``layer_map`` is ``None``, else ``layer_map`` checked (one teacher layer per student layer)."""
    if layer_map is None:
        return losses.uniform_layer_map(student_layers, teacher_layers)
    layer_map = list(layer_map)
    if len(layer_map) != student_layers:
        raise ValueError(f"layer_map must name one teacher layer per student layer ({student_layers}); "
                         f"got {layer_map}")
    for t in layer_map:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < teacher_layers:
            raise ValueError(f"layer_map entries must be teacher layers in [0, {teacher_layers}); got {layer_map}")
    return layer_map


def _check_tokens(s_feats, t_feats) -> None:
    s, t = s_feats["embeddings"].shape, t_feats["embeddings"].shape
    if s[:2] != t[:2]:
        raise ValueError(f"student and teacher must see the same tokens: embeddings [B, L, D] {tuple(s)} vs "
                         f"{tuple(t)} (use the same patch size / sequence length and pooling)")


def _mask(features):
    return features.get("token_mask")


def _check_weight(name: str, value: Any) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        raise ValueError(f"{name} must be >= 0; got {value!r}")


def tinybert_recipe(stage: str = "intermediate", layer_map: Sequence[int] | None = None, mode: str = "masked",
                    temperature: float = 1.0, prediction_mode: str = "reference", attention: bool = True,
                    hidden: bool = True, embeddings: bool = True, gamma: Any = 0.0) -> Recipe:
    """TinyBERT's task-specific distillation, one stage (see the module docstring).

    Args:
      stage: ``"intermediate"`` (attention + hidden-state MSE) or ``"prediction"`` (soft CE).
      layer_map: the teacher layer of each student layer (0-based); ``None``: uniform
        ``g(m) = m N / M`` (``N`` divisible by ``M``).
      mode: padding in the intermediate terms, ``"masked"`` (padded positions left out of the
        mean) or ``"reference"`` (the official code: masked scores zeroed, kept in the mean).
      temperature: ``T`` of the prediction stage (official default 1).
      prediction_mode: ``"reference"`` (official: averaged over classes as well) or
        ``"soft_ce"`` (summed over classes).
      attention, hidden, embeddings: which intermediate terms to use (all, as the official code).
      gamma: weight (or schedule) of a hard-label CE term added to either stage (official: 0).
    """
    if stage not in TINYBERT_STAGES:
        raise ValueError(f"stage must be one of {TINYBERT_STAGES}; got {stage!r}")
    if mode not in TINYBERT_MODES:
        raise ValueError(f"mode must be one of {TINYBERT_MODES}; got {mode!r}")
    if prediction_mode not in PREDICTION_MODES:
        raise ValueError(f"prediction_mode must be one of {PREDICTION_MODES}; got {prediction_mode!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be > 0; got {temperature!r}")
    _check_weight("gamma", gamma)
    if layer_map is not None:
        if isinstance(layer_map, (str, bytes)) or not isinstance(layer_map, Sequence):
            raise ValueError(f"layer_map must be a list of teacher layers or None; got {layer_map!r}")
        layer_map = tuple(layer_map)
    if stage == "intermediate" and not (attention or hidden or embeddings):
        raise ValueError("the intermediate stage needs at least one of attention, hidden, embeddings")

    if stage == "prediction":
        def prediction_loss(inp: LossInputs):
            total, parts = ce_plus_kd(inp, gamma, 0.0, None)
            pred = losses.tinybert_prediction_loss(inp.student_logits, inp.teacher_logits, temperature,
                                                   mode=prediction_mode)
            parts["tinybert_pred"] = pred
            return LossOutput(per_example=total + pred, parts=parts)

        return Recipe(name="tinybert", loss=prediction_loss, uses_teacher=True, teacher_logits_only=True,
                      teacher_temperature=float(temperature), frozen=(f"aux/{FIT_MODULE}",))

    def fit(width: int) -> nn.Dense:
        return nn.Dense(width)

    def pairs(s_feats, t_feats) -> list[int]:
        _check_tokens(s_feats, t_feats)
        return resolve_layer_map(layer_map, num_layers(s_feats, "the student"), num_layers(t_feats, "the teacher"))

    def init_aux(rng, s_feats, t_feats):
        pairs(s_feats, t_feats)  # shapes and the layer map are checked when the run is set up
        d_s, d_t = s_feats["embeddings"].shape[-1], t_feats["embeddings"].shape[-1]
        params = fit(d_t).init(rng, jnp.zeros((1, 1, d_s), jnp.float32))["params"]
        return {"params": {FIT_MODULE: params}}

    def intermediate_loss(inp: LossInputs):
        s, t = inp.student_features, inp.teacher_features
        g = pairs(s, t)
        mask = _mask(s)
        dense = fit(t["embeddings"].shape[-1])
        project = lambda h: dense.apply({"params": inp.aux_params[FIT_MODULE]}, h)
        total, parts = ce_plus_kd(inp, gamma, 0.0, None)
        zero = jnp.zeros(inp.student_logits.shape[0], jnp.float32)
        att, rep = zero, zero
        if attention:
            for i, j in enumerate(g):
                att = att + losses.tinybert_attention_loss(s[f"layer{i}/attn_scores"], t[f"layer{j}/attn_scores"],
                                                           mask, mode=mode)
            parts["tinybert_att"] = att
        if embeddings:
            rep = rep + losses.tinybert_hidden_loss(project(s["embeddings"]), t["embeddings"], mask, mode=mode)
        if hidden:
            for i, j in enumerate(g):
                rep = rep + losses.tinybert_hidden_loss(project(s[f"layer{i}/hidden"]), t[f"layer{j}/hidden"],
                                                        mask, mode=mode)
        if hidden or embeddings:
            parts["tinybert_rep"] = rep
        return LossOutput(per_example=total + att + rep, parts=parts)

    return Recipe(name="tinybert", loss=intermediate_loss, uses_teacher=True, init_aux=init_aux)


def tinybert_stages(intermediate_epochs: int, prediction_epochs: int, intermediate_optim: Mapping | None = None,
                    prediction_optim: Mapping | None = None, **options) -> list[dict]:
    """``config.stages`` of a TinyBERT run: the intermediate stage, then the prediction stage
    (``options`` go to both recipes, e.g. ``layer_map``, ``mode``, ``temperature``)."""
    inter = {k: v for k, v in options.items() if k not in ("temperature", "prediction_mode")}
    pred = {k: v for k, v in options.items() if k in ("temperature", "prediction_mode", "gamma")}
    stages = [{"name": "intermediate", "num_epochs": intermediate_epochs,
               "method": {"name": "tinybert", "stage": "intermediate", **inter}},
              {"name": "prediction", "num_epochs": prediction_epochs,
               "method": {"name": "tinybert", "stage": "prediction", **pred}}]
    for stage, optim in zip(stages, (intermediate_optim, prediction_optim)):
        if optim:
            stage["optim"] = dict(optim)
    return stages


def minilm_recipe(version: str = "v1", student_layer: int = -1, teacher_layer: int = -1,
                  num_relation_heads: int = 8, relations: Sequence[str] = MINILM_V2_RELATIONS,
                  beta: Any = 1.0, gamma: Any = 0.0, alpha: Any = 0.0, temperature: float = 4.0) -> Recipe:
    """MiniLM: ``beta (AT + VR) + gamma CE + alpha KD`` (v1), or ``beta * sum of the relation
    KLs + ...`` (``version="v2"``); see the module docstring.

    Args:
      version: ``"v1"`` (attention distributions + value relation) or ``"v2"`` (Q-Q, K-K, V-V
        relations with ``num_relation_heads`` heads).
      student_layer, teacher_layer: the distilled layers, negative from the end (MiniLM: the
        last of both; MiniLMv2 picks an upper-middle teacher layer for large teachers).
      num_relation_heads: v2's relation heads (must divide both widths).
      relations: v2's relations (default ``("qq", "kk", "vv")``).
      beta: weight of the attention terms; gamma: CE; alpha: Hinton KD at ``temperature``.
    """
    if version not in ("v1", "v2"):
        raise ValueError(f"version must be 'v1' or 'v2'; got {version!r}")
    for name, w in (("beta", beta), ("gamma", gamma), ("alpha", alpha)):
        _check_weight(name, w)
    relations = tuple(relations)

    def loss(inp: LossInputs):
        s, t = inp.student_features, inp.teacher_features
        _check_tokens(s, t)
        i = resolve_layer(student_layer, num_layers(s, "the student"), "student_layer")
        j = resolve_layer(teacher_layer, num_layers(t, "the teacher"), "teacher_layer")
        mask = _mask(s)
        total, parts = ce_plus_kd(inp, gamma, alpha, lambda x: losses.hinton_kd(
            x.student_logits, x.teacher_logits, temperature))
        if version == "v1":
            parts["minilm_at"] = losses.minilm_attention_kl(s[f"layer{i}/attn_probs"], t[f"layer{j}/attn_probs"], mask)
            parts["minilm_vr"] = losses.minilm_value_relation(s[f"layer{i}/v"], t[f"layer{j}/v"], mask)
            terms = parts["minilm_at"] + parts["minilm_vr"]
        else:
            qkv = lambda f, n: tuple(f[f"layer{n}/{x}"] for x in "qkv")
            parts["minilm_rel"] = losses.minilm_v2_relations(qkv(s, i), qkv(t, j), num_relation_heads, mask,
                                                             relations=relations)
            terms = parts["minilm_rel"]
        weight = make_weight_schedule(beta)(inp.stage_step, inp.stage_progress)
        return LossOutput(per_example=total + weight * terms, parts=parts)

    return Recipe(name="minilm", loss=loss, uses_teacher=True)


register_recipe("tinybert", tinybert_recipe)
register_recipe("minilm", minilm_recipe)
