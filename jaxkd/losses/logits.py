"""Logit-level losses: cross-entropy and Hinton knowledge distillation.

Every loss is a pure function of arrays that returns one value per example
(shape ``[batch]``), the optax convention: callers weight, mask and reduce.
The batch mean of :func:`hinton_kd` is the usual "batchmean" KD loss.
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp

KDMode = Literal["kl", "soft_ce", "legacy_mean"]
KD_MODES: tuple[str, ...] = ("kl", "soft_ce", "legacy_mean")


def _check_logits(name: str, logits: chex.Array) -> None:
    if getattr(logits, "ndim", None) != 2:
        raise ValueError(
            f"{name} must have shape [batch, num_classes]; got shape {getattr(logits, 'shape', None)}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array; got dtype {logits.dtype}")


def _check_pair(student_logits: chex.Array, teacher_logits: chex.Array) -> None:
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape [batch, num_classes]; got "
            f"student {student_logits.shape} vs teacher {teacher_logits.shape}")


def cross_entropy(logits: chex.Array, labels: chex.Array, label_smoothing: float = 0.0) -> chex.Array:
    """Softmax cross-entropy with integer labels, per example.

    ``ce_i = -sum_c q_ic log softmax(logits_i)_c`` with ``q = one_hot(labels)``
    (optionally smoothed: ``(1-eps) q + eps / C``).

    Args:
      logits: ``[B, C]`` float.
      labels: ``[B]`` integer class indices in ``[0, C)``.
      label_smoothing: ``eps`` in ``[0, 1)``.

    Returns:
      ``[B]`` per-example loss.
    """
    _check_logits("logits", logits)
    if getattr(labels, "ndim", None) != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must have shape [batch] = [{logits.shape[0]}]; got {getattr(labels, 'shape', None)}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer class indices; got dtype {labels.dtype}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing}")
    num_classes = logits.shape[-1]
    if not isinstance(labels, jax.core.Tracer) and labels.size:
        # an out-of-range label one-hots to zeros, a silent CE of 0; checkable only outside jit
        lo, hi = int(jnp.min(labels)), int(jnp.max(labels))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels must be class indices in [0, {num_classes}); got values in [{lo}, {hi}]")
    targets = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
    return soft_cross_entropy(logits, targets)


def soft_cross_entropy(logits: chex.Array, target_probs: chex.Array) -> chex.Array:
    """Cross-entropy against a target distribution, per example: ``-sum_c p_c log softmax(z)_c``.

    Args:
      logits: ``[B, C]`` float.
      target_probs: ``[B, C]`` rows summing to one (not checked under jit).

    Returns:
      ``[B]``.
    """
    _check_logits("logits", logits)
    if target_probs.shape != logits.shape:
        raise ValueError(
            f"target_probs must have the shape of logits {logits.shape}; got {target_probs.shape}")
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(target_probs.astype(jnp.float32) * log_p, axis=-1)


def hinton_kd(student_logits: chex.Array, teacher_logits: chex.Array, temperature: float = 4.0,
              mode: KDMode = "kl") -> chex.Array:
    """Hinton et al. (2015) distillation loss, per example, scaled by ``T**2``.

    With ``p_t = softmax(t/T)`` and ``log p_s = log_softmax(s/T)``:

    * ``"kl"`` (default): ``T**2 * KL(p_t || p_s) = T**2 * sum_c p_t (log p_t - log p_s)``.
      Its batch mean is PyTorch's ``kl_div(..., reduction="batchmean") * T**2`` (RepDistiller,
      torchdistill, mdistiller); the gradient of the batch mean w.r.t. the student logits is
      ``T * (softmax(s/T) - softmax(t/T)) / B``.
    * ``"soft_ce"``: ``T**2 * -sum_c p_t log p_s``, the cross-entropy with soft targets. It
      differs from ``"kl"`` by the teacher entropy (constant for the student), so it has the
      same gradient but a different value.
    * ``"legacy_mean"``: ``"kl"`` divided by ``C``: the batch mean equals PyTorch's default
      element-wise ``KLDivLoss()`` mean used by peterliht/knowledge-distillation-pytorch.

    The teacher logits are not differentiated (``stop_gradient``).

    Args:
      student_logits: ``[B, C]`` float.
      teacher_logits: ``[B, C]`` float.
      temperature: ``T > 0``.
      mode: one of ``"kl"``, ``"soft_ce"``, ``"legacy_mean"``.

    Returns:
      ``[B]`` per-example loss.

    Example:
      >>> import jax.numpy as jnp
      >>> s = jnp.array([[1.0, 2.0, 3.0]]); t = jnp.array([[1.0, 2.0, 3.0]])
      >>> float(hinton_kd(s, t, temperature=4.0)[0])  # identical logits: zero KL
      0.0
    """
    _check_pair(student_logits, teacher_logits)
    if mode not in KD_MODES:
        raise ValueError(f"unknown hinton_kd mode {mode!r}; expected one of {KD_MODES}")
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
    s = student_logits.astype(jnp.float32) / temperature
    log_p_t = jax.nn.log_softmax(t, axis=-1)
    log_p_s = jax.nn.log_softmax(s, axis=-1)
    p_t = jnp.exp(log_p_t)
    if mode == "soft_ce":
        per_example = -jnp.sum(p_t * log_p_s, axis=-1)
    else:
        per_example = jnp.sum(p_t * (log_p_t - log_p_s), axis=-1)
        if mode == "legacy_mean":
            per_example = per_example / student_logits.shape[-1]
    return per_example * (temperature ** 2)
