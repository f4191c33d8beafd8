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


# ----------------------------------------------------------------------------- modern logit KD
# Logit standardisation (Sun et al. 2024), DKD (Zhao et al. 2022) and DIST (Huang et al. 2022).
# Computation is in float32 (float64 inputs stay float64); teacher logits are not differentiated.

STANDARDIZE_EPS = 1e-7


def _compute_dtype(*xs: chex.Array):
    return jnp.result_type(jnp.float32, *(x.dtype for x in xs))


def _check_temperature(temperature) -> None:
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")


def _check_class_labels(labels: chex.Array, batch: int, num_classes: int) -> None:
    if getattr(labels, "ndim", None) != 1 or labels.shape[0] != batch:
        raise ValueError(f"labels must have shape [batch] = [{batch}]; got {getattr(labels, 'shape', None)}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer class indices; got dtype {labels.dtype}")
    if not isinstance(labels, jax.core.Tracer) and labels.size:
        # under jit an out-of-range label would select no class at all; checkable only eagerly
        lo, hi = int(jnp.min(labels)), int(jnp.max(labels))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels must be class indices in [0, {num_classes}); got values in [{lo}, {hi}]")


def _safe_sqrt(x: chex.Array) -> chex.Array:
    """``sqrt(x)`` for ``x >= 0`` whose gradient is 0 (not inf/NaN) where ``x == 0``."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def standardize_logits(logits: chex.Array, eps: float = STANDARDIZE_EPS, axis: int = -1) -> chex.Array:
    """Z-score of the logits along ``axis`` (logit standardisation, Sun et al. 2024).

    ``z_hat = (z - mean(z)) / (std(z) + eps)`` with the sample standard deviation
    ``std(z) = sqrt(sum_c (z_c - mean(z))**2 / (C - 1))`` (Bessel's correction, PyTorch's
    default ``Tensor.std``) and ``eps`` added to the std, not under the square root, as in the
    authors' ``normalize`` (``mdistiller/distillers/KD.py`` of sunshangquan/logit-standardization-KD).

    The result is unchanged by adding a constant to a row, and by scaling a row by ``a > 0`` up
    to the ``eps`` term, so the gradient of any loss of ``z_hat`` is orthogonal to the all-ones
    vector. A constant row maps to zeros; its gradient is finite (``(I - 11^T/C) / eps``, the
    exact derivative given ``eps``), not NaN.

    Logit-standardised Hinton KD is ``hinton_kd(standardize_logits(s), standardize_logits(t), T)``
    (the authors' CIFAR-100 runs use ``T = 2`` and a KD weight of 9 with CE weight 0.1);
    :func:`dkd`, :func:`dist_inter`, :func:`dist_intra` and :func:`dist_loss` take
    ``standardize=True``.

    Args:
      logits: float array with at least 2 entries along ``axis`` (usually ``[B, C]``).
      eps: ``>= 0``, added to the standard deviation.
      axis: the class axis.

    Returns:
      Array of the shape of ``logits``, in at least ``float32``.

    Example:
      >>> import jax.numpy as jnp
      >>> z = standardize_logits(jnp.array([[1.0, 2.0, 3.0]]))
      >>> [round(float(v), 4) for v in z[0]]
      [-1.0, 0.0, 1.0]

    Reference: Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024,
    arXiv:2403.01427.
    """
    if not hasattr(logits, "dtype") or not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"logits must be a floating-point array; got dtype {getattr(logits, 'dtype', None)}")
    if getattr(logits, "ndim", 0) < 1:
        raise ValueError(f"logits must have at least one axis; got shape {getattr(logits, 'shape', None)}")
    try:
        n = logits.shape[axis]
    except IndexError:
        raise ValueError(f"axis {axis} is out of range for logits of shape {logits.shape}") from None
    if n < 2:
        raise ValueError(
            f"logits must have at least 2 entries along axis {axis} (the std uses ddof=1); got shape {logits.shape}")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a number >= 0; got {eps!r}")
    z = logits.astype(_compute_dtype(logits))
    centred = z - jnp.mean(z, axis=axis, keepdims=True)
    std = _safe_sqrt(jnp.sum(jnp.square(centred), axis=axis, keepdims=True) / (n - 1))
    return centred / (std + eps)
