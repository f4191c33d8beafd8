"""Boundary-supporting samples (BSS): Heo et al., "Knowledge Distillation with Adversarial
Samples Supporting Decision Boundary" (arXiv 1805.05532).

BSS moves correctly classified training samples towards the teacher's decision boundary and
distils the teacher's outputs on those boundary-supporting samples into the student.

Generator (:func:`boundary_supporting_samples`)
------------------------------------------------
1. **Base samples.** A sample qualifies when teacher argmax == student argmax == label. Its
   score is ``sum_{c != y} (p_t,c - p_s,c)**2`` (softmaxes at temperature 1; the sum leaves
   out the label class ``y``, as in the reference, see ``references.md``). The ``k =
   min(max_base_samples, B)`` highest-scoring qualifying samples are the base samples. Shapes
   must be static, so ``k`` rows are always returned with ``valid_mask`` False on rows that do
   not qualify (fewer than ``k`` samples qualified; those rows are the lowest-index
   non-qualifying samples and are returned unchanged). Ties go to the lower batch index.
2. **Target class.** Per base sample, ``target ~ p_t`` restricted to the classes other than
   the base class (the teacher's top class) and renormalised, drawn with ``rng``.
3. **Iteration** on the teacher's logits ``f`` (base class ``b``, target ``t``)::

       x <- clip(x + eta * (f_b - f_t + eps) * g / ||g||_2, clip_min, clip_max),
       g = grad_x (f_t - f_b)      (per-sample L2 norm over all non-batch axes)

   with no epsilon-ball. One ``jax.lax.while_loop`` runs over the ``k`` rows with a per-row
   ``active`` mask. Each pass makes one ``jax.vjp`` of the teacher over all ``k`` rows (the
   cotangent ``onehot(t) - onehot(b)`` per row, i.e. the gradient of ``sum_rows (f_t - f_b)``,
   so each row gets its own gradient since rows do not interact in an eval-mode network) and
   then, for each active row, in this order:

   * the teacher's argmax at the current ``x`` is no longer ``b``: the row stops, reason
     :data:`STOP_TARGET` if the argmax is ``t``, else :data:`STOP_OTHER`;
   * otherwise, if it has already taken ``max_iters`` steps: it stops, :data:`STOP_MAX_ITERS`;
   * otherwise it takes the step above (its ``iterations`` count goes up by one).

   So a row that crosses the boundary on its last allowed step is reported as having reached
   the target/other class, not the cap. The loop ends when no row is active (at most
   ``max_iters + 1`` passes). Rows that are inactive or not valid never change; rows that are
   not valid get :data:`STOP_INVALID` and 0 iterations. If ``||g|| == 0`` the step is zero.

The teacher runs in inference mode (the caller's ``teacher_apply``), its variables are
``stop_gradient``-ed, and so is the returned ``x_adv`` (the student trains on it as data).

Compilation: :func:`boundary_supporting_samples` is ``jax.jit``-ed with ``teacher_apply``,
``options`` and ``row_sharding`` static; it compiles once per (teacher_apply, options, input
shapes/dtypes/shardings): data, the number of iterations taken and the active sets never
retrace. Pass the *same* ``teacher_apply`` object on every call (a fresh ``lambda`` per call
is a new static argument and retraces).

Sharding: everything is batch-parallel except the top-k, which is **global over the batch**
(the ``k`` base samples are chosen among all ``B`` samples across all devices, not per shard),
so a ``data``-sharded call gives the same result as an unsharded one. The ``k`` gathered rows
are laid out by the compiler unless ``row_sharding`` (e.g.
``NamedSharding(mesh, P("data"))``) is given, which constrains them so the while loop runs
split over the devices (``k`` should then be a multiple of the mesh size).

Student loss (:func:`bss_loss`)
-------------------------------
``CE(clean) + r * softCE_T(clean) + r_adv * softCE_T(adversarial)`` with ``T = 3`` and no
``T**2`` factor, ``softCE_T(s, t) = -sum_c softmax(t/T)_c log softmax(s/T)_c`` and
``r, r_adv = bss_weights(epoch, num_epochs)``. The clean terms are averaged over the batch,
the adversarial term over the valid adversarial rows (``valid_mask``; zero when none).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.core import LossOutput, Recipe, register_recipe
from jaxkd.losses.bss import BSSLossTerms, bss_loss, bss_weights  # noqa: F401  (the method's student loss)

Array = jax.Array

__all__ = [
    "BSSLossTerms",
    "BSSOptions",
    "BSSResult",
    "STOP_INVALID",
    "STOP_MAX_ITERS",
    "STOP_OTHER",
    "STOP_REASON_NAMES",
    "STOP_TARGET",
    "boundary_supporting_samples",
    "bss_loss",
    "bss_statistics",
    "bss_weights",
    "sample_target_classes",
    "select_base_samples",
]

#: Stop reason: the teacher's argmax moved from the base class to the sampled target class.
STOP_TARGET = 0
#: Stop reason: the teacher's argmax moved from the base class to a class other than the target.
STOP_OTHER = 1
#: Stop reason: ``max_iters`` steps taken and the teacher still predicts the base class.
STOP_MAX_ITERS = 2
#: Stop reason: the row is not a valid base sample (``valid_mask`` False); it is unchanged.
STOP_INVALID = 3
#: Names of the stop reasons by code (used by :func:`bss_statistics`).
STOP_REASON_NAMES = ("target", "other", "max_iters", "invalid")


@dataclasses.dataclass(frozen=True)
class BSSOptions:
    """Hyper-parameters of the BSS generator (defaults from the paper's CIFAR setup).

    Attributes:
      step_size: ``eta``.
      max_iters: maximal number of steps per sample.
      clip_min, clip_max: ``x`` is clamped to ``[clip_min, clip_max]`` after every step
        (the range of the normalised inputs).
      max_base_samples: at most this many base samples (``k = min(max_base_samples, B)``).
      eps: the ``+eps`` in the step size ``eta * (f_b - f_t + eps)``.
      require_student_correct: a base sample needs the student's argmax to equal the label
        too (the reference code's ``condition2``); ``False``: the teacher's alone.
    """

    step_size: float = 0.3
    max_iters: int = 10
    clip_min: float = -2.5
    clip_max: float = 2.5
    max_base_samples: int = 64
    eps: float = 1e-4
    require_student_correct: bool = True

    def __post_init__(self) -> None:
        if not self.step_size > 0:
            raise ValueError(f"step_size must be > 0; got {self.step_size}")
        if isinstance(self.max_iters, bool) or not isinstance(self.max_iters, (int, np.integer)) \
                or self.max_iters < 0:
            raise ValueError(f"max_iters must be an int >= 0; got {self.max_iters!r}")
        if not self.clip_min < self.clip_max:
            raise ValueError(f"need clip_min < clip_max; got [{self.clip_min}, {self.clip_max}]")
        if isinstance(self.max_base_samples, bool) \
                or not isinstance(self.max_base_samples, (int, np.integer)) \
                or self.max_base_samples < 1:
            raise ValueError(f"max_base_samples must be an int >= 1; got {self.max_base_samples!r}")
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0; got {self.eps}")


class BSSResult(NamedTuple):
    """Output of :func:`boundary_supporting_samples`; every field has ``k`` rows.

    Attributes:
      x_adv: ``[k, ...]`` the boundary-supporting samples (``stop_gradient``-ed); rows with
        ``valid_mask`` False are the unchanged inputs ``x[base_index]``.
      base_index: ``[k]`` int32 index into the input batch of each row.
      target_class: ``[k]`` int32 sampled target class (never the base class).
      valid_mask: ``[k]`` bool, the row is a qualifying base sample.
      iterations: ``[k]`` int32 number of steps taken.
      stop_reason: ``[k]`` int32, one of :data:`STOP_TARGET`, :data:`STOP_OTHER`,
        :data:`STOP_MAX_ITERS`, :data:`STOP_INVALID`.
      base_class: ``[k]`` int32 the teacher's argmax on the clean input (equals the label on
        valid rows).
      teacher_logits: ``[k, C]`` the teacher's logits at ``x_adv`` (computed by the last pass
        that saw the row; ``stop_gradient``-ed), ready for the adversarial distillation term.
    """

    x_adv: Array
    base_index: Array
    target_class: Array
    valid_mask: Array
    iterations: Array
    stop_reason: Array
    base_class: Array
    teacher_logits: Array


def _softmax32(logits: Array) -> Array:
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def select_base_samples(teacher_logits: Array, student_logits: Array, labels: Array,
                        k: int, require_student_correct: bool = True) -> tuple[Array, Array, Array]:
    """Top-``k`` base samples over the whole batch.

    Returns ``(index [k] int32, valid [k] bool, score [B] float32)`` where
    ``score = sum_{c != label} (p_t - p_s)**2`` on qualifying samples (teacher argmax ==
    student argmax == label, as ``attack_flag = condition1 & condition2`` in the reference's
    ``train_BSS_distillation.py``; with ``require_student_correct=False`` only the teacher's
    argmax must equal the label) and ``-inf`` elsewhere. Ties (including the ``-inf`` rows) go
    to the lower index, so the valid rows come first.
    """
    p_t, p_s = _softmax32(teacher_logits), _softmax32(student_logits)
    num_classes = teacher_logits.shape[-1]
    not_label = 1.0 - jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    score = jnp.sum(not_label * (p_t - p_s) ** 2, axis=-1)
    qualifies = jnp.argmax(teacher_logits, -1) == labels
    if require_student_correct:
        qualifies = qualifies & (jnp.argmax(student_logits, -1) == labels)
    score = jnp.where(qualifies, score, -jnp.inf)
    _, index = jax.lax.top_k(score, k)
    index = index.astype(jnp.int32)
    return index, qualifies[index], score


def sample_target_classes(rng: Array, teacher_logits: Array, base_class: Array) -> Array:
    """Draws ``target ~ softmax(teacher_logits)`` restricted to classes ``!= base_class``.

    Masking the base logit to ``-inf`` and sampling is the same as renormalising the other
    classes' probabilities. Returns ``[rows]`` int32.
    """
    logits = teacher_logits.astype(jnp.float32)
    is_base = jax.nn.one_hot(base_class, logits.shape[-1], dtype=jnp.bool_)
    logits = jnp.where(is_base, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _per_row(v: Array, like: Array) -> Array:
    """Reshapes ``[k]`` to broadcast against ``[k, ...]``."""
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


@functools.partial(jax.jit, static_argnames=("teacher_apply", "options", "row_sharding"))
def boundary_supporting_samples(teacher_apply: Callable[[Any, Array], Array], teacher_variables: Any,
                                x: Array, labels: Array, student_logits: Array, rng: Array,
                                options: BSSOptions = BSSOptions(),
                                row_sharding: jax.sharding.Sharding | None = None) -> BSSResult:
    """Generates boundary-supporting samples (see the module docstring for the algorithm).

    Args:
      teacher_apply: ``teacher_apply(variables, x) -> logits [B, C]``, the teacher in
        inference mode (e.g. ``lambda v, x: fns.apply(v, x, False)[0]``, defined once).
        Static: must be hashable, and the same object across calls to avoid retracing.
      teacher_variables: the teacher's variables (not differentiated).
      x: ``[B, ...]`` floating inputs (already normalised).
      labels: ``[B]`` integer labels.
      student_logits: ``[B, C]`` the student's logits on ``x`` (only their argmax and softmax
        are used; not differentiated).
      rng: PRNG key for the target classes.
      options: :class:`BSSOptions` (static).
      row_sharding: optional static sharding for the ``k`` gathered rows (see module docstring).

    Returns:
      :class:`BSSResult` with ``k = min(options.max_base_samples, B)`` rows.
    """
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be floating-point (normalised inputs); got {x.dtype}")
    if labels.ndim != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels must have shape [{x.shape[0]}]; got {labels.shape}")
    if student_logits.ndim != 2 or student_logits.shape[0] != x.shape[0]:
        raise ValueError(f"student_logits must have shape [{x.shape[0]}, C]; got {student_logits.shape}")
    opts = options
    variables = jax.lax.stop_gradient(teacher_variables)
    x = jax.lax.stop_gradient(x)
    student_logits = jax.lax.stop_gradient(student_logits)
    k = min(opts.max_base_samples, x.shape[0])

    def teacher(z):
        return teacher_apply(variables, z)

    # 1. base samples (global top-k over the batch).
    t_logits = teacher(x)
    if t_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {t_logits.shape} and student_logits "
                         f"{student_logits.shape} differ in shape")
    index, valid, _ = select_base_samples(t_logits, student_logits, labels, k, opts.require_student_correct)
    rows_x = x[index]
    rows_logits = t_logits[index]
    base = jnp.argmax(rows_logits, axis=-1).astype(jnp.int32)
    # 2. target classes.
    target = sample_target_classes(rng, rows_logits, base)

    if row_sharding is not None:
        rows_x, rows_logits, base, target, valid = (
            jax.lax.with_sharding_constraint(a, row_sharding)
            for a in (rows_x, rows_logits, base, target, valid))

    num_classes = rows_logits.shape[-1]
    cotangent = (jax.nn.one_hot(target, num_classes, dtype=rows_logits.dtype)
                 - jax.nn.one_hot(base, num_classes, dtype=rows_logits.dtype))
    reduce_axes = tuple(range(1, x.ndim))

    # 3. one while loop over the k rows.
    def cond(state):
        return jnp.any(state[1])

    def body(state):
        xs, active, iters, reason, last_logits = state
        f, vjp_fn = jax.vjp(teacher, xs)
        (g,) = vjp_fn(cotangent.astype(f.dtype))  # grad_x sum_rows (f_t - f_b)
        pred = jnp.argmax(f, axis=-1).astype(jnp.int32)
        crossed = active & (pred != base)
        capped = active & ~crossed & (iters >= opts.max_iters)
        stepping = active & ~crossed & ~capped
        f32 = f.astype(jnp.float32)
        f_b = jnp.take_along_axis(f32, base[:, None], axis=-1)[:, 0]
        f_t = jnp.take_along_axis(f32, target[:, None], axis=-1)[:, 0]
        g32 = g.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(g32 * g32, axis=reduce_axes))
        scale = opts.step_size * (f_b - f_t + opts.eps) / jnp.where(norm > 0, norm, 1.0)
        stepped = jnp.clip(xs.astype(jnp.float32) + _per_row(scale, g32) * g32,
                           opts.clip_min, opts.clip_max).astype(xs.dtype)
        xs = jnp.where(_per_row(stepping, xs), stepped, xs)
        reason = jnp.where(crossed, jnp.where(pred == target, STOP_TARGET, STOP_OTHER), reason)
        reason = jnp.where(capped, STOP_MAX_ITERS, reason)
        last_logits = jnp.where(active[:, None], f.astype(last_logits.dtype), last_logits)
        iters = iters + stepping.astype(jnp.int32)
        return xs, stepping, iters, reason, last_logits

    init = (rows_x, valid, jnp.zeros((k,), jnp.int32),
            jnp.where(valid, STOP_MAX_ITERS, STOP_INVALID).astype(jnp.int32), rows_logits)
    x_adv, _, iterations, reason, final_logits = jax.lax.while_loop(cond, body, init)
    return BSSResult(
        x_adv=jax.lax.stop_gradient(x_adv), base_index=index, target_class=target,
        valid_mask=valid, iterations=iterations, stop_reason=reason, base_class=base,
        teacher_logits=jax.lax.stop_gradient(final_logits))


def bss_statistics(result: BSSResult) -> dict[str, Any]:
    """Host-side summary of a :class:`BSSResult` for reports (plain Python numbers).

    Keys: ``num_rows``; ``num_valid``; ``target_fraction`` / ``other_fraction`` /
    ``max_iters_fraction``: fraction of the *valid* rows stopping for each reason (0.0 when
    there is no valid row); ``mean_iterations``: mean steps over the valid rows (0.0 when
    none); ``stop_reasons``: histogram ``{name: count}`` over all rows, names from
    :data:`STOP_REASON_NAMES`.
    """
    valid = np.asarray(jax.device_get(result.valid_mask)).astype(bool)
    reason = np.asarray(jax.device_get(result.stop_reason))
    iters = np.asarray(jax.device_get(result.iterations))
    n_valid = int(valid.sum())
    denom = max(n_valid, 1)
    hist = {name: int(np.sum(reason == code)) for code, name in enumerate(STOP_REASON_NAMES)}
    return {
        "num_rows": int(valid.shape[0]),
        "num_valid": n_valid,
        "target_fraction": float(np.sum(valid & (reason == STOP_TARGET)) / denom),
        "other_fraction": float(np.sum(valid & (reason == STOP_OTHER)) / denom),
        "max_iters_fraction": float(np.sum(valid & (reason == STOP_MAX_ITERS)) / denom),
        "mean_iterations": float(iters[valid].mean()) if n_valid else 0.0,
        "stop_reasons": hist,
    }


BSS_ADV_ROWS = ("attacked", "all")


def adversarial_rows(valid_mask: Array) -> Array:
    """``[k]`` int32: which of the ``k`` generator rows fills each slot of the student's
    adversarial forward in ``adv_rows="attacked"`` mode.

    Slot ``i`` holds the ``(i mod n)``-th valid row (``n`` the number of valid rows), so every
    row of the forward is an attacked sample: the first ``n`` slots are the valid rows in order,
    the rest repeat them cyclically. With no valid row it is ``arange(k)`` (the forward is then
    unused)."""
    valid_mask = jnp.asarray(valid_mask, jnp.bool_)
    k = valid_mask.shape[0]
    n = jnp.sum(valid_mask.astype(jnp.int32))
    positions = jnp.nonzero(valid_mask, size=k, fill_value=0)[0].astype(jnp.int32)
    slot = jnp.arange(k, dtype=jnp.int32)
    return jnp.where(n > 0, positions[slot % jnp.maximum(n, 1)], slot)


def bss_recipe(temperature: float = 3.0, num_epochs: int | None = None, step_size: float = 0.3, max_iters: int = 10,
               max_base_samples: int = 64, clip_min: float = -2.5, clip_max: float = 2.5,
               require_student_correct: bool = True, epoch_origin: int = 1, adv_rows: str = "attacked",
               adv_bn_update: bool = True):
    """BSS as a jaxkd recipe: the generator runs inside the jitted train step.

    Per step: the teacher's and student's clean logits select base samples, the
    ``while_loop`` generator attacks the teacher (same augmented view), the student runs on the
    adversarial rows in train mode and the loss is
    ``CE + r softCE_T(clean) + r_adv softCE_T(adversarial)`` with the paper's schedules over
    ``num_epochs`` (default: the length of the stage, as the paper's 80 of 80). Metrics: ``bss_valid`` (base samples found),
    ``bss_target`` (fraction of them reaching the target class), ``bss_iters`` (mean
    iterations), as batch values.

    Options against bhheo/BSS_distillation's ``train_BSS_distillation.py`` (defaults follow it):

    * ``require_student_correct`` (True): a base sample is classified correctly by the teacher
      *and* the student (its ``attack_flag = condition1 & condition2``); False: by the teacher.
    * ``epoch_origin`` (1): the schedules ``r``, ``r_adv`` see ``epoch + epoch_origin``; the
      reference counts epochs from 1 (``range(1, max_epoch + 1)``), so its first epoch has
      ``r = 3.9625``, ``r_adv = 1.9667`` for 80 epochs. ``0`` is jaxkd's earlier 0-based count
      (4 and 2).
    * ``adv_rows``: which rows the student's adversarial forward holds. The reference forwards
      only the attacked rows (``s_net(attacked_inputs)``, at most 64), so its train-mode
      BatchNorm normalises them with their own statistics. Shapes are static under ``jit``, so
      jaxkd always forwards ``k = min(max_base_samples, B)`` rows. ``"attacked"`` (default)
      fills the slots of rows that did not qualify with copies of the attacked rows
      (:func:`adversarial_rows`), so the batch statistics come from attacked samples only:
      exactly the reference's when the number ``n`` of attacked rows divides ``k`` (e.g. all
      ``k`` qualify, the usual case once the student is trained), else a mean over attacked
      rows in which some appear once more than others. The loss counts each attacked row once.
      ``"all"`` is jaxkd's earlier forward over the ``k`` generator rows, where the rows that did
      not qualify (unchanged clean inputs) enter the statistics.
    * ``adv_bn_update`` (True): keep the running statistics of that forward (the reference's
      second train-mode forward updates them, after the clean one), when it ran: on steps with
      ``n = 0`` or ``r_adv = 0`` the reference skips it and so does the update here.
      ``False``: discard them (jaxkd's earlier behaviour).

    The reference also re-creates its SGD optimizer at the two learning-rate drops, which resets
    the momentum: ``config.optim.reset_momentum_at_milestones = True`` (see
    :mod:`jaxkd.train.optim`).
    """
    if adv_rows not in BSS_ADV_ROWS:
        raise ValueError(f"adv_rows must be one of {BSS_ADV_ROWS}; got {adv_rows!r}")
    for name, flag in (("require_student_correct", require_student_correct), ("adv_bn_update", adv_bn_update)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False; got {flag!r}")
    if isinstance(epoch_origin, bool) or epoch_origin not in (0, 1):
        raise ValueError(f"epoch_origin must be 0 or 1; got {epoch_origin!r}")
    options = BSSOptions(step_size=step_size, max_iters=max_iters, clip_min=clip_min, clip_max=clip_max,
                         max_base_samples=max_base_samples, require_student_correct=require_student_correct)

    def teacher_logits_fn(teacher_apply, _, x):
        return teacher_apply(x)[0]

    def loss(inp):
        result = boundary_supporting_samples(
            functools.partial(teacher_logits_fn, inp.teacher_apply), None, inp.inputs, inp.labels,
            jax.lax.stop_gradient(inp.student_logits), inp.rng, options)
        if adv_rows == "attacked":
            rows = adversarial_rows(result.valid_mask)
            x_adv, t_adv = result.x_adv[rows], result.teacher_logits[rows]
        else:
            x_adv, t_adv = result.x_adv, result.teacher_logits
        # the loss counts each valid row once: the first n slots ("attacked") or the valid rows ("all")
        mask = result.valid_mask
        if adv_bn_update:
            student_adv_logits, _, adv_state = inp.student_apply(x_adv, update_state=True)
        else:
            student_adv_logits, _ = inp.student_apply(x_adv)
        if adv_rows == "attacked":
            n = jnp.sum(mask.astype(jnp.int32))
            mask = jnp.arange(mask.shape[0]) < n
        epochs = num_epochs or inp.num_epochs or 80
        terms = bss_loss(inp.student_logits, inp.teacher_logits, inp.labels, student_adv_logits,
                         t_adv, mask, inp.epoch + epoch_origin, epochs, temperature)
        valid = result.valid_mask.astype(jnp.float32)
        n_valid = jnp.maximum(jnp.sum(valid), 1.0)
        per_example = terms.clean + terms.r_adv * terms.adversarial_mean
        parts = {"clean": terms.clean, "adversarial": terms.adversarial_mean,
                 "bss_valid": jnp.sum(valid),
                 "bss_target": jnp.sum(valid * (result.stop_reason == STOP_TARGET)) / n_valid,
                 "bss_iters": jnp.sum(valid * result.iterations) / n_valid}
        student_state = None
        if adv_bn_update:
            ran = (jnp.sum(valid) > 0) & (terms.r_adv > 0)
            student_state = adv_state if inp.student_state is None else jax.tree.map(
                lambda new, old: jnp.where(ran, new, old), adv_state, inp.student_state)
        return LossOutput(per_example=per_example, parts=parts, student_state=student_state)

    return Recipe(name="bss", loss=loss, uses_teacher=True)


register_recipe("bss", bss_recipe)
