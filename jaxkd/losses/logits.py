"""Logit-level losses: cross-entropy and Hinton knowledge distillation.

Every loss is a pure function of arrays that returns one value per example
(shape ``[batch]``), the optax convention: callers weight, mask and reduce.
The batch mean of :func:`hinton_kd` is the usual "batchmean" KD loss.
"""

from __future__ import annotations

from typing import Any, Literal

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


def _check_class_axis(name: str, logits: chex.Array, axis: int) -> int:
    """Logits ``[..., C, ...]`` with classes on ``axis``: floating, rank >= 1; the axis, normalised."""
    if not hasattr(logits, "ndim") or logits.ndim < 1:
        raise ValueError(f"{name} must be an array of logits with a class axis; got {type(logits).__name__} "
                         f"of shape {getattr(logits, 'shape', None)}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array; got dtype {logits.dtype}")
    if not -logits.ndim <= axis < logits.ndim:
        raise ValueError(f"axis {axis} is out of range for {name} of shape {logits.shape}")
    return axis % logits.ndim


def cross_entropy(logits: chex.Array, labels: chex.Array, label_smoothing: float = 0.0,
                  axis: int = -1) -> chex.Array:
    """Softmax cross-entropy with integer labels, per example.

    ``ce = -sum_c q_c log softmax(logits)_c`` over the class axis with ``q = one_hot(labels)``
    (optionally smoothed: ``(1-eps) q + eps / C``). The same as
    ``optax.softmax_cross_entropy_with_integer_labels`` (tested).

    Args:
      logits: ``[..., C]`` float (classes on ``axis``): ``[B, C]`` for a batch, ``[B, L, C]`` for
        per-token predictions.
      labels: integer class indices in ``[0, C)``, of ``logits``' shape without the class axis.
      label_smoothing: ``eps`` in ``[0, 1)``.
      axis: the class axis.

    Returns:
      the per-example loss, ``logits``' shape without the class axis (``[B]`` for ``[B, C]``).
    """
    axis = _check_class_axis("logits", logits, axis)
    batch_shape = logits.shape[:axis] + logits.shape[axis + 1:]
    if getattr(labels, "shape", None) != batch_shape:
        raise ValueError(f"labels must have shape {list(batch_shape)} (logits {list(logits.shape)} without its class "
                         f"axis {axis}); got {getattr(labels, 'shape', None)}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer class indices; got dtype {labels.dtype}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing}")
    num_classes = logits.shape[axis]
    if not isinstance(labels, jax.core.Tracer) and labels.size:
        # an out-of-range label one-hots to zeros, a silent CE of 0; checkable only outside jit
        lo, hi = int(jnp.min(labels)), int(jnp.max(labels))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels must be class indices in [0, {num_classes}); got values in [{lo}, {hi}]")
    targets = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype, axis=axis)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
    return soft_cross_entropy(logits, targets, axis=axis)


def soft_cross_entropy(logits: chex.Array, target_probs: chex.Array, axis: int = -1) -> chex.Array:
    """Cross-entropy against a target distribution, per example: ``-sum_c p_c log softmax(z)_c``.

    The same as ``optax.softmax_cross_entropy`` (tested).

    Args:
      logits: ``[..., C]`` float (classes on ``axis``).
      target_probs: same shape, summing to one over the class axis (not checked under jit).
      axis: the class axis.

    Returns:
      ``logits``' shape without the class axis.
    """
    axis = _check_class_axis("logits", logits, axis)
    if target_probs.shape != logits.shape:
        raise ValueError(
            f"target_probs must have the shape of logits {logits.shape}; got {target_probs.shape}")
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=axis)
    return -jnp.sum(target_probs.astype(jnp.float32) * log_p, axis=axis)


def hinton_kd(student_logits: chex.Array, teacher_logits: chex.Array, temperature: float = 4.0,
              mode: KDMode = "kl", axis: int = -1, t2: bool = True) -> chex.Array:
    """Hinton et al. (2015) distillation loss, per example, scaled by ``T**2`` (``t2=True``).

    With ``p_t = softmax(t/T)`` and ``log p_s = log_softmax(s/T)`` over the class axis:

    * ``"kl"`` (default): ``T**2 * KL(p_t || p_s) = T**2 * sum_c p_t (log p_t - log p_s)``.
      Its batch mean is PyTorch's ``kl_div(..., reduction="batchmean") * T**2`` (RepDistiller,
      torchdistill, mdistiller); the gradient of the batch mean w.r.t. the student logits is
      ``T * (softmax(s/T) - softmax(t/T)) / B``. It equals
      ``T**2 * optax.losses.kl_divergence(log_softmax(s/T), softmax(t/T))`` (tested).
    * ``"soft_ce"``: ``T**2 * -sum_c p_t log p_s``, the cross-entropy with soft targets. It
      differs from ``"kl"`` by the teacher entropy (constant for the student), so it has the
      same gradient but a different value.
    * ``"legacy_mean"``: ``"kl"`` divided by ``C``: the batch mean equals PyTorch's default
      element-wise ``KLDivLoss()`` mean used by peterliht/knowledge-distillation-pytorch.

    The teacher logits are not differentiated (``stop_gradient``).

    ``t2=False`` leaves out the ``T**2`` factor (every mode above divided by ``T**2``): the
    FitNets paper's KD stage (its ``lambda`` 4 -> 1 multiplies the soft cross-entropy as is; the
    authors' ``KDCost.py`` has no ``T**2``) and BSS use the unscaled term. With ``T = 4`` the two
    differ by a factor 16 in the loss and in its gradient.

    Args:
      student_logits: ``[..., C]`` float (classes on ``axis``; ``[B, C]``, or ``[B, L, C]`` per token).
      teacher_logits: the same shape.
      temperature: ``T > 0``.
      mode: one of ``"kl"``, ``"soft_ce"``, ``"legacy_mean"``.
      axis: the class axis.
      t2: multiply by ``T**2`` (Hinton's gradient-magnitude correction; the default).

    Returns:
      the per-example loss: the logits' shape without the class axis.

    Example:
      >>> import jax.numpy as jnp
      >>> s = jnp.array([[1.0, 2.0, 3.0]]); t = jnp.array([[1.0, 2.0, 3.0]])
      >>> float(hinton_kd(s, t, temperature=4.0)[0])  # identical logits: zero KL
      0.0
    """
    axis = _check_class_axis("student_logits", student_logits, axis)
    _check_class_axis("teacher_logits", teacher_logits, axis)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits and teacher_logits must have the same shape; got student "
                         f"{student_logits.shape} vs teacher {teacher_logits.shape}")
    if mode not in KD_MODES:
        raise ValueError(f"unknown hinton_kd mode {mode!r}; expected one of {KD_MODES}")
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
    s = student_logits.astype(jnp.float32) / temperature
    log_p_t = jax.nn.log_softmax(t, axis=axis)
    log_p_s = jax.nn.log_softmax(s, axis=axis)
    p_t = jnp.exp(log_p_t)
    if mode == "soft_ce":
        per_example = -jnp.sum(p_t * log_p_s, axis=axis)
    else:
        per_example = jnp.sum(p_t * (log_p_t - log_p_s), axis=axis)
        if mode == "legacy_mean":
            per_example = per_example / student_logits.shape[axis]
    if not isinstance(t2, bool):
        raise TypeError(f"t2 must be a bool; got {t2!r}")
    return per_example * (temperature ** 2) if t2 else per_example


# ----------------------------------------------------------------------------- modern logit KD
# Logit standardisation (Sun et al. 2024), DKD (Zhao et al. 2022) and DIST (Huang et al. 2022).
# Computation is in float32 (float64 inputs stay float64); teacher logits are not differentiated.

DIST_EPS = 1e-8
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


def _prepare_pair(student_logits, teacher_logits, temperature, standardize):
    """Checked, upcast, optionally standardised ``(s / T, stop_gradient(t) / T)``."""
    _check_pair(student_logits, teacher_logits)
    _check_temperature(temperature)
    dtype = _compute_dtype(student_logits, teacher_logits)
    s = student_logits.astype(dtype)
    t = jax.lax.stop_gradient(teacher_logits).astype(dtype)
    if standardize:
        s, t = standardize_logits(s), standardize_logits(t)
    return s / temperature, t / temperature


def dkd_terms(student_logits: chex.Array, teacher_logits: chex.Array, labels: chex.Array,
              temperature: float = 4.0, standardize: bool = False) -> tuple[chex.Array, chex.Array]:
    """The two parts of decoupled KD, per example: ``(tckd, nckd)``, each scaled by ``T**2``.

    With ``p = softmax(z / T)`` and target class ``g = labels[i]``:

    * TCKD (target-class KD): the binary KL between ``b = (p_g, 1 - p_g)`` of teacher and
      student, ``T**2 * [b_t log(b_t / b_s) + (1 - b_t) log((1 - b_t) / (1 - b_s))]``.
    * NCKD (non-target-class KD): ``T**2 * KL(p_hat_t || p_hat_s)`` with
      ``p_hat_c = p_c / (1 - p_g)`` over the classes ``c != g`` (the softmax of the non-target
      logits alone).

    For ``alpha = beta = 1`` the paper's identity holds:
    ``hinton_kd = tckd + (1 - p_t[g]) * nckd`` (``p_t[g]`` the teacher's target probability at
    ``T``). The batch means equal mdistiller's ``tckd_loss`` and ``nckd_loss`` (``kl_div`` with
    ``size_average=False`` then ``* T**2 / B``).

    Masking: mdistiller removes the target from the NCKD softmax by subtracting 1000 from
    ``z_g / T``. Here the target class is excluded exactly (``-inf``), so NCKD does not depend
    on the target logits at all. The two agree to float rounding unless
    ``(z_g - max_{c != g} z_c) / T`` approaches 1000, where the offset stops hiding the target;
    the tests show both cases. Everything is computed in log space, so a student that is
    certain of the target (``p_g -> 1``) gives a finite TCKD, where ``log(1 - p_g)`` of the
    reference would be ``log 0``.

    Args:
      student_logits: ``[B, C]`` float, ``C >= 2``.
      teacher_logits: ``[B, C]`` float (not differentiated).
      labels: ``[B]`` integer class indices in ``[0, C)`` (range checked only outside jit).
      temperature: ``T > 0``.
      standardize: z-score the student and teacher logits first (:func:`standardize_logits`).

    Returns:
      ``(tckd, nckd)``, two ``[B]`` arrays.

    Reference: Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022, arXiv:2203.08679.
    """
    s, t = _prepare_pair(student_logits, teacher_logits, temperature, standardize)
    num_classes = s.shape[-1]
    if num_classes < 2:
        raise ValueError(f"dkd needs at least 2 classes; got student_logits of shape {student_logits.shape}")
    _check_class_labels(labels, s.shape[0], num_classes)
    is_target = jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_)

    def parts(z):
        log_norm = jax.nn.logsumexp(z, axis=-1)
        z_target = jnp.sum(jnp.where(is_target, z, 0.0), axis=-1)
        z_other = jnp.where(is_target, -jnp.inf, z)
        log_norm_other = jax.nn.logsumexp(z_other, axis=-1)
        log_b = jnp.stack([z_target - log_norm, log_norm_other - log_norm], axis=-1)  # log (p_g, 1 - p_g)
        log_p_hat = z_other - log_norm_other[:, None]  # -inf at the target
        return log_b, log_p_hat

    log_b_s, log_p_hat_s = parts(s)
    log_b_t, log_p_hat_t = parts(t)
    tckd = jnp.sum(jnp.exp(log_b_t) * (log_b_t - log_b_s), axis=-1)
    # the target entry would be 0 * (-inf - -inf): replace the -inf before subtracting, so no
    # NaN appears even in intermediates (jax_debug_nans stays quiet)
    log_p_hat_t = jnp.where(is_target, 0.0, log_p_hat_t)
    log_p_hat_s = jnp.where(is_target, 0.0, log_p_hat_s)
    p_hat_t = jnp.where(is_target, 0.0, jnp.exp(log_p_hat_t))
    nckd = jnp.sum(p_hat_t * (log_p_hat_t - log_p_hat_s), axis=-1)
    scale = temperature ** 2
    return tckd * scale, nckd * scale


def dkd(student_logits: chex.Array, teacher_logits: chex.Array, labels: chex.Array,
        alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
        standardize: bool = False) -> chex.Array:
    """Decoupled knowledge distillation, per example: ``alpha * tckd + beta * nckd``.

    See :func:`dkd_terms` for the two parts (each scaled by ``T**2``). The batch mean equals
    mdistiller's ``dkd_loss``. mdistiller's CIFAR-100 recipe adds CE with weight 1 and ramps
    the DKD term by ``min(epoch / 20, 1)`` (1-based epochs); ``alpha = 1``, ``T = 4``, and
    ``beta`` depends on the pair: 8 (default: resnet32x4 -> resnet8x4, ShuffleNets, ResNet50
    -> MobileNetV2, wrn_40_2 -> ShuffleV1), 6 (vgg13 -> vgg8 / MobileNetV2, wrn_40_2 ->
    wrn_16_2 / wrn_40_1), 2 (resnet56 -> resnet20, resnet110 -> resnet32). ImageNet: ``T = 1``,
    warm-up 1 epoch, ``beta`` 0.5 (ResNet34 -> ResNet18) or 2 (ResNet50 -> MobileNetV1).
    With logit standardisation the authors multiply ``alpha`` and ``beta`` by the KD weight
    (9 for resnet32x4 -> resnet8x4) and use ``T = 2``.

    Args:
      student_logits: ``[B, C]`` float, ``C >= 2``.
      teacher_logits: ``[B, C]`` float (not differentiated).
      labels: ``[B]`` integer class indices in ``[0, C)``.
      alpha: weight of TCKD.
      beta: weight of NCKD.
      temperature: ``T > 0``.
      standardize: z-score the student and teacher logits first (:func:`standardize_logits`).

    Returns:
      ``[B]`` per-example loss.

    Example:
      >>> import jax.numpy as jnp
      >>> s = jnp.array([[1.0, 2.0, 3.0]]); y = jnp.array([2])
      >>> float(dkd(s, s, y)[0])  # identical logits: both KLs are zero
      0.0

    Reference: Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022, arXiv:2203.08679.
    """
    tckd, nckd = dkd_terms(student_logits, teacher_logits, labels, temperature, standardize)
    return alpha * tckd + beta * nckd


def _pearson(a: chex.Array, b: chex.Array, axis: int, eps: float = DIST_EPS) -> chex.Array:
    """DIST's Pearson correlation: cosine of the centred vectors, ``<a', b'> / (|a'| |b'| + eps)``."""
    a = a - jnp.mean(a, axis=axis, keepdims=True)
    b = b - jnp.mean(b, axis=axis, keepdims=True)
    norms = _safe_sqrt(jnp.sum(a * a, axis=axis)) * _safe_sqrt(jnp.sum(b * b, axis=axis))
    return jnp.sum(a * b, axis=axis) / (norms + eps)


def dist_inter(student_logits: chex.Array, teacher_logits: chex.Array, temperature: float = 4.0,
               standardize: bool = False) -> chex.Array:
    """DIST inter-class relation distance, per example: ``1 - pearson(y_s[i, :], y_t[i, :])``.

    ``y = softmax(z / tau)``; the correlation is taken across the classes of one example, as
    ``<a', b'> / (|a'| |b'| + 1e-8)`` with ``a' = a - mean(a)`` (the authors' eps). The value
    is in ``[0, 2]`` and is *not* multiplied by ``tau**2``: the reference applies ``tau**2`` to
    the whole term, which :func:`dist_loss` does.

    Args:
      student_logits: ``[B, C]`` float.
      teacher_logits: ``[B, C]`` float (not differentiated).
      temperature: ``tau > 0``.
      standardize: z-score the student and teacher logits first (:func:`standardize_logits`).

    Returns:
      ``[B]``.

    Reference: Huang et al., "Knowledge Distillation from A Stronger Teacher" (DIST),
    NeurIPS 2022, arXiv:2205.10536.
    """
    s, t = _prepare_pair(student_logits, teacher_logits, temperature, standardize)
    return 1.0 - _pearson(jax.nn.softmax(s, axis=-1), jax.nn.softmax(t, axis=-1), axis=-1)


def dist_intra(student_logits: chex.Array, teacher_logits: chex.Array, temperature: float = 4.0,
               standardize: bool = False) -> chex.Array:
    """DIST intra-class relation distance: ``1 - mean_c pearson(y_s[:, c], y_t[:, c])``.

    A **batch-level scalar**, not a per-example value: for each class the correlation runs
    over the examples of the batch (the columns of ``y = softmax(z / tau)``), so the value of
    every example depends on the rest of the batch, and its mean over sub-batches is not its
    value on the whole batch. Under data-parallel sharding it must see the global batch. Not
    multiplied by ``tau**2`` (see :func:`dist_loss`). A batch of one example gives 1.

    Args:
      student_logits: ``[B, C]`` float.
      teacher_logits: ``[B, C]`` float (not differentiated).
      temperature: ``tau > 0``.
      standardize: z-score the student and teacher logits first (:func:`standardize_logits`).

    Returns:
      Scalar.

    Reference: Huang et al., NeurIPS 2022, arXiv:2205.10536.
    """
    s, t = _prepare_pair(student_logits, teacher_logits, temperature, standardize)
    corr = _pearson(jax.nn.softmax(s, axis=-1), jax.nn.softmax(t, axis=-1), axis=0)
    return 1.0 - jnp.mean(corr)


def dist_loss(student_logits: chex.Array, teacher_logits: chex.Array, beta: float = 1.0,
              gamma: float = 1.0, temperature: float = 4.0,
              standardize: bool = False) -> tuple[chex.Array, chex.Array]:
    """DIST loss as ``(beta * tau**2 * dist_inter [B], gamma * tau**2 * dist_intra [])``.

    ``mean(inter) + intra`` is the value of the authors' ``DIST(beta, gamma, tau)`` module
    (``tau**2 * (beta * inter + gamma * intra)``). The inter part is per example; the intra
    part is one scalar for the batch (see :func:`dist_intra`), so it cannot be weighted or
    masked per example. The authors' trainer adds CE with weight 1 and this loss with a KD
    weight of 2; their CIFAR-100 runs use ``beta = gamma = 1``, ``tau = 4`` and ImageNet
    ``tau = 1``.

    Args:
      student_logits: ``[B, C]`` float.
      teacher_logits: ``[B, C]`` float (not differentiated).
      beta: weight of the inter-class term.
      gamma: weight of the intra-class term.
      temperature: ``tau > 0``.
      standardize: z-score the student and teacher logits first (:func:`standardize_logits`).

    Returns:
      ``(inter, intra)``: ``[B]`` and a scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> z = jnp.array([[1.0, 2.0, 3.0], [3.0, 1.0, 0.0]])
      >>> inter, intra = dist_loss(z, z)
      >>> # identical logits: perfect correlation, up to the 1e-8 in the denominator
      >>> round(float(inter.mean() + intra), 3)
      0.0

    Reference: Huang et al., NeurIPS 2022, arXiv:2205.10536.
    """
    scale = temperature ** 2
    inter = dist_inter(student_logits, teacher_logits, temperature, standardize)
    intra = dist_intra(student_logits, teacher_logits, temperature, standardize)
    return beta * scale * inter, gamma * scale * intra


# --------------------------------------------------------------------------------------------
# Apprentice (joint training) and Label Refinery
# --------------------------------------------------------------------------------------------


def apprentice_kd(student_logits: chex.Array, teacher_logits: chex.Array, temperature: float = 1.0,
                  teacher_grad: bool = False) -> chex.Array:
    """``H(softmax(z_T / T), softmax(z_S / T)) * T**2`` per example (``[B]``).

    With ``teacher_grad=False`` the teacher's distribution is a constant target; else the
    gradient reaches ``teacher_logits`` too.
    """
    t = teacher_logits if teacher_grad else jax.lax.stop_gradient(teacher_logits)
    target = jax.nn.softmax(t.astype(jnp.float32) / temperature, axis=-1)
    return soft_cross_entropy(student_logits.astype(jnp.float32) / temperature, target) * temperature ** 2


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
    teacher_ce = cross_entropy(teacher_logits, labels)
    ce = cross_entropy(student_logits, labels)
    kd = apprentice_kd(student_logits, teacher_logits, temperature, teacher_grad)
    total = teacher_weight * teacher_ce + student_weight * ce + kd_weight * kd
    return total, {"teacher_ce": teacher_ce, "ce": ce, "kd": kd}


def refinery_kl(student_logits: chex.Array, refinery_logits: chex.Array) -> chex.Array:
    """``KL(softmax(z_R) || softmax(z_S))`` per example (``[B]``); the refinery is a constant."""
    return hinton_kd(student_logits, refinery_logits, 1.0, "kl")
