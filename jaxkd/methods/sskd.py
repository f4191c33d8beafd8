"""SSKD: self-supervision as the auxiliary task of distillation (Xu et al., ECCV 2020; reference
code xuguodong03/SSKD, ``student.py``, ``cifar.py``, ``wrapper.py``).

**Views** (:func:`sskd_prepare_batch`, run inside the jitted step from the step's RNG). Each
image gets one random horizontal flip (probability 1/2), then the four rotations by 0, 90, 180
and 270 degrees (``np.rot90``'s direction, counter-clockwise), each with its own random crop
after zero padding (4 pixels on 32-pixel images, as CIFAR's; scaled to the image size by default:
``round(4 H / 32)``, so 1 on 8x8 digits and 4 on 28x28 Fashion-MNIST). The views are
interleaved: row ``4 i + k`` of the prepared batch is image ``i`` rotated ``k`` times, so the batch
grows from ``B`` to ``4 B``, the rows with ``k = 0`` are the originals, and every other field of the
batch (``label``, ``index``, ...) is repeated four times. These views replace the data set's own
augmentation (``data.augment``). Teacher (inference mode) and student (train mode: batch
statistics over all ``4 B`` views) see the same views.

**Heads.** ``Linear(d, d) - ReLU - Linear(d, d)`` (PyTorch's init) on the pooled penultimate feature
(the ``embedding`` tap), one per network: ``aux/sskd_head_s`` and ``aux/sskd_head_t``. Both recipes
below declare both, so one run holds them once (a later stage shares them; a later run loads a
trained teacher head with ``aux_init_from={"sskd_head_t": <work dir>}``). Nothing checks that the
teacher head was trained: an ``sskd`` run without the pre-stage or ``aux_init_from`` distils the
similarities of a randomly initialised head.

**Teacher pre-stage** (method ``sskd_teacher_head``). Only the teacher's head trains (the student and
its head are frozen, :attr:`Recipe.frozen`; the teacher's backbone is the frozen teacher). With
``sim[r, j] = cos(h_t(rotated view r), h_t(original j))`` over the ``3 B`` rotated views and the ``B``
originals of the global batch, the loss is the plain cross-entropy of the rows of ``sim`` (raw
cosines, no temperature) with the target of row ``r`` its own original (``r // 3``). Logged:
``train/ss_acc_t``, the teacher head's rotation-retrieval accuracy (the fraction of rotated views
whose most similar original is their own). The reference trains it 60 epochs, SGD 0.05, x0.1 at
epochs 30 and 45.

**Student** (method ``sskd``)::

    gamma CE(originals) + alpha KL_T(originals)
      + tf_weight KL_tfT(rotated views, filtered) + ss_weight KL_ssT(similarity rows, filtered)

with the reference's ``0.1, 0.9, 2.7, 10`` and ``T = 4, 4, 0.5``. Each KL is ``T^2 KL(p_t || p_s)``,
the batch mean over its rows (PyTorch's ``batchmean``). The similarity rows are the ``[3B, B]``
cosine matrices of each network's head (the student's head trains with its backbone; the
teacher's is read frozen). The two filtered terms are batch-level terms
(:attr:`LossOutput.batch_terms`): means over the kept rows of the *global* batch.

**Filtering** (:func:`true_rank`, :func:`keep_rows`). Rank the target (the image's class for a
rotated view; the row's own original for a similarity row) in the teacher's row (0: the teacher
ranks it first). Keep every row of rank 0, plus ``int(ratio * #wrong)`` of the other rows, those of
lowest rank first (``tf_ratio = 1.0``: all rows; ``ss_ratio = 0.75``). Differences from the
reference, both about ties only: the reference orders rows with ``torch.argsort(rank)``, an unstable
sort, so which of several rows of the same rank survive the cut is unspecified there; here the
order is a stable sort on ``(rank, row index)`` (the earlier row first). A tie inside a teacher row
(two classes with the same score) is ranked as a stable descending sort does: the lower class index
first. ``int(ratio * #wrong)`` is computed exactly for ``ratio`` as a fraction (denominator at most
1000). With no row kept (possible only when every row is wrong and ``ratio * #wrong < 1``) the term
is 0, where PyTorch's ``batchmean`` of no rows would be NaN.

**Without labels** (``use_labels=False``; the setting of poorly labelled data). CE is dropped
(``gamma`` is not used), and the rotated-view filter ranks, in place of the label, the class the
teacher ranks first on the image's original view: a rotated view is kept first where the teacher
agrees with itself across the rotation. Nothing else reads labels.

Logged (``train/...``): ``ce``, ``kd``, ``kd_tf``, ``kd_ss`` (unweighted, over the kept rows),
``tf_kept``/``ss_kept`` (fractions of rows kept), ``ss_acc_t``/``ss_acc_s`` (each head's rotation
retrieval accuracy), ``accuracy_originals`` (the student's accuracy on the un-rotated views;
``train/accuracy`` and ``train/teacher_accuracy`` count all ``4 B`` views, rotated ones included).
"""

from __future__ import annotations

import fractions
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.core import LossInputs, LossOutput, Recipe, aux_variables, make_weight_schedule, register_recipe
from jaxkd.data import augment
from jaxkd.models.layers import torch_linear

__all__ = ["HEADS", "ProjectionHead", "cosine_matrix", "head_retrieval_accuracy",
           "keep_rows", "make_views", "rotated_and_originals",
           "scaled_pad", "sskd_prepare_batch", "sskd_recipe", "sskd_teacher_head_recipe", "true_rank",
           "view_choices"]

HEADS = ("sskd_head_s", "sskd_head_t")
NUM_VIEWS = 4


class ProjectionHead(nn.Module):
    """The reference's ``proj_head``: ``Linear(d, d) - ReLU - Linear(d, d)`` on the flattened feature
    (PyTorch's ``nn.Linear`` init)."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1)).astype(jnp.float32)
        d = x.shape[-1]
        x = nn.relu(torch_linear(d, d, jnp.float32, "fc1", zero_bias=False)(x))
        return torch_linear(d, d, jnp.float32, "fc2", zero_bias=False)(x)


# --------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------


def scaled_pad(size: int) -> int:
    """The crop padding for ``size``-pixel images: CIFAR's 4 on 32 pixels, scaled (rounded half up)."""
    return math.floor(4.0 * size / 32.0 + 0.5)


def view_choices(rng, batch_size: int, pad: int):
    """The random choices of :func:`make_views`: ``flips`` bool ``[B]`` (one per image) and crop
    ``offsets`` int32 ``[B, 4, 2]`` (one per view; the top-left corner in the padded view)."""
    r_flip, r_crop = jax.random.split(rng)
    flips = jax.random.bernoulli(r_flip, 0.5, (batch_size,))
    offsets = jax.random.randint(r_crop, (batch_size, NUM_VIEWS, 2), 0, 2 * pad + 1, dtype=jnp.int32)
    return flips, offsets


def make_views(images, flips, offsets, pad: int):
    """``[4B, H, W, C]`` views of square ``[B, H, H, C]`` images: row ``4 i + k`` is image ``i``,
    mirrored where ``flips[i]``, rotated ``k`` times by 90 degrees counter-clockwise (``np.rot90``),
    zero-padded by ``pad`` and cropped back to ``H x H`` at ``offsets[i, k]``."""
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(f"sskd: the rotated views need square images [B, H, H, C]; got shape {tuple(images.shape)}")
    b, h, w, c = images.shape
    x = jnp.where(jnp.asarray(flips, bool)[:, None, None, None], images[:, :, ::-1, :], images)
    views = jnp.stack([jnp.rot90(x, k, axes=(1, 2)) for k in range(NUM_VIEWS)], axis=1)  # [B, 4, H, W, C]
    views = views.reshape((b * NUM_VIEWS, h, w, c))
    return augment.apply_crop_flip(views, jnp.reshape(offsets, (b * NUM_VIEWS, 2)),
                                   jnp.zeros((b * NUM_VIEWS,), bool), pad=pad, flip=False)


def sskd_prepare_batch(batch, rng, pipeline, crop_pad: Any = "scaled"):
    """The step's batch for SSKD: ``image`` the normalised ``4 B`` views (:func:`make_views` with
    :func:`view_choices` from ``rng``), every other per-example field repeated four times."""
    images = batch["image"]
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(f"sskd: the rotated views need square images [B, H, H, C]; got shape {tuple(images.shape)}")
    b = images.shape[0]
    pad = scaled_pad(images.shape[1]) if crop_pad == "scaled" else int(crop_pad)
    flips, offsets = view_choices(rng, b, pad)
    out = {k: jnp.repeat(v, NUM_VIEWS, axis=0) if getattr(v, "ndim", 0) >= 1 and v.shape[0] == b else v
           for k, v in batch.items() if k != "image"}
    out["image"] = pipeline.normalize(make_views(images, flips, offsets, pad))
    return out


def rotated_and_originals(x):
    """``(rotated [3B, ...], originals [B, ...])`` rows of an interleaved ``[4B, ...]`` array; rotated
    row ``3 i + k - 1`` is image ``i``'s view ``k`` (the reference's ``index % 4 != 0`` rows, in order)."""
    if x.shape[0] % NUM_VIEWS:
        raise ValueError(f"sskd: expected 4 views per image, got {x.shape[0]} rows")
    v = x.reshape((x.shape[0] // NUM_VIEWS, NUM_VIEWS) + x.shape[1:])
    return v[:, 1:].reshape((-1,) + x.shape[1:]), v[:, 0]


def cosine_matrix(rotated, originals, eps: float = 1e-8):
    """``[3B, B]``: ``sim[r, j] = cos(rotated[r], originals[j])`` (each vector's norm floored at ``eps``,
    the products in full float32 precision)."""
    def unit(v):
        v = v.astype(jnp.float32)
        return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), eps)
    return jnp.matmul(unit(rotated), unit(originals).T, precision=jax.lax.Precision.HIGHEST)  # float32 on TPU too


# --------------------------------------------------------------------------------------------
# Filtering
# --------------------------------------------------------------------------------------------


def true_rank(scores, target):
    """``[R]`` int: the position of ``target[r]`` in row ``r`` of ``scores`` sorted in descending order
    (0: ranked first). Equal scores rank as a stable sort does: the lower column first."""
    s_y = jnp.take_along_axis(scores, target[:, None].astype(jnp.int32), axis=-1)
    cols = jnp.arange(scores.shape[-1])[None, :]
    before = (scores > s_y) | ((scores == s_y) & (cols < target[:, None]))
    return jnp.sum(before, axis=-1).astype(jnp.int32)


def _ratio_fraction(ratio: float) -> tuple[int, int]:
    f = fractions.Fraction(ratio).limit_denominator(1000)
    return f.numerator, f.denominator


def keep_rows(rank, ratio: float):
    """``[R]`` bool: every row of rank 0, plus ``int(ratio * #wrong)`` of the others (rank > 0) in the
    order of a stable sort on ``(rank, row index)``."""
    num, den = _ratio_fraction(ratio)
    n = rank.shape[0]
    wrong = jnp.sum(rank != 0).astype(jnp.int32)
    n_keep = (n - wrong) + (wrong * num) // den
    order = jnp.argsort(rank, stable=True)
    position = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    return position < n_keep


def masked_mean(values, keep):
    """The mean of ``values`` over the rows where ``keep``; 0 when none is kept."""
    k = keep.astype(jnp.float32)
    return jnp.sum(values * k) / jnp.maximum(jnp.sum(k), 1.0)


def retrieval_accuracy(sim):
    """The fraction of rows of a ``[3B, B]`` similarity matrix whose largest entry is its own original."""
    target = jnp.arange(sim.shape[0]) // (NUM_VIEWS - 1)
    return jnp.mean(jnp.argmax(sim, axis=-1) == target)


# --------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------


def _check_options(crop_pad, student_layer, teacher_layer, temperatures=(), ratios=()):
    if not (crop_pad == "scaled" or (isinstance(crop_pad, int) and not isinstance(crop_pad, bool) and crop_pad >= 0)):
        raise ValueError(f"crop_pad must be 'scaled' or an int >= 0; got {crop_pad!r}")
    for name, v in (("student_layer", student_layer), ("teacher_layer", teacher_layer)):
        if not isinstance(v, str) or not v:
            raise ValueError(f"{name} must name a feature tap; got {v!r}")
    for name, t in temperatures:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(f"{name} must be a number > 0; got {t!r}")
    for name, r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1:
            raise ValueError(f"{name} must be a number in [0, 1]; got {r!r}")


def _heads_init(student_layer: str, teacher_layer: str):
    head = ProjectionHead()

    def init_aux(rng, s_feats, t_feats):
        if t_feats is None:
            raise ValueError("sskd needs a teacher (config.teacher.workdir)")
        params = {}
        for i, (name, feats, layer) in enumerate(zip(HEADS, (s_feats, t_feats), (student_layer, teacher_layer))):
            if layer not in feats:
                raise ValueError(f"sskd: no feature {layer!r}; the network has {sorted(feats)}")
            x = jnp.zeros((1, math.prod(feats[layer].shape[1:])), jnp.float32)
            params[name] = head.init(jax.random.fold_in(rng, i), x)["params"]
        return {"params": params}

    return head, init_aux


def _head_similarity(head, inp: LossInputs, name: str, features):
    z = head.apply(aux_variables(inp.aux_params, inp.aux_state, name), features)
    return cosine_matrix(*rotated_and_originals(z))


def sskd_teacher_head_recipe(crop_pad: Any = "scaled", student_layer: str = "embedding",
                             teacher_layer: str = "embedding") -> Recipe:
    """SSKD's teacher pre-stage (see the module docstring): only ``aux/sskd_head_t`` trains, by the
    cross-entropy of the raw cosine similarities of rotated views against the originals."""
    _check_options(crop_pad, student_layer, teacher_layer)
    head, init_aux = _heads_init(student_layer, teacher_layer)

    def loss(inp: LossInputs):
        sim = _head_similarity(head, inp, HEADS[1], jax.lax.stop_gradient(inp.teacher_features[teacher_layer]))
        target = jnp.arange(sim.shape[0]) // (NUM_VIEWS - 1)
        ce = losses.cross_entropy(sim, target)
        b = sim.shape[1]
        return LossOutput(per_example=jnp.zeros((b,), jnp.float32),
                          parts={"ss_ce_t": ce, "ss_acc_t": retrieval_accuracy(sim)},
                          batch_terms={"ss_head_loss": jnp.mean(ce)})

    return Recipe(name="sskd_teacher_head", loss=loss, uses_teacher=True, init_aux=init_aux,
                  prepare_batch=lambda batch, rng, pipeline: sskd_prepare_batch(batch, rng, pipeline, crop_pad),
                  frozen=("student", f"aux/{HEADS[0]}"))


def sskd_recipe(gamma: Any = 0.1, alpha: Any = 0.9, tf_weight: Any = 2.7, ss_weight: Any = 10.0,
                temperature: float = 4.0, tf_temperature: float = 4.0, ss_temperature: float = 0.5,
                tf_ratio: float = 1.0, ss_ratio: float = 0.75, use_labels: bool = True, crop_pad: Any = "scaled",
                student_layer: str = "embedding", teacher_layer: str = "embedding") -> Recipe:
    """SSKD's student stage (see the module docstring). Weights are numbers or schedules
    (:func:`~jaxkd.core.make_weight_schedule`); the teacher head ``aux/sskd_head_t`` is read frozen."""
    _check_options(crop_pad, student_layer, teacher_layer,
                   (("temperature", temperature), ("tf_temperature", tf_temperature),
                    ("ss_temperature", ss_temperature)), (("tf_ratio", tf_ratio), ("ss_ratio", ss_ratio)))
    if not isinstance(use_labels, bool):
        raise ValueError(f"use_labels must be True or False; got {use_labels!r}")
    head, init_aux = _heads_init(student_layer, teacher_layer)
    w_ce, w_kd, w_tf, w_ss = (make_weight_schedule(w) for w in (gamma, alpha, tf_weight, ss_weight))

    def loss(inp: LossInputs):
        when = (inp.stage_step, inp.stage_progress)
        s_rot, s_nor = rotated_and_originals(inp.student_logits)
        t_rot, t_nor = rotated_and_originals(jax.lax.stop_gradient(inp.teacher_logits))
        kd = losses.hinton_kd(s_nor, t_nor, temperature)
        parts = {"kd": kd}
        per_example = w_kd(*when) * kd
        if use_labels:
            y = rotated_and_originals(inp.labels)[1]
            ce = losses.cross_entropy(s_nor, y)
            parts.update(ce=ce, accuracy_originals=jnp.mean(jnp.argmax(s_nor, -1) == y))
            per_example = per_example + w_ce(*when) * ce
        else:
            y = jnp.argmax(t_nor, axis=-1)  # the teacher's class on the original view stands for the label
        # rotated views: KL at tf_temperature over the rows whose class the teacher ranks well
        keep_tf = keep_rows(true_rank(t_rot, jnp.repeat(y, NUM_VIEWS - 1)), tf_ratio)
        kd_tf = masked_mean(losses.hinton_kd(s_rot, t_rot, tf_temperature), keep_tf)
        # similarity rows: each head's [3B, B] cosines, KL at ss_temperature over the kept rows
        sim_s = _head_similarity(head, inp, HEADS[0], inp.student_features[student_layer])
        sim_t = jax.lax.stop_gradient(_head_similarity(head, inp, HEADS[1], inp.teacher_features[teacher_layer]))
        keep_ss = keep_rows(true_rank(sim_t, jnp.arange(sim_t.shape[0]) // (NUM_VIEWS - 1)), ss_ratio)
        kd_ss = masked_mean(losses.hinton_kd(sim_s, sim_t, ss_temperature), keep_ss)
        parts.update(kd_tf=kd_tf, kd_ss=kd_ss, tf_kept=jnp.mean(keep_tf), ss_kept=jnp.mean(keep_ss),
                     ss_acc_t=retrieval_accuracy(sim_t), ss_acc_s=retrieval_accuracy(sim_s))
        return LossOutput(per_example=per_example, parts=parts,
                          batch_terms={"sskd_tf": w_tf(*when) * kd_tf, "sskd_ss": w_ss(*when) * kd_ss})

    return Recipe(name="sskd", loss=loss, uses_teacher=True, init_aux=init_aux,
                  prepare_batch=lambda batch, rng, pipeline: sskd_prepare_batch(batch, rng, pipeline, crop_pad),
                  frozen=(f"aux/{HEADS[1]}",))


# --------------------------------------------------------------------------------------------
# The teacher head on held-out images
# --------------------------------------------------------------------------------------------


def head_retrieval_accuracy(teacher, teacher_variables, head_params, batches, pipeline,
                            teacher_layer: str = "embedding") -> dict:
    """The teacher head's rotation-retrieval accuracy on ``batches`` of raw images (each ``[B, H, H, C]``,
    all of one size ``B``): per batch, the views are the four rotations of every image, with no
    flip and no crop; the head maps the teacher's ``teacher_layer`` features and a rotated view
    counts as retrieved when its most similar original (cosine, among the batch's ``B``) is its
    own. Returns ``{"accuracy": mean over all rotated views, "num_images", "batch_size"}``.
    ``train/ss_acc_t`` is the same quantity on the training views (random flips and crops); a run's
    head is evaluated by :func:`jaxkd.train.sskd_eval.evaluate_teacher_head`."""
    head = ProjectionHead()

    @jax.jit
    def batch_accuracy(images):
        b = images.shape[0]
        views = make_views(images, jnp.zeros((b,), bool), jnp.zeros((b, NUM_VIEWS, 2), jnp.int32), 0)
        _, feats, _ = teacher.apply(teacher_variables, pipeline.normalize(views), train=False)
        if teacher_layer not in feats:
            raise ValueError(f"sskd: the teacher has no feature {teacher_layer!r}; it has {sorted(feats)}")
        return retrieval_accuracy(cosine_matrix(*rotated_and_originals(
            head.apply({"params": head_params}, feats[teacher_layer]))))

    accuracies, size = [], None
    for images in batches:
        size = images.shape[0] if size is None else size
        if images.shape[0] != size:
            raise ValueError(f"head_retrieval_accuracy: every batch must hold {size} images (the retrieval "
                             f"is among a batch's originals); got one of {images.shape[0]}")
        accuracies.append(float(batch_accuracy(jnp.asarray(images))))
    if not accuracies:
        raise ValueError("head_retrieval_accuracy: no batch of images")
    # batches of one size: the mean of the batch means is the mean over all rotated views
    return {"accuracy": sum(accuracies) / len(accuracies), "num_images": size * len(accuracies), "batch_size": size}


register_recipe("sskd_teacher_head", sskd_teacher_head_recipe)
register_recipe("sskd", sskd_recipe)
