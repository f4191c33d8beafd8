"""Self-attention distillation losses for transformers: TinyBERT and MiniLM (v1, v2).

Every loss is a pure function of arrays that returns one value per example (shape ``[B]``),
the optax convention: callers weight, mask and reduce. Inputs are the feature taps of
:mod:`jaxkd.models.transformer` (``layer{i}/attn_scores``, ``attn_probs``, ``q``, ``k``,
``v``, ``hidden``, ``embeddings``, ``token_mask``, ``logits``): per-head tensors are
``[B, H, L, ·]``, hidden states ``[B, L, D]``.

Padding. ``mask`` is the ``[B, L]`` token mask (1 real, 0 padding; the model's ``token_mask``
tap, [CLS] counted as real); ``None`` means every position is real. In the default modes a
padded position takes no part: padded keys are left out of every sum or softmax, padded
queries out of the average, so an example's loss does not depend on how much padding follows
it. The ``"reference"`` modes of the TinyBERT losses reproduce the official code instead,
which keeps padded positions in a plain mean over all ``L`` positions (then the loss does
depend on the padding).

Normalisation. Averages are per example: over heads and the example's real positions. With
``mask=None`` the batch mean of each loss is the reference implementation's global mean.

Teacher inputs are wrapped in ``stop_gradient``. Computation is in float32 (float64 inputs
stay float64). Shapes are static, so the checks run when a jitted function is traced and
name the offending argument.

Sources: TinyBERT (Jiao et al., 2020), ``huawei-noah/Pretrained-Language-Model``,
``TinyBERT/task_distill.py`` (losses, layer map) and ``TinyBERT/transformer/modeling.py``
(scores returned before softmax, the shared ``fit_dense`` projection); MiniLM (Wang et al.,
2020) eqs. (2)-(4); MiniLMv2 (Wang et al., 2021), multi-head self-attention relations.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import chex
import jax
import jax.numpy as jnp

from jaxkd.losses.features import _check_floating, _compute_dtype
from jaxkd.losses.logits import _check_pair

TinyBERTMode = Literal["masked", "reference"]
TINYBERT_MODES: tuple[str, ...] = ("masked", "reference")
PredictionMode = Literal["soft_ce", "reference"]
PREDICTION_MODES: tuple[str, ...] = ("soft_ce", "reference")
MINILM_V2_RELATIONS: tuple[str, ...] = ("qq", "kk", "vv")

REFERENCE_MASK_THRESHOLD = -1e2
"""TinyBERT's official code zeroes every attention score ``<= -100`` (the keys that BERT's
additive ``-10000`` mask hit) before the MSE."""

_RELATION_MASK_VALUE = -1e9  # replaces the relation logits of padded keys before a softmax


# ----------------------------------------------------------------------------- checks/helpers

def _check_rank(name: str, x: Any, rank: int, layout: str) -> None:
    _check_floating(name, x)
    if x.ndim != rank:
        raise ValueError(f"{name} must have rank {rank} {layout}; got rank {x.ndim}, "
                         f"shape {tuple(x.shape)}")


def _check_same_shape(name_a: str, a: chex.Array, name_b: str, b: chex.Array,
                      what: str = "shape") -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same {what}; got "
                         f"{tuple(a.shape)} vs {tuple(b.shape)}")


def _check_heads(student: chex.Array, teacher: chex.Array, student_name: str,
                 teacher_name: str) -> None:
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"{student_name} and {teacher_name} must have the same number of heads (axis 1); "
            f"got {student.shape[1]} vs {teacher.shape[1]} (shapes {tuple(student.shape)} vs "
            f"{tuple(teacher.shape)})")


def _check_mode(mode: str, modes: tuple[str, ...], fn: str) -> None:
    if mode not in modes:
        raise ValueError(f"unknown {fn} mode {mode!r}; expected one of {modes}")


def _token_mask(mask: Any, batch: int, length: int, dtype: Any) -> chex.Array:
    """The ``[B, L]`` mask as ``dtype`` (1 real, 0 padding); all ones for ``None``."""
    if mask is None:
        return jnp.ones((batch, length), dtype)
    if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
        raise TypeError(f"mask must be an array of shape [B, L]; got {type(mask).__name__}")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"mask must have shape [B, L] = [{batch}, {length}] (1 real token, "
                         f"0 padding); got {tuple(mask.shape)}")
    return (jnp.asarray(mask) != 0).astype(dtype)


def _real_count(mask: chex.Array) -> chex.Array:
    """Number of real tokens per example, at least 1 (an all-padding example gives loss 0)."""
    return jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def _mean_over_heads_and_queries(per_row: chex.Array, mask: chex.Array) -> chex.Array:
    """``[B, H, L]`` row values -> ``[B]``: mean over heads and real query positions."""
    total = jnp.sum(per_row * mask[:, None, :], axis=(1, 2))
    return total / (per_row.shape[1] * _real_count(mask))


def _relation_log_probs(x: chex.Array, y: chex.Array, mask: chex.Array) -> chex.Array:
    """``log_softmax(x y^T / sqrt(d))`` over keys, ``x, y``: ``[B, H, L, d]``; padded keys
    get a large negative finite logit (probability 0, everything stays finite)."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", x, y) / math.sqrt(x.shape[-1])
    logits = jnp.where(mask[:, None, None, :] > 0, logits, _RELATION_MASK_VALUE)
    return jax.nn.log_softmax(logits, axis=-1)


def _kl_rows(log_p_t: chex.Array, log_p_s: chex.Array, mask: chex.Array) -> chex.Array:
    """``KL(p_t || p_s)`` of each row ``[B, H, L, L] -> [B, H, L]``, over real keys."""
    terms = jnp.exp(log_p_t) * (log_p_t - log_p_s)
    return jnp.sum(jnp.where(mask[:, None, None, :] > 0, terms, 0.0), axis=-1)


def _check_attention_pair(student: Any, teacher: Any, s_name: str, t_name: str) -> None:
    _check_rank(s_name, student, 4, "[B, H, L, L]")
    _check_rank(t_name, teacher, 4, "[B, H, L, L]")
    _check_heads(student, teacher, s_name, t_name)
    _check_same_shape(s_name, student, t_name, teacher)
    if student.shape[2] != student.shape[3]:
        raise ValueError(f"{s_name} must be square over the last two axes [B, H, L, L]; got "
                         f"{tuple(student.shape)}")


# ----------------------------------------------------------------------------- TinyBERT

def uniform_layer_map(num_student_layers: int, num_teacher_layers: int,
                      one_based: bool = False) -> list[int]:
    """TinyBERT's uniform layer mapping ``g(m) = m * N / M``: which teacher layer each
    student layer learns from.

    In the paper layers are 1-based: student layer ``m = 1..M`` learns from teacher layer
    ``g(m) = m * N / M`` (every ``N/M``-th layer, ending on the last), and the embeddings map
    ``0 -> 0`` (not part of the returned list). The official code
    (``TinyBERT/task_distill.py``) does the same with 0-based lists: attention of student
    layer ``i`` against ``teacher_atts[i * k + k - 1]``, hidden ``student_reps[i]`` (index 0
    the embeddings) against ``teacher_reps[i * k]``, ``k = N / M``.

    Args:
      num_student_layers: ``M``.
      num_teacher_layers: ``N``, a multiple of ``M``.
      one_based: return the paper's ``[g(1), ..., g(M)]``. By default the 0-based indices
        ``[g(m) - 1 for m = 1..M]``, i.e. the ``i`` of the ``layer{i}/...`` taps of
        :mod:`jaxkd.models.transformer`: student tap ``layer{i}`` pairs with teacher tap
        ``layer{result[i]}``.

    Returns:
      A list of ``M`` teacher layer indices. E.g. ``M=3, N=6``: ``[1, 3, 5]`` (0-based) or
      ``[2, 4, 6]`` (``one_based=True``).

    Raises:
      ValueError: a count is not a positive int, or ``N`` is not divisible by ``M``.
    """
    for name, value in (("num_student_layers", num_student_layers),
                        ("num_teacher_layers", num_teacher_layers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    if num_teacher_layers % num_student_layers:
        raise ValueError(
            "TinyBERT's uniform layer map needs the teacher's layer count divisible by the "
            f"student's; got num_teacher_layers={num_teacher_layers}, "
            f"num_student_layers={num_student_layers}")
    step = num_teacher_layers // num_student_layers
    offset = 0 if one_based else 1
    return [m * step - offset for m in range(1, num_student_layers + 1)]


def tinybert_attention_loss(student_scores: chex.Array, teacher_scores: chex.Array,
                            mask: chex.Array | None = None,
                            mode: TinyBERTMode = "masked") -> chex.Array:
    """TinyBERT attention loss (Jiao et al., 2020, eq. 7), per example: MSE of the
    *unnormalised* attention scores (before softmax) of one student/teacher layer pair.

    With ``A = q k^T / sqrt(d_h)`` (+ the mask bias), ``H`` heads, token mask ``m``:

    * ``"masked"`` (default): padded query and key positions are left out,
      ``loss_b = sum_{h,i,j} m_i m_j (A^S_hij - A^T_hij)^2 / (H * n_b^2)``, ``n_b = sum_i m_i``.
    * ``"reference"``: the official code (``TinyBERT/task_distill.py``): in both tensors
      every score ``<= -100`` is replaced by 0 (``torch.where(score <= -1e2, 0, score)``;
      these are the padded keys, which carry BERT's ``-10000`` bias; with ``mask`` given,
      scores at padded keys are zeroed as well), then the plain mean over all ``H * L * L``
      entries, padded rows included. Its batch mean is the official ``MSELoss()(A^S, A^T)``.

    The student and the teacher need the same number of heads (the paper's constraint); the
    official code sums this loss over the layers paired by :func:`uniform_layer_map`.

    Args:
      student_scores: ``[B, H, L, L]`` float, a ``layer{i}/attn_scores`` tap.
      teacher_scores: same shape (not differentiated).
      mask: optional ``[B, L]`` token mask (1 real, 0 padding).
      mode: ``"masked"`` or ``"reference"``.

    Returns:
      ``[B]``.
    """
    _check_attention_pair(student_scores, teacher_scores, "student_scores", "teacher_scores")
    _check_mode(mode, TINYBERT_MODES, "tinybert_attention_loss")
    b, _, length, _ = student_scores.shape
    dtype = _compute_dtype(student_scores, teacher_scores)
    s = student_scores.astype(dtype)
    t = jax.lax.stop_gradient(teacher_scores).astype(dtype)
    m = _token_mask(mask, b, length, dtype)
    if mode == "reference":
        keep_key = (m > 0)[:, None, None, :]
        s = jnp.where((s <= REFERENCE_MASK_THRESHOLD) | ~keep_key, 0.0, s)
        t = jnp.where((t <= REFERENCE_MASK_THRESHOLD) | ~keep_key, 0.0, t)
        return jnp.mean(jnp.square(s - t), axis=(1, 2, 3))
    pair = (m[:, :, None] * m[:, None, :])[:, None] > 0  # [B, 1, L, L] real query and key
    sq = jnp.where(pair, jnp.square(s - t), 0.0)
    return jnp.sum(sq, axis=(1, 2, 3)) / (s.shape[1] * jnp.square(_real_count(m)))


def tinybert_hidden_loss(student_hidden_projected: chex.Array, teacher_hidden: chex.Array,
                         mask: chex.Array | None = None,
                         mode: TinyBERTMode = "masked") -> chex.Array:
    """TinyBERT hidden-state / embedding loss (eqs. 8-9), per example: MSE between the
    projected student states ``H^S W_h`` and the teacher's ``H^T``.

    The projection ``W_h`` (``D_s -> D_t``) is learnable and belongs to the student. The paper
    writes a separate ``W_e`` for the embeddings; the official code has one ``nn.Linear``
    (``fit_dense`` in ``TinyBERT/transformer/modeling.py``) *shared* by the embeddings and all
    layers: to follow it, apply the same ``nn.Dense(D_t)`` to every student tap
    (``embeddings``, ``layer{i}/hidden``) before calling this loss. Layers are paired by
    :func:`uniform_layer_map`, embeddings with embeddings.

    * ``"masked"`` (default): ``loss_b = sum_{l,d} m_l (h^S_ld - h^T_ld)^2 / (n_b * D)`` over
      the ``n_b`` real positions.
    * ``"reference"``: the official ``MSELoss()``: the mean over all ``L * D`` entries,
      padding included (``mask`` is not used).

    Args:
      student_hidden_projected: ``[B, L, D]`` float (already projected to the teacher's ``D``).
      teacher_hidden: same shape (not differentiated).
      mask: optional ``[B, L]`` token mask.
      mode: ``"masked"`` or ``"reference"``.

    Returns:
      ``[B]``.
    """
    _check_rank("student_hidden_projected", student_hidden_projected, 3, "[B, L, D]")
    _check_rank("teacher_hidden", teacher_hidden, 3, "[B, L, D]")
    _check_same_shape("student_hidden_projected", student_hidden_projected, "teacher_hidden",
                      teacher_hidden, "shape (project the student states to the teacher's "
                      "width first)")
    _check_mode(mode, TINYBERT_MODES, "tinybert_hidden_loss")
    b, length, d = student_hidden_projected.shape
    dtype = _compute_dtype(student_hidden_projected, teacher_hidden)
    s = student_hidden_projected.astype(dtype)
    t = jax.lax.stop_gradient(teacher_hidden).astype(dtype)
    m = _token_mask(mask, b, length, dtype)  # checks the mask's shape in both modes
    sq = jnp.square(s - t)
    if mode == "reference":
        return jnp.mean(sq, axis=(1, 2))
    sq = jnp.where(m[:, :, None] > 0, sq, 0.0)
    return jnp.sum(sq, axis=(1, 2)) / (d * _real_count(m))


def tinybert_prediction_loss(student_logits: chex.Array, teacher_logits: chex.Array,
                             temperature: float = 1.0,
                             mode: PredictionMode = "soft_ce") -> chex.Array:
    """TinyBERT prediction-layer loss (eq. 10), per example: soft cross-entropy at ``T``.

    * ``"soft_ce"`` (default): ``-sum_c softmax(z^T / T)_c log_softmax(z^S / T)_c`` (no ``T^2``
      factor; the paper uses ``T = 1``).
    * ``"reference"``: the official ``soft_cross_entropy`` (``TinyBERT/task_distill.py``),
      ``(-targets * log_softmax(predicts)).mean()``, averages over the classes too: the
      ``"soft_ce"`` value divided by ``C``. Its batch mean is the official loss.

    Args:
      student_logits: ``[B, C]`` float.
      teacher_logits: ``[B, C]`` float (not differentiated).
      temperature: ``T > 0``.
      mode: ``"soft_ce"`` or ``"reference"``.

    Returns:
      ``[B]``.
    """
    _check_pair(student_logits, teacher_logits)
    _check_mode(mode, PREDICTION_MODES, "tinybert_prediction_loss")
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    dtype = _compute_dtype(student_logits, teacher_logits)
    p_t = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits).astype(dtype) / temperature, -1)
    log_p_s = jax.nn.log_softmax(student_logits.astype(dtype) / temperature, -1)
    loss = -jnp.sum(p_t * log_p_s, axis=-1)
    if mode == "reference":
        loss = loss / student_logits.shape[-1]
    return loss


# ----------------------------------------------------------------------------- MiniLM

def minilm_attention_kl(student_probs: chex.Array, teacher_probs: chex.Array,
                        mask: chex.Array | None = None) -> chex.Array:
    """MiniLM self-attention distribution transfer (Wang et al., 2020, eq. 3), per example.

    ``loss_b = 1 / (H n_b) sum_{h} sum_{real i} KL(A^T_{h,i} || A^S_{h,i})`` with
    ``KL(p || q) = sum_{real j} p_j (log p_j - log q_j)``: per head and query row, the KL of
    the teacher's attention distribution (``softmax(q k^T / sqrt(d_h))``, last layer in the
    paper) from the student's, averaged over heads and the ``n_b`` real query positions.
    Padded key positions carry zero probability and are left out of the sum; padded query
    rows are left out of the average. Terms with ``p_j = 0`` count 0; student probabilities are
    clipped at the smallest normal float before the log, so an underflowed 0 gives a large
    finite value.

    Student and teacher need the same number of heads and tokens; their head sizes and widths
    may differ (only the ``[L, L]`` maps are compared).

    Args:
      student_probs: ``[B, H, L, L]`` float rows summing to 1 (a ``layer{i}/attn_probs`` tap).
      teacher_probs: same shape (not differentiated).
      mask: optional ``[B, L]`` token mask (the probabilities must come from the same mask).

    Returns:
      ``[B]``.
    """
    _check_attention_pair(student_probs, teacher_probs, "student_probs", "teacher_probs")
    b, _, length, _ = student_probs.shape
    dtype = _compute_dtype(student_probs, teacher_probs)
    tiny = jnp.finfo(dtype).tiny
    p_s = student_probs.astype(dtype)
    p_t = jax.lax.stop_gradient(teacher_probs).astype(dtype)
    m = _token_mask(mask, b, length, dtype)
    log_p_t = jnp.log(jnp.maximum(p_t, tiny))
    log_p_s = jnp.log(jnp.maximum(p_s, tiny))
    terms = jnp.where((p_t > 0) & (m[:, None, None, :] > 0), p_t * (log_p_t - log_p_s), 0.0)
    return _mean_over_heads_and_queries(jnp.sum(terms, axis=-1), m)


def minilm_value_relation(student_v: chex.Array, teacher_v: chex.Array,
                          mask: chex.Array | None = None) -> chex.Array:
    """MiniLM value-relation transfer (Wang et al., 2020, eq. 4), per example.

    ``VR = softmax(V V^T / sqrt(d_h))`` per head (``d_h`` each model's own head size), and
    ``loss_b = 1 / (H n_b) sum_h sum_{real i} KL(VR^T_{h,i} || VR^S_{h,i})``. Padded keys are
    left out of the softmax (their relation logit is replaced by a large negative value),
    padded query rows out of the average.

    Args:
      student_v: ``[B, H, L, d_s]`` float (a ``layer{i}/v`` tap).
      teacher_v: ``[B, H, L, d_t]`` float (not differentiated); same ``B``, ``H``, ``L`` as
        the student, ``d_t`` may differ from ``d_s``.
      mask: optional ``[B, L]`` token mask.

    Returns:
      ``[B]``.
    """
    _check_rank("student_v", student_v, 4, "[B, H, L, d_h]")
    _check_rank("teacher_v", teacher_v, 4, "[B, H, L, d_h]")
    _check_heads(student_v, teacher_v, "student_v", "teacher_v")
    if student_v.shape[:3] != teacher_v.shape[:3]:
        raise ValueError("student_v and teacher_v must have the same batch size, head count and "
                         f"length [B, H, L, :]; got {tuple(student_v.shape)} vs "
                         f"{tuple(teacher_v.shape)}")
    b, _, length, _ = student_v.shape
    dtype = _compute_dtype(student_v, teacher_v)
    v_s = student_v.astype(dtype)
    v_t = jax.lax.stop_gradient(teacher_v).astype(dtype)
    m = _token_mask(mask, b, length, dtype)
    kl = _kl_rows(_relation_log_probs(v_t, v_t, m), _relation_log_probs(v_s, v_s, m), m)
    return _mean_over_heads_and_queries(kl, m)


def _check_qkv(name: str, qkv: Any) -> None:
    if isinstance(qkv, (str, bytes)) or not isinstance(qkv, Sequence) or len(qkv) != 3:
        raise TypeError(f"{name} must be a sequence (q, k, v) of three [B, H, L, d_h] arrays; "
                        f"got {type(qkv).__name__}"
                        + (f" of length {len(qkv)}" if isinstance(qkv, Sequence) else ""))
    for j, x in enumerate(qkv):
        _check_rank(f"{name}[{j}]", x, 4, "[B, H, L, d_h]")
        _check_same_shape(f"{name}[{j}]", x, f"{name}[0]", qkv[0])


def _relation_heads(x: chex.Array, num_relation_heads: int, name: str) -> chex.Array:
    """``[B, H, L, d_h]`` -> concatenate heads to ``[B, L, H d_h]`` -> ``[B, R, L, D / R]``."""
    b, h, length, d_h = x.shape
    dim = h * d_h
    if dim % num_relation_heads:
        raise ValueError(f"num_relation_heads={num_relation_heads} must divide the width "
                         f"H * d_h = {h} * {d_h} = {dim} of {name}")
    x = x.transpose(0, 2, 1, 3).reshape(b, length, dim)
    return x.reshape(b, length, num_relation_heads, dim // num_relation_heads).transpose(0, 2, 1, 3)


def minilm_v2_relations(student_qkv: Sequence[chex.Array], teacher_qkv: Sequence[chex.Array],
                        num_relation_heads: int, mask: chex.Array | None = None,
                        relations: Sequence[str] = MINILM_V2_RELATIONS) -> chex.Array:
    """MiniLMv2 multi-head self-attention relation distillation (Wang et al., 2021), per example.

    For each of ``q``, ``k``, ``v``: concatenate the model's heads back to ``[B, L, D]`` and
    split the width into ``R = num_relation_heads`` relation heads of ``d_r = D / R`` (``R``
    is independent of either model's head count, so student and teacher may have different
    head counts and widths). For a relation ``"xy"``::

        R^{xy}_r = softmax(X_r Y_r^T / sqrt(d_r))          [B, R, L, L]
        loss_b  += 1 / (R n_b) sum_r sum_{real i} KL(R^{xy,T}_{r,i} || R^{xy,S}_{r,i})

    summed over ``relations`` (the paper's Q-Q, K-K, V-V by default, equal weights; any
    pair of ``q``, ``k``, ``v`` such as ``"qk"`` is accepted). ``d_r`` is each model's own.
    Padded keys are left out of the softmax, padded queries out of the average, as in
    :func:`minilm_value_relation`.

    Args:
      student_qkv: ``(q, k, v)`` of the student's chosen layer, each ``[B, H_s, L, d_s]``
        (the ``layer{i}/q|k|v`` taps).
      teacher_qkv: ``(q, k, v)`` of the teacher's layer, each ``[B, H_t, L, d_t]`` (not
        differentiated); same ``B`` and ``L`` as the student.
      num_relation_heads: ``R``; must divide ``H_s d_s`` and ``H_t d_t``.
      mask: optional ``[B, L]`` token mask.
      relations: which relations to sum, from ``"qq"``, ``"kk"``, ``"vv"`` (and cross pairs).

    Returns:
      ``[B]``.
    """
    _check_qkv("student_qkv", student_qkv)
    _check_qkv("teacher_qkv", teacher_qkv)
    s0, t0 = student_qkv[0], teacher_qkv[0]
    if (s0.shape[0], s0.shape[2]) != (t0.shape[0], t0.shape[2]):
        raise ValueError("student_qkv and teacher_qkv must have the same batch size and length "
                         f"[B, :, L, :]; got {tuple(s0.shape)} vs {tuple(t0.shape)}")
    if isinstance(num_relation_heads, bool) or not isinstance(num_relation_heads, int) \
            or num_relation_heads < 1:
        raise ValueError(f"num_relation_heads must be a positive int; got {num_relation_heads!r}")
    if isinstance(relations, str) or not isinstance(relations, Sequence) or not relations:
        raise ValueError(f"relations must be a non-empty sequence such as ('qq', 'kk', 'vv'); "
                         f"got {relations!r}")
    for rel in relations:
        if not isinstance(rel, str) or len(rel) != 2 or set(rel) - set("qkv"):
            raise ValueError(f"each relation must be two letters from 'q', 'k', 'v' (e.g. "
                             f"'qq'); got {rel!r} in relations={tuple(relations)!r}")
    if len(set(relations)) != len(relations):
        raise ValueError(f"relations must not repeat; got {tuple(relations)!r}")
    b, length = s0.shape[0], s0.shape[2]
    dtype = _compute_dtype(*student_qkv, *teacher_qkv)
    m = _token_mask(mask, b, length, dtype)
    index = {"q": 0, "k": 1, "v": 2}
    split_s = [_relation_heads(x.astype(dtype), num_relation_heads, f"student_qkv[{j}]")
               for j, x in enumerate(student_qkv)]
    split_t = [_relation_heads(jax.lax.stop_gradient(x).astype(dtype), num_relation_heads,
                               f"teacher_qkv[{j}]") for j, x in enumerate(teacher_qkv)]
    total = jnp.zeros((b,), dtype)
    for rel in relations:
        i, j = index[rel[0]], index[rel[1]]
        log_t = _relation_log_probs(split_t[i], split_t[j], m)
        log_s = _relation_log_probs(split_s[i], split_s[j], m)
        total = total + _mean_over_heads_and_queries(_kl_rows(log_t, log_s, m), m)
    return total


__all__ = [
    "MINILM_V2_RELATIONS",
    "PREDICTION_MODES",
    "TINYBERT_MODES",
    "minilm_attention_kl",
    "minilm_v2_relations",
    "minilm_value_relation",
    "tinybert_attention_loss",
    "tinybert_hidden_loss",
    "tinybert_prediction_loss",
    "uniform_layer_map",
]
