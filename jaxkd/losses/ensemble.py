"""Multi-teacher losses: ensembles of soft labels, a random teacher, relabelling, MEAL V2.

Teacher logits come stacked, ``[N, B, C]`` (N teachers, B examples, C classes); a single
teacher's ``[B, C]`` is read as N = 1. Every loss returns one value per example (``[B]``)
and does not differentiate the teachers (``stop_gradient``). Notation: ``p_n =
softmax(t_n / T)``, ``log q = log_softmax(s / T)`` for the student.
"""

from __future__ import annotations

from typing import Literal, Sequence

import chex
import jax
import jax.numpy as jnp

from jaxkd.losses.logits import _check_logits

CONFIDENCE_KINDS: tuple[str, ...] = ("max_prob", "neg_entropy")
Confidence = Literal["max_prob", "neg_entropy"]

__all__ = ["CONFIDENCE_KINDS", "as_teacher_stack", "choose_teachers", "confidence_weights", "ensemble_kd",
           "ensemble_soft_labels", "meal_v2_kd", "random_teacher_kd", "relabel_data_kd", "relabel_kd"]


def as_teacher_stack(teacher_logits: chex.Array) -> chex.Array:
    """``[N, B, C]`` teacher logits (a single teacher's ``[B, C]`` becomes ``[1, B, C]``)."""
    ndim = getattr(teacher_logits, "ndim", None)
    if ndim == 2:
        teacher_logits = teacher_logits[None]
    elif ndim != 3:
        raise ValueError("teacher_logits must have shape [num_teachers, batch, num_classes] (or [batch, "
                         f"num_classes] for one teacher); got {getattr(teacher_logits, 'shape', None)}")
    if not jnp.issubdtype(teacher_logits.dtype, jnp.floating):
        raise TypeError(f"teacher_logits must be a floating-point array; got dtype {teacher_logits.dtype}")
    return jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)


def _check_student(student_logits: chex.Array, teachers: chex.Array) -> None:
    _check_logits("student_logits", student_logits)
    if student_logits.shape != teachers.shape[1:]:
        raise ValueError(f"student_logits {student_logits.shape} and teacher_logits {teachers.shape} disagree: "
                         "expected student [B, C] and teachers [N, B, C]")


def _check_temperature(temperature) -> None:
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")


def confidence_weights(teacher_logits: chex.Array, kind: Confidence = "neg_entropy", temperature: float = 1.0,
                       weight_temperature: float = 1.0) -> chex.Array:
    """Per-teacher, per-example weights from each teacher's confidence, ``[N, B]``.

    ``w_{n,i} = softmax_n(c_{n,i} / tau)`` over the teachers, with the confidence ``c`` of
    teacher ``n`` on example ``i`` computed from ``p_{n,i} = softmax(t_{n,i} / T)``:

    * ``"neg_entropy"``: ``c = sum_c p log p`` (minus the entropy: sharper is more confident);
    * ``"max_prob"``: ``c = max_c p``.

    ``tau`` is ``weight_temperature`` (small: the most confident teacher takes all the
    weight; large: uniform). The weights sum to one over the teachers for every example.

    Args:
      teacher_logits: ``[N, B, C]`` (or ``[B, C]``).
      kind: ``"neg_entropy"`` or ``"max_prob"``.
      temperature: ``T`` used to compute the teachers' probabilities.
      weight_temperature: ``tau > 0``.

    Returns:
      ``[N, B]``.
    """
    t = as_teacher_stack(teacher_logits)
    _check_temperature(temperature)
    if kind not in CONFIDENCE_KINDS:
        raise ValueError(f"unknown confidence {kind!r}; expected one of {CONFIDENCE_KINDS}")
    if isinstance(weight_temperature, (int, float)) and weight_temperature <= 0:
        raise ValueError(f"weight_temperature must be > 0; got {weight_temperature}")
    log_p = jax.nn.log_softmax(t / temperature, axis=-1)
    p = jnp.exp(log_p)
    conf = jnp.sum(p * log_p, axis=-1) if kind == "neg_entropy" else jnp.max(p, axis=-1)
    return jax.nn.softmax(conf / weight_temperature, axis=0)


def _weights(weights, n: int, b: int) -> chex.Array:
    """Normalised ``[N, B]`` weights from ``None`` (uniform), ``[N]`` or ``[N, B]``."""
    if weights is None:
        return jnp.full((n, b), 1.0 / n, jnp.float32)
    w = jnp.asarray(weights, jnp.float32)
    if w.ndim == 1:
        w = jnp.broadcast_to(w[:, None], (w.shape[0], b))
    if w.shape != (n, b):
        raise ValueError(f"weights must have shape [N] = [{n}] or [N, B] = [{n}, {b}]; got {w.shape}")
    return w / jnp.sum(w, axis=0, keepdims=True)


def ensemble_soft_labels(teacher_logits: chex.Array, temperature: float = 1.0,
                         weights: chex.Array | Sequence[float] | None = None) -> chex.Array:
    """The ensemble's soft labels ``pbar_i = sum_n w_{n,i} softmax(t_{n,i} / T)``, ``[B, C]``.

    ``weights``: ``None`` (uniform ``1/N``), fixed per-teacher weights ``[N]`` or per-example
    weights ``[N, B]`` (e.g. :func:`confidence_weights`); they are normalised to sum to one
    over the teachers. Averages probabilities, not logits.
    """
    t = as_teacher_stack(teacher_logits)
    _check_temperature(temperature)
    w = jax.lax.stop_gradient(_weights(weights, t.shape[0], t.shape[1]))
    p = jax.nn.softmax(t / temperature, axis=-1)
    return jnp.sum(w[..., None] * p, axis=0)


def ensemble_kd(student_logits: chex.Array, teacher_logits: chex.Array, temperature: float = 4.0,
                weights: chex.Array | Sequence[float] | None = None) -> chex.Array:
    """KD from the weighted average of the teachers' soft labels, per example, times ``T**2``.

    ``T**2 * KL(pbar || q) = T**2 * sum_c pbar_c (log pbar_c - log q_c)`` with ``pbar`` from
    :func:`ensemble_soft_labels` (``weights`` as there). With one teacher it equals
    :func:`jaxkd.losses.hinton_kd` (mode ``"kl"``).

    Args:
      student_logits: ``[B, C]``.
      teacher_logits: ``[N, B, C]`` (or ``[B, C]``).
      temperature: ``T > 0``.
      weights: ``None``, ``[N]`` or ``[N, B]``.

    Returns:
      ``[B]``.

    Example:
      >>> import jax.numpy as jnp
      >>> t = jnp.array([[[2.0, 0.0]], [[0.0, 2.0]]])   # two teachers that disagree
      >>> s = jnp.zeros((1, 2))                         # the student matches their average
      >>> abs(float(ensemble_kd(s, t, temperature=1.0)[0])) < 1e-6
      True
    """
    t = as_teacher_stack(teacher_logits)
    _check_student(student_logits, t)
    pbar = ensemble_soft_labels(t, temperature, weights)
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_pbar = jnp.log(jnp.maximum(pbar, jnp.finfo(jnp.float32).tiny))
    return jnp.sum(pbar * (log_pbar - log_q), axis=-1) * temperature ** 2


def _per_teacher_kl(student_logits, t, temperature):
    """``[N, B]``: ``T**2 KL(p_n || q)`` for every teacher."""
    log_p = jax.nn.log_softmax(t / temperature, axis=-1)
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q[None]), axis=-1) * temperature ** 2


def choose_teachers(rng: chex.PRNGKey, num_teachers: int, batch_size: int, per: str = "example") -> chex.Array:
    """Indices ``[B]`` of the teacher each example learns from, drawn uniformly from ``rng``.

    ``per="example"``: independent draws; ``per="batch"``: one draw shared by the batch
    (MEAL V2's choice). The same key gives the same indices.
    """
    if per == "example":
        return jax.random.randint(rng, (batch_size,), 0, num_teachers)
    if per == "batch":
        return jnp.full((batch_size,), jax.random.randint(rng, (), 0, num_teachers))
    raise ValueError(f"per must be 'example' or 'batch'; got {per!r}")


def random_teacher_kd(student_logits: chex.Array, teacher_logits: chex.Array, rng: chex.PRNGKey,
                      temperature: float = 4.0, per: str = "example") -> chex.Array:
    """KD from one teacher drawn at random, per example: ``T**2 KL(p_{k_i} || q_i)``.

    ``k = choose_teachers(rng, N, B, per)``; reproducible from ``rng``. Its expectation over
    ``k`` is the mean of the per-teacher KL terms, i.e. :func:`relabel_kd`.

    Args:
      student_logits: ``[B, C]``.
      teacher_logits: ``[N, B, C]``.
      rng: a PRNG key (e.g. ``LossInputs.rng``).
      temperature: ``T > 0``.
      per: ``"example"`` or ``"batch"``.

    Returns:
      ``[B]``.
    """
    t = as_teacher_stack(teacher_logits)
    _check_student(student_logits, t)
    _check_temperature(temperature)
    k = choose_teachers(rng, t.shape[0], t.shape[1], per)
    kl = _per_teacher_kl(student_logits, t, temperature)
    return jnp.take_along_axis(kl, k[None], axis=0)[0]


def relabel_kd(student_logits: chex.Array, teacher_logits: chex.Array, temperature: float = 4.0) -> chex.Array:
    """Relabelling: each teacher's soft labels as a separate target, ``(1/N) sum_n T**2 KL(p_n || q)``.

    Training on a data set expanded N times, where copy ``n`` of example ``i`` carries
    teacher ``n``'s soft labels, minimises ``(1/(N M)) sum_i sum_n KL(p_{n,i} || q_i)`` per
    epoch of the expanded set (M examples); this function gives each example's share of that
    sum, computed for all of its N copies at once (one augmented view, one step).

    Its gradient w.r.t. the student equals that of :func:`ensemble_kd` with uniform weights
    (``sum_n KL(p_n || q) = N KL(pbar || q) + const`` with ``pbar`` the mean of the ``p_n``);
    the values differ by that constant (the teachers' Jensen–Shannon spread). What the
    expanded data set does differently is only how the copies are scheduled: there they meet
    the student in different batches, steps and augmentations, and an epoch is N times as
    long.
    """
    t = as_teacher_stack(teacher_logits)
    _check_student(student_logits, t)
    _check_temperature(temperature)
    return jnp.mean(_per_teacher_kl(student_logits, t, temperature), axis=0)


def relabel_data_kd(student_logits: chex.Array, teacher_logits: chex.Array, copy: chex.Array,
                    temperature: float = 4.0) -> chex.Array:
    """Relabelled data, per example: ``T**2 KL(p_{n_i, i} || q_i)`` with ``n_i = copy[i]``.

    The loss of one copy of the N-times expanded data set (:class:`jaxkd.data.RepeatedSource`):
    row ``i`` is copy ``copy[i]`` of its example and carries that teacher's soft labels. Over an
    epoch of the expanded set every (example, teacher) pair appears once, so the epoch's total is
    :func:`relabel_kd`'s; what differs is that the copies meet the student in different
    batches, steps and augmentations.

    Args:
      student_logits: ``[B, C]``.
      teacher_logits: ``[N, B, C]`` (all teachers on the batch).
      copy: ``[B]`` integer teacher index per row, in ``[0, N)`` (or a one-hot ``[B, N]`` bool /
        float mask).
      temperature: ``T > 0``.
    """
    t = as_teacher_stack(teacher_logits)
    _check_student(student_logits, t)
    _check_temperature(temperature)
    copy = jnp.asarray(copy)
    num_teachers, batch = t.shape[0], t.shape[1]
    if copy.ndim == 2:
        if copy.shape != (batch, num_teachers):
            raise ValueError(f"copy as a one-hot mask must have shape [batch, num_teachers] = [{batch}, "
                             f"{num_teachers}]; got {copy.shape} (config.data.copies must equal the number of teachers)")
        select = copy.astype(jnp.float32).T  # [N, B]
    elif copy.shape == (batch,) and jnp.issubdtype(copy.dtype, jnp.integer):
        select = jax.nn.one_hot(copy, num_teachers, dtype=jnp.float32).T
    else:
        raise ValueError(f"copy must be [batch] integer teacher indices or a [batch, num_teachers] mask; got "
                         f"shape {copy.shape}, dtype {copy.dtype}")
    return jnp.sum(select * _per_teacher_kl(student_logits, t, temperature), axis=0)


def meal_v2_kd(student_logits: chex.Array, teacher_logits: chex.Array) -> chex.Array:
    """MEAL V2's soft-label loss, per example: ``-sum_c pbar_c log softmax(s)_c`` at ``T = 1``.

    ``pbar`` is the plain average of the teachers' softmax outputs; no hard labels. It is the
    cross-entropy with the ensemble's soft labels (differs from the KL by ``H(pbar)``, a
    constant for the student).
    """
    t = as_teacher_stack(teacher_logits)
    _check_student(student_logits, t)
    pbar = ensemble_soft_labels(t, 1.0)
    return -jnp.sum(pbar * jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1), axis=-1)
