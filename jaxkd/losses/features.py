"""Feature-level distillation losses: FitNets hints, attention transfer (AT) and FSP.

Every loss is a pure function of arrays that returns one value per example (shape
``[batch]``), the optax convention: callers weight, mask and reduce. For each loss the batch
mean of the per-example value equals the reference implementation's (globally averaged) loss.
Feature maps are NHWC ``(B, H, W, C)`` by default; attention transfer and FSP also take
``layout="NCHW"`` and ``layout="NLC"`` (transformer token maps ``(B, L, D)``, where sequence
positions play the role of pixels), and the FitNets hint any rank. Shapes are checked at trace time (they are static), so
errors are raised when a jitted function is traced, naming the offending argument.

Because every value is per example, the batch mean under a data-sharded ``jit`` is the global
mean over the whole batch. The AT authors' multi-GPU code instead summed one mean per GPU, so
its loss grew with the GPU count; nothing here does that.

Teacher inputs are wrapped in ``stop_gradient`` (the teacher is fixed, as in
:func:`jaxkd.losses.hinton_kd`). Computation is in ``float32`` (``float64`` inputs stay
``float64``); low-precision inputs are upcast.

Spatial matching (AT and FSP): when two maps differ in size, the larger one is average-pooled
to the smaller, per spatial axis, to ``(min(H_a, H_b), min(W_a, W_b))``. This is PyTorch's
``adaptive_avg_pool2d`` in the case where the sizes divide evenly (non-overlapping windows,
computed as a reshape + mean); sizes that do not divide evenly raise ``ValueError``.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import chex
import jax
import jax.numpy as jnp

ATMode = Literal["code", "paper", "paper_unscaled"]
AT_MODES: tuple[str, ...] = ("code", "paper", "paper_unscaled")
AT_DEFAULT_BETA = 1000.0
NORMALIZE_EPS = 1e-12


# ----------------------------------------------------------------------------- checks/helpers

def _check_floating(name: str, x: Any) -> None:
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{name} must be an array; got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array; got dtype {x.dtype}")


LAYOUTS: tuple[str, ...] = ("NHWC", "NCHW", "NLC")


def _check_map(name: str, x: Any, layout: str = "NHWC") -> None:
    """A feature map in ``layout``: NHWC/NCHW images of rank 4, or NLC token maps ``(B, L, D)`` of
    rank 3; floating, non-empty."""
    _check_floating(name, x)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    rank = 3 if layout == "NLC" else 4
    if x.ndim != rank:
        what = "an NLC token map of rank 3 (B, L, D)" if layout == "NLC" else \
            f"an {layout} feature map of rank 4 ({', '.join(layout)})"
        raise ValueError(f"{name} must be {what}; got rank {x.ndim}, shape {tuple(x.shape)}")
    if min(x.shape) < 1:
        raise ValueError(f"{name} must have non-empty dimensions; got shape {tuple(x.shape)}")


def _as_nhwc(x: chex.Array, layout: str) -> chex.Array:
    """NCHW maps transposed, NLC token maps read as ``(B, L, 1, D)``: sequence positions play the
    role of pixels (pooled to the shorter length when two lengths differ)."""
    if layout == "NCHW":
        return jnp.transpose(x, (0, 2, 3, 1))
    if layout == "NLC":
        return x[:, :, None, :]
    return x


def _check_batch(name_a: str, a: chex.Array, name_b: str, b: chex.Array) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} and {name_b} must have the same batch size; got "
                         f"{a.shape[0]} ({name_a} shape {tuple(a.shape)}) vs {b.shape[0]} "
                         f"({name_b} shape {tuple(b.shape)})")


def _compute_dtype(*xs: chex.Array) -> Any:
    return jnp.result_type(jnp.float32, *(x.dtype for x in xs))


def _check_sequences(student: Sequence, teacher: Sequence, min_len: int,
                     what: str) -> None:
    for name, seq in (("student_features", student), ("teacher_features", teacher)):
        if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
            raise TypeError(f"{name} must be a sequence (list/tuple) of feature maps; "
                            f"got {type(seq).__name__}")
    if len(student) != len(teacher):
        raise ValueError(f"student_features and teacher_features must have the same length; "
                         f"got {len(student)} vs {len(teacher)}")
    if len(student) < min_len:
        raise ValueError(f"{what} needs at least {min_len} feature map(s) per network; "
                         f"got {len(student)}")


def _pool_to(x: chex.Array, h: int, w: int, name: str) -> chex.Array:
    """Average-pool NHWC ``x`` to spatial size ``(h, w)`` (sizes must divide evenly)."""
    b, xh, xw, c = x.shape
    if (xh, xw) == (h, w):
        return x
    if xh % h or xw % w:
        raise ValueError(
            f"cannot average-pool {name} of spatial size {xh}x{xw} to {h}x{w}: adaptive average "
            f"pooling is only supported when the sizes divide evenly (shape {tuple(x.shape)})")
    return x.reshape(b, h, xh // h, w, xw // w, c).mean(axis=(2, 4))


def _match_spatial(a: chex.Array, name_a: str, b: chex.Array, name_b: str
                   ) -> tuple[chex.Array, chex.Array]:
    """Pool the larger of two NHWC maps to the smaller's spatial size (per axis)."""
    h = min(a.shape[1], b.shape[1])
    w = min(a.shape[2], b.shape[2])
    return _pool_to(a, h, w, name_a), _pool_to(b, h, w, name_b)


def _l2_normalize(x: chex.Array, eps: float = NORMALIZE_EPS) -> chex.Array:
    """``x / max(||x||_2, eps)`` along the last axis (``torch.nn.functional.normalize``).

    Written as ``sqrt(max(sum x^2, eps^2))`` (the same value) so the gradient stays finite for
    an all-zero row.
    """
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x / jnp.sqrt(jnp.maximum(sq, eps * eps))


def _safe_norm(x: chex.Array) -> chex.Array:
    """``||x||_2`` along the last axis with gradient 0 (not NaN) at ``x = 0``."""
    sq = jnp.sum(jnp.square(x), axis=-1)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _check_mode(mode: str, fn: str) -> None:
    if mode not in AT_MODES:
        raise ValueError(f"unknown {fn} mode {mode!r}; expected one of {AT_MODES}")


def _check_p(p: Any) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or p <= 0:
        raise ValueError(f"p must be a positive number; got {p!r}")


# ----------------------------------------------------------------------------- FitNets

def fitnets_hint(student_regressed: chex.Array, teacher_feature: chex.Array) -> chex.Array:
    """FitNets hint loss (Romero et al., 2015), per example: mean squared error.

    ``hint_i = mean_{h,w,c} (r_i - t_i)^2`` where ``r = regressor(student feature)`` (see
    :class:`jaxkd.models.regressor.HintRegressor`) and ``t`` the teacher's hint feature. All
    examples have the same number of elements, so the batch mean equals the reference loss
    ``MSELoss()(r, t)`` (mean over all ``B*H*W*C`` elements; RepDistiller, torchdistill).

    Args:
      student_regressed: ``[B, ...]`` float, usually NHWC ``(B, H, W, C)``; rank >= 2.
      teacher_feature: same shape as ``student_regressed`` (not differentiated).

    Returns:
      ``[B]`` per-example loss.
    """
    _check_floating("student_regressed", student_regressed)
    _check_floating("teacher_feature", teacher_feature)
    if student_regressed.ndim < 2:
        raise ValueError(f"student_regressed must have rank >= 2 (batch, ...); got shape "
                         f"{tuple(student_regressed.shape)}")
    if student_regressed.shape != teacher_feature.shape:
        raise ValueError(
            "student_regressed and teacher_feature must have exactly the same shape (use "
            "jaxkd.models.regressor.make_hint_regressor to map the student feature); got "
            f"student_regressed {tuple(student_regressed.shape)} vs teacher_feature "
            f"{tuple(teacher_feature.shape)}")
    dtype = _compute_dtype(student_regressed, teacher_feature)
    diff = student_regressed.astype(dtype) - jax.lax.stop_gradient(teacher_feature).astype(dtype)
    return jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))


# ----------------------------------------------------------------------------- attention transfer

def attention_map(feature: chex.Array, mode: ATMode = "code", p: float = 2, layout: str = "NHWC") -> chex.Array:
    """Spatial attention map of an NHWC feature map (Zagoruyko & Komodakis, ICLR 2017).

    * ``"code"`` (default): ``q = mean_c f^p`` (the authors' code and RepDistiller; ``p = 2``
      there, i.e. ``f**2``; note ``f**p`` is signed for odd integer ``p`` and NaN for
      non-integer ``p`` on negative values, as in the reference).
    * ``"paper"`` (and ``"paper_unscaled"``): ``q = sum_c |f|^p`` (the paper's ``F^p_sum``).

    ``q`` is flattened over space (row-major ``H, W``) and L2-normalised per sample with
    ``q / max(||q||_2, 1e-12)`` (``torch.nn.functional.normalize`` semantics, as RepDistiller;
    the authors' older ``l2_normalize`` clamps the *squared* norm at 1e-12 instead, which
    differs only for maps with norm below 1e-6). Mean and sum over channels differ by the
    factor ``C``, which the normalisation removes, so for even integer ``p`` both modes give
    the same map; the modes of :func:`attention_transfer` differ mainly in the distance.

    Args:
      feature: ``(B, H, W, C)`` float (or ``(B, C, H, W)`` with ``layout="NCHW"``, or a token map
        ``(B, L, D)`` with ``layout="NLC"``: one attention value per position).
      mode: ``"code"``, ``"paper"`` or ``"paper_unscaled"`` (the last two give the same map).
      p: positive exponent, default 2.
      layout: ``"NHWC"`` (default), ``"NCHW"`` or ``"NLC"``.

    Returns:
      ``(B, H*W)`` (``(B, L)``) normalised attention maps.
    """
    _check_map("feature", feature, layout)
    _check_mode(mode, "attention_map")
    _check_p(p)
    feature = _as_nhwc(feature, layout)
    f = feature.astype(_compute_dtype(feature))
    if mode == "code":
        q = jnp.mean(f ** p, axis=-1)
    else:
        q = jnp.sum(jnp.abs(f) ** p, axis=-1)
    return _l2_normalize(q.reshape(q.shape[0], -1))


def attention_transfer(student_features: Sequence[chex.Array],
                       teacher_features: Sequence[chex.Array], mode: ATMode = "code",
                       p: float = 2, beta: float | None = None, layout: str = "NHWC") -> chex.Array:
    """Attention transfer loss (Zagoruyko & Komodakis, ICLR 2017), per example.

    For each layer pair ``j`` the larger map is average-pooled to the smaller spatial size
    (see module docstring; channel counts may differ, attention maps have none), then with
    ``a = attention_map(., mode, p)`` of shape ``(B, H_j*W_j)``:

    * ``"code"`` (default; RepDistiller and the authors' code):
      ``loss_i = beta * sum_j mean_{hw} (a_s - a_t)_{i,hw}^2``, ``beta`` defaulting to 1000.
      Its batch mean is ``beta * sum_j (at(x_j) - at(y_j)).pow(2).mean()``, the reference's
      mean over ``B*H*W`` per pair, summed over pairs and multiplied by ``beta`` -- with no
      ``/2`` (references.md: "beta=1000, code mode"; the authors' ``cifar.py`` adds
      ``opt.beta * sum(loss_groups)`` with ``--beta 1e3``).
    * ``"paper"``: ``loss_i = sum_j beta_j/2 * ||a_s - a_t||_2`` with the non-squared L2
      distance per example, maps ``sum_c |f|^p`` and the paper's per-layer weight
      ``beta_j = beta / (H_j * W_j)`` (``H_j * W_j`` the number of elements of pair ``j``'s
      attention map after pooling, ``L`` for token maps), ``beta`` defaulting to 1000. The
      paper sets beta to "10^3 divided by number of elements in attention map and batch size
      for each layer"; the step's batch mean supplies the division by the batch size. On 8x8
      maps the factor is 1000/64/2 = 7.8.
    * ``"paper_unscaled"``: jaxkd's earlier paper mode, ``loss_i = beta/2 * sum_j ||a_s - a_t||_2``
      with no division by ``H_j * W_j`` (so ``H_j * W_j`` times the paper's weight: 500 against
      7.8 on 8x8 maps). Kept so earlier runs can be reproduced.

    The gradient of the paper-mode distance at ``a_s == a_t`` is taken as 0.

    Args:
      student_features: sequence of ``(B, H_j, W_j, C_j)`` student maps.
      teacher_features: sequence of ``(B, H'_j, W'_j, C'_j)`` teacher maps (not differentiated).
      mode: ``"code"`` (default), ``"paper"`` or ``"paper_unscaled"``.
      p: exponent of the attention map, default 2.
      beta: weight; ``None`` means 1000 (applied as ``beta`` in code mode, ``beta/(2 H_j W_j)``
        per layer in paper mode, ``beta/2`` in ``"paper_unscaled"`` mode).
      layout: of every map: ``"NHWC"`` (default), ``"NCHW"``, or ``"NLC"`` for transformer token
        maps ``(B, L, D)`` (attention over sequence positions; hidden sizes may differ).

    Returns:
      ``[B]`` per-example loss.
    """
    _check_mode(mode, "attention_transfer")
    _check_sequences(student_features, teacher_features, 1, "attention_transfer")
    beta = AT_DEFAULT_BETA if beta is None else beta
    total = None
    for j, (fs, ft) in enumerate(zip(student_features, teacher_features)):
        s_name, t_name = f"student_features[{j}]", f"teacher_features[{j}]"
        _check_map(s_name, fs, layout)
        _check_map(t_name, ft, layout)
        _check_batch(s_name, fs, t_name, ft)
        fs, ft = _match_spatial(_as_nhwc(fs, layout), s_name, jax.lax.stop_gradient(_as_nhwc(ft, layout)), t_name)
        diff = attention_map(fs, mode, p) - attention_map(ft, mode, p)
        if mode == "code":
            term = jnp.mean(jnp.square(diff), axis=-1)
        elif mode == "paper":
            term = _safe_norm(diff) / diff.shape[-1]  # beta_j = beta / (H_j W_j)
        else:
            term = _safe_norm(diff)
        total = term if total is None else total + term
    scale = beta if mode == "code" else beta / 2.0
    return scale * total


# ----------------------------------------------------------------------------- gradient-based AT

def input_gradient(loss_fn: Callable[[chex.Array], chex.Array], x: chex.Array) -> chex.Array:
    """``d sum_i loss_fn(x)_i / d x``: per-example gradients of a per-example loss.

    ``loss_fn`` maps ``x`` (e.g. the input images, or a feature map) to per-example losses
    ``[B]`` (or a scalar). Summing (not averaging) makes example ``i``'s gradient its own loss's
    gradient when examples do not interact (no train-mode BatchNorm), with no ``1/B`` factor.
    Pure: usable inside ``jit`` and differentiable again (double backprop).
    """
    _check_floating("x", x)
    return jax.grad(lambda x_: jnp.sum(loss_fn(x_)))(x)


def gradient_attention_map(grad: chex.Array, p: float = 1) -> chex.Array:
    """Gradient-based attention map: ``normalize(sum_c |g|^p)`` over space.

    ``p = 1`` (default) is the channel sum of ``|g|``, ``p = 2`` of ``g^2``. Normalised per
    example with ``g / max(||g||_2, 1e-12)``.

    Args:
      grad: ``(B, H, W, C)`` gradient of a loss w.r.t. an input or feature map.
      p: positive exponent.

    Returns:
      ``(B, H*W)``.
    """
    _check_map("grad", grad)
    _check_p(p)
    g = grad.astype(_compute_dtype(grad))
    q = jnp.sum(jnp.abs(g) ** p, axis=-1)
    return _l2_normalize(q.reshape(q.shape[0], -1))


def gradient_attention(loss_fn: Callable[[chex.Array], chex.Array], x: chex.Array,
                       p: float = 1) -> chex.Array:
    """``gradient_attention_map(input_gradient(loss_fn, x), p)``: ``(B, H*W)``."""
    return gradient_attention_map(input_gradient(loss_fn, x), p)


def gradient_attention_transfer(student_grad: chex.Array, teacher_grad: chex.Array,
                                p: float = 1) -> chex.Array:
    """Gradient-based attention transfer (Zagoruyko & Komodakis 2017, Sec. 3.2), per example.

    ``loss_i = ||m_s - m_t||_2^2`` (squared L2 distance summed over ``H*W``) with
    ``m = gradient_attention_map(grad, p)`` of the student's and teacher's loss gradients w.r.t.
    the same input. The paper penalises ``beta/2 * ||J_s - J_t||_2`` of the raw input gradients
    ``J``; here the maps are channel-aggregated and normalised, and the weight is left to the
    caller. Larger gradient maps are average-pooled to the smaller as in
    :func:`attention_transfer`. The student gradient is differentiable (double backprop);
    the teacher's is not.

    Args:
      student_grad: ``(B, H, W, C)``.
      teacher_grad: ``(B, H', W', C')`` (not differentiated).
      p: exponent of :func:`gradient_attention_map`, default 1.

    Returns:
      ``[B]``.
    """
    _check_map("student_grad", student_grad)
    _check_map("teacher_grad", teacher_grad)
    _check_batch("student_grad", student_grad, "teacher_grad", teacher_grad)
    gs, gt = _match_spatial(student_grad, "student_grad",
                            jax.lax.stop_gradient(teacher_grad), "teacher_grad")
    diff = gradient_attention_map(gs, p) - gradient_attention_map(gt, p)
    return jnp.sum(jnp.square(diff), axis=-1)


# ----------------------------------------------------------------------------- FSP

def fsp_matrix(feature_a: chex.Array, feature_b: chex.Array, layout: str = "NHWC") -> chex.Array:
    """Flow-of-solution-procedure matrix (Yim et al., CVPR 2017).

    ``G_i[c, d] = sum_{h,w} a_i[h, w, c] * b_i[h, w, d] / (H * W)`` after average-pooling the
    larger of the two maps to the smaller spatial size.

    Args:
      feature_a: ``(B, H_a, W_a, C_a)`` (or in ``layout``: ``"NCHW"``, ``"NLC"``).
      feature_b: ``(B, H_b, W_b, C_b)``.

    Returns:
      ``(B, C_a, C_b)``.
    """
    _check_map("feature_a", feature_a, layout)
    _check_map("feature_b", feature_b, layout)
    _check_batch("feature_a", feature_a, "feature_b", feature_b)
    feature_a, feature_b = _as_nhwc(feature_a, layout), _as_nhwc(feature_b, layout)
    dtype = _compute_dtype(feature_a, feature_b)
    a, b = _match_spatial(feature_a.astype(dtype), "feature_a", feature_b.astype(dtype),
                          "feature_b")
    hw = a.shape[1] * a.shape[2]
    return jnp.einsum("bhwc,bhwd->bcd", a, b) / hw


def fsp_loss(student_features: Sequence[chex.Array],
             teacher_features: Sequence[chex.Array], layout: str = "NHWC") -> chex.Array:
    """FSP loss (Yim et al., CVPR 2017), per example.

    For consecutive pairs ``(f_0, f_1), (f_1, f_2), ...`` of each network,
    ``loss_i = sum_j mean_{c,d} (G^s_j - G^t_j)_{i,c,d}^2`` with ``G_j = fsp_matrix(f_j,
    f_{j+1})``. The batch mean is the reference's per-pair mean squared difference (over
    ``B*C_a*C_b``), summed over pairs (RepDistiller ``FSP``). Student and teacher must have
    equal channel counts at every position (spatial sizes may differ).

    Args:
      student_features: sequence of ``L >= 2`` student maps ``(B, H_j, W_j, C_j)``.
      teacher_features: sequence of ``L`` teacher maps (not differentiated).
      layout: ``"NHWC"`` (default), ``"NCHW"``, or ``"NLC"`` for token maps ``(B, L, D)``
        (Gram matrices over sequence positions).

    Returns:
      ``[B]`` per-example loss.
    """
    _check_sequences(student_features, teacher_features, 2, "fsp_loss")
    for j, (fs, ft) in enumerate(zip(student_features, teacher_features)):
        _check_map(f"student_features[{j}]", fs, layout)
        _check_map(f"teacher_features[{j}]", ft, layout)
        _check_batch(f"student_features[{j}]", fs, f"teacher_features[{j}]", ft)
    total = None
    for j in range(len(student_features) - 1):
        s_a, s_b = (_as_nhwc(f, layout) for f in student_features[j:j + 2])
        t_a, t_b = (_as_nhwc(f, layout) for f in teacher_features[j:j + 2])
        if (s_a.shape[-1], s_b.shape[-1]) != (t_a.shape[-1], t_b.shape[-1]):
            raise ValueError(
                f"fsp_loss pair {j} (features {j} and {j + 1}): student and teacher channel "
                f"counts must match; student shapes {tuple(s_a.shape)}, {tuple(s_b.shape)} -> "
                f"G ({s_a.shape[-1]}, {s_b.shape[-1]}) vs teacher shapes {tuple(t_a.shape)}, "
                f"{tuple(t_b.shape)} -> G ({t_a.shape[-1]}, {t_b.shape[-1]})")
        try:
            g_s = fsp_matrix(s_a, s_b)
            g_t = fsp_matrix(jax.lax.stop_gradient(t_a), jax.lax.stop_gradient(t_b))
        except ValueError as e:
            raise ValueError(f"fsp_loss pair {j} (features {j} and {j + 1}): {e}") from e
        term = jnp.mean(jnp.square(g_s - g_t), axis=(1, 2))
        total = term if total is None else total + term
    return total


__all__ = [
    "AT_DEFAULT_BETA",
    "AT_MODES",
    "LAYOUTS",
    "attention_map",
    "attention_transfer",
    "fitnets_hint",
    "fsp_loss",
    "fsp_matrix",
    "gradient_attention",
    "gradient_attention_map",
    "gradient_attention_transfer",
    "input_gradient",
]
