"""Contrastive representation distillation (CRD; Tian et al., ICLR 2020; RepDistiller's ``crd``).

Per step, with ``f_s``, ``f_t`` the student's and the teacher's penultimate features (the
``embedding`` tap, pooled):

* embedding heads ``v_s = normalize(W_s f_s + b_s)``, ``v_t = normalize(W_t f_t + b_t)`` (dimension
  128), auxiliary modules ``aux/crd_embed_s`` and ``aux/crd_embed_t`` trained with the student's
  optimizer; the teacher's backbone stays frozen, its head trains;
* two memory banks, one row per training example (rows follow ``batch["index"]``, the example's
  position in the training set actually used): ``bank_s`` holds student embeddings, ``bank_t``
  teacher embeddings. They start uniform in ``+-1/sqrt(d/3)`` and are updated after each step with
  momentum 0.5 and re-normalised (a repeated example: its last occurrence, from the old row);
* ``K`` negatives per anchor, drawn from the examples of other classes ("exact" mode): without
  replacement when the other-class pool holds at least ``K``, with replacement otherwise, as
  RepDistiller's ``np.random.choice(..., replace=K > pool)``. ``max_nce_k="pool"`` (default)
  caps ``K`` at the smallest pool, so that a small training set is never sampled with
  replacement; an int caps it at that number; ``None`` keeps ``nce_k`` (16,384 on CIFAR);
* scores ``exp(<v, m> / 0.07) / Z`` both ways (student anchor against the teacher's bank, teacher
  anchor against the student's bank); each side's ``Z`` is fixed on the first batch as
  ``mean(scores) * N`` (as the reference) and kept in the checkpoint;
* the NCE loss of both directions summed (:func:`jaxkd.losses.crd_nce_loss`), weighted by
  ``beta = 0.8``, with ``gamma * CE`` (1) and ``alpha * KD`` (0: "CRD"; 1: "CRD + KD").

Everything that is not trained by gradients (banks, ``Z``, the class structure) is the recipe
state: initialised from the run's training labels, checkpointed, resumed exactly, updated inside
the jitted step. On 8 devices the step computes what it computes on one.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import losses
from jaxkd.core import LossInputs, LossOutput, Recipe, RecipeContext, aux_variables, register_recipe
from jaxkd.losses.contrastive import contrast_scores, crd_nce_loss, l2_normalize, momentum_update
from jaxkd.methods.common import ce_plus_kd
from jaxkd.models.layers import torch_linear

__all__ = ["Embed", "crd_recipe", "negative_pool_sizes", "sample_negatives"]

HEADS = ("crd_embed_s", "crd_embed_t")


class Embed(nn.Module):
    """RepDistiller's ``Embed``: flatten, ``nn.Linear(d_in, d)`` (PyTorch init), L2-normalise."""

    dim: int = 128

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1)).astype(jnp.float32)
        return l2_normalize(torch_linear(self.dim, x.shape[-1], jnp.float32, "linear", zero_bias=False)(x))


def negative_pool_sizes(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """For each class, how many training examples belong to other classes."""
    counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes)
    return len(labels) - counts


def sample_negatives(rng, anchor_labels, class_order, class_start, class_count, train_labels, k: int):
    """``[B, K]`` positions of negatives for anchors of ``anchor_labels``: examples of other classes,
    without replacement where the other-class pool holds at least ``K`` (the ``K`` smallest of
    uniform keys over that pool), with replacement where it does not (uniform draws from it).

    ``class_order`` is the stable argsort of ``train_labels``; class ``c`` occupies
    ``class_order[class_start[c] : class_start[c] + class_count[c]]``.
    """
    n = train_labels.shape[0]
    r_keys, r_draw = jax.random.split(rng)
    keys = jax.random.uniform(r_keys, (anchor_labels.shape[0], n))
    keys = jnp.where(train_labels[None, :] == anchor_labels[:, None], 2.0, keys)  # same class: never first
    _, without = jax.lax.top_k(-keys, k)
    y_count, y_start = class_count[anchor_labels], class_start[anchor_labels]
    pool = n - y_count
    u = (jax.random.uniform(r_draw, (anchor_labels.shape[0], k)) * pool[:, None]).astype(jnp.int32)
    u = jnp.minimum(u, pool[:, None] - 1)
    with_replacement = class_order[u + jnp.where(u >= y_start[:, None], y_count[:, None], 0)]
    return jnp.where((pool >= k)[:, None], without, with_replacement).astype(jnp.int32)


def crd_recipe(feat_dim: int = 128, nce_k: int = 16384, nce_t: float = 0.07, nce_m: float = 0.5,
               beta: float = 0.8, gamma: Any = 1.0, alpha: Any = 0.0, temperature: float = 4.0,
               max_nce_k: Any = "pool", student_layer: str = "embedding", teacher_layer: str = "embedding") -> Recipe:
    """CRD (see the module docstring): ``gamma CE + alpha KD + beta (NCE_s + NCE_t)``.

    RepDistiller: CRD alone ``gamma=1, alpha=0, beta=0.8``; CRD + KD ``alpha=1``.
    """
    for name, v in (("feat_dim", feat_dim), ("nce_k", nce_k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int; got {v!r}")
    if not nce_t > 0 or not 0 <= nce_m < 1:
        raise ValueError(f"nce_t must be > 0 and nce_m in [0, 1); got {nce_t!r}, {nce_m!r}")
    if not (max_nce_k in ("pool", None) or (isinstance(max_nce_k, int) and not isinstance(max_nce_k, bool)
                                             and max_nce_k >= 1)):
        raise ValueError(f"max_nce_k must be 'pool', None or a positive int; got {max_nce_k!r}")
    embed = Embed(feat_dim)

    def init_aux(rng, s_feats, t_feats):
        params = {}
        for i, (head, feats, layer) in enumerate(zip(HEADS, (s_feats, t_feats), (student_layer, teacher_layer))):
            if layer not in feats:
                raise ValueError(f"crd: no feature {layer!r}; the network has {sorted(feats)}")
            x = jnp.zeros((1, math.prod(feats[layer].shape[1:])), jnp.float32)
            params[head] = embed.init(jax.random.fold_in(rng, i), x)["params"]
        return {"params": params}

    def init_state(ctx: RecipeContext):
        labels = np.asarray(ctx.train_labels, np.int64)
        pools = negative_pool_sizes(labels, ctx.num_classes)
        k = nce_k if max_nce_k is None else min(nce_k, int(pools.min()) if max_nce_k == "pool" else max_nce_k)
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=ctx.num_classes)
        stdv = 1.0 / math.sqrt(feat_dim / 3.0)
        r_s, r_t = jax.random.split(ctx.rng)
        bank = lambda r: jax.random.uniform(r, (ctx.num_train, feat_dim), jnp.float32, -stdv, stdv)  # noqa: E731
        return {"bank_s": bank(r_s), "bank_t": bank(r_t), "z_s": jnp.float32(-1.0), "z_t": jnp.float32(-1.0),
                "labels": jnp.asarray(labels, jnp.int32), "class_order": jnp.asarray(order, jnp.int32),
                "class_start": jnp.asarray(np.concatenate([[0], np.cumsum(counts)[:-1]]), jnp.int32),
                "class_count": jnp.asarray(counts, jnp.int32),
                # its length is K, the number of negatives (static shapes): fixed by the class sizes
                "k_slots": jnp.zeros((k,), jnp.int8)}

    def loss(inp: LossInputs):
        st = inp.recipe_state
        idx = inp.batch["index"].astype(jnp.int32)
        v_s = embed.apply(aux_variables(inp.aux_params, inp.aux_state, HEADS[0]), inp.student_features[student_layer])
        v_t = embed.apply(aux_variables(inp.aux_params, inp.aux_state, HEADS[1]),
                          jax.lax.stop_gradient(inp.teacher_features[teacher_layer]))
        negatives = sample_negatives(inp.rng, st["labels"][idx], st["class_order"], st["class_start"],
                                     st["class_count"], st["labels"], st["k_slots"].shape[0])
        rows = jnp.concatenate([idx[:, None], negatives], axis=1)  # [B, 1 + K], the positive first
        n = st["bank_s"].shape[0]
        out_s = contrast_scores(v_s, jax.lax.stop_gradient(st["bank_t"][rows]), nce_t)  # student vs teacher bank
        out_t = contrast_scores(v_t, jax.lax.stop_gradient(st["bank_s"][rows]), nce_t)  # teacher vs student bank
        # Z from the first batch (the reference's mean of the scores times N), then fixed
        z_s = jnp.where(st["z_s"] < 0, jax.lax.stop_gradient(jnp.mean(out_s)) * n, st["z_s"])
        z_t = jnp.where(st["z_t"] < 0, jax.lax.stop_gradient(jnp.mean(out_t)) * n, st["z_t"])
        nce_s, nce_t_ = crd_nce_loss(out_s / z_s, n), crd_nce_loss(out_t / z_t, n)
        total, parts = ce_plus_kd(inp, gamma, alpha, lambda i: losses.hinton_kd(
            i.student_logits, i.teacher_logits, temperature))
        parts.update({"crd_s": nce_s, "crd_t": nce_t_})
        new_state = {**st, "z_s": z_s, "z_t": z_t,
                     "bank_s": momentum_update(st["bank_s"], idx, v_s, nce_m),
                     "bank_t": momentum_update(st["bank_t"], idx, v_t, nce_m)}
        return LossOutput(per_example=total + beta * (nce_s + nce_t_), parts=parts, recipe_state=new_state)

    return Recipe(name="crd", loss=loss, uses_teacher=True, init_aux=init_aux, init_state=init_state)


register_recipe("crd", crd_recipe)
