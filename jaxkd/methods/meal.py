"""MEAL V2 (Shen & Savvides, arXiv 2009.08453): ensemble soft labels plus a discriminator.

The student learns only from the teachers' averaged softmax (``T = 1``, no hard labels),
``-sum_c pbar_c log softmax(s)_c`` (:func:`jaxkd.losses.meal_v2_kd`), regularised by a small
discriminator ``D`` on the C-dimensional output vectors. Two modes:

``mode="reference"`` (default): the authors' ``train.py`` (szq0214/MEAL-V2, the non-FKD path).

* ``D`` (:class:`ReferenceDiscriminator`) is their stack of 1x1 convolutions on the C-vector,
  i.e. dense layers with bias, ``C -> C/8 -> C/64 -> 2`` (``1000 -> 125 -> 15 -> 2`` on
  ImageNet, ``K = 8`` in their scripts) with a ReLU after *every* layer, the last included.
  For small ``C`` the integer divisions vanish (``10 // 8 = 1``), so jaxkd floors each hidden
  width at 4: ``C = 10`` gives ``10 -> 4 -> 4 -> 2``, ``C = 100`` ``100 -> 12 -> 4 -> 2``
  (``disc_hidden`` sets them explicitly).
* It sees **logits**: the student's ``s`` and the mean of the teachers' logits (not of their
  softmax).
* One two-way BCE with logits, student rows labelled ``[1, 0]``, teacher rows ``[0, 1]``,
  averaged over the ``2B x 2`` outputs: per example
  ``d_i = (sum_k bce(D(s_i)_k, [1,0]_k) + sum_k bce(D(tbar_i)_k, [0,1]_k)) / 4``, whose batch
  mean is ``nn.BCEWithLogitsLoss()`` of the reference.
* The loss is ``kd + adv_weight * d`` (``adv_weight = 1`` in the reference) minimised by *both*
  players: the student's logits are not detached, so the student descends the same ``d`` that
  trains ``D``. There is no separate fooling term.
* ``D`` trains with the student's optimizer settings: the reference puts it in the same SGD as a
  second parameter group whose ``d_lr`` (1e-4) its ``_set_learning_rate`` overwrites with the
  student's learning rate every epoch, so it trains at the student's lr and momentum, with no
  weight decay (the reference's is 0). jaxkd gives ``D`` the student's ``config.optim`` with
  ``weight_decay = 0`` (``aux_optim = {"weight_decay": 0.0}``: same schedule and momentum, its
  own optimizer state), so a student trained with weight decay does not decay ``D``. (With
  ``clip_grad_norm`` set, each group's norm is then clipped on its own.)

``mode="gan"``: jaxkd's earlier reading, a GAN-style game on probabilities.

* ``D`` (:class:`OutputDiscriminator`) is an MLP ``C -> 64 -> 64 -> 1`` (LeakyReLU 0.2) on the
  probabilities ``pbar`` and ``softmax(s)``;
* ``D`` learns ``BCE(D(pbar), 1) + BCE(D(softmax(s)), 0)`` (teacher = real);
* the student learns ``kd + adv_weight * BCE(D(softmax(s)), 1)`` (a fooling term), with
  ``stop_gradient`` keeping each term to its own player's params;
* ``D`` has its own optimizer (Adam at a constant ``disc_lr = 1e-4``, the reference's nominal
  ``--d_lr`` default, which the reference itself never uses; see
  :mod:`jaxkd.train.param_groups`).

In both modes ``D`` is an auxiliary module (``aux/discriminator``, checkpointed with the
student, not exported). The student should start from a pretrained checkpoint:
``config.model.init_from`` (the reference starts from timm's pretrained weights).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxkd import losses
from jaxkd.core import LossInputs, Recipe, register_recipe

__all__ = ["MEAL_MODES", "OutputDiscriminator", "ReferenceDiscriminator", "meal_v2_recipe",
           "reference_disc_widths"]

MEAL_MODES = ("reference", "gan")


class OutputDiscriminator(nn.Module):
    """MLP ``C -> hidden[0] -> hidden[1] -> 1`` (LeakyReLU 0.2), returning one logit per example."""

    hidden: Sequence[int] = (64, 64)

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = nn.leaky_relu(nn.Dense(width)(x), 0.2)
        return nn.Dense(1)(x)[..., 0]


class ReferenceDiscriminator(nn.Module):
    """The reference's discriminator: dense layers (1x1 convolutions on ``[N, C, 1, 1]``) with
    bias, ``C -> hidden[0] -> hidden[1] -> 2``, a ReLU after every layer including the last.
    Returns ``[..., 2]`` (fed to a two-way BCE with logits, so the "logits" are ``>= 0``)."""

    hidden: Sequence[int] = (125, 15)

    @nn.compact
    def __call__(self, x):
        for width in (*self.hidden, 2):
            x = nn.relu(nn.Dense(width)(x))
        return x


def reference_disc_widths(num_classes: int, k: int = 8, min_width: int = 4) -> tuple[int, int]:
    """The reference's hidden widths ``(C // k, C // k // k)`` (``1000 -> (125, 15)``), each
    floored at ``min_width`` so that small ``C`` still gives a usable network (``10 -> (4, 4)``)."""
    first = num_classes // k
    return max(first, min_width), max(first // k, min_width)


def meal_v2_recipe(mode: str = "reference", adv_weight: float = 1.0, disc_lr: float | None = None,
                   disc_optimizer: str | None = None, disc_hidden: Sequence[int] | None = None) -> Recipe:
    """MEAL V2: soft labels of the teacher ensemble (``T = 1``, no CE) + a discriminator.

    Args:
      mode: ``"reference"`` (the authors' ``train.py``: D on logits, two-way BCE, one loss for
        both players, D in the student's optimizer) or ``"gan"`` (jaxkd's earlier mode: D on
        probabilities, its own Adam, a fooling term); see the module docstring.
      adv_weight: reference mode: the weight of the discriminator loss in the one objective
        (1 in the reference); gan mode: the weight of the student's fooling term (0 turns the
        discriminator's effect on the student off; ``D`` still trains).
      disc_lr: gan mode only: the discriminator's constant learning rate (default 1e-4).
      disc_optimizer: gan mode only: ``"adam"`` (default) or ``"sgd"`` for the discriminator.
      disc_hidden: the two hidden widths of the 3-layer discriminator; default gan mode
        ``(64, 64)``, reference mode :func:`reference_disc_widths` of the class count.
    """
    if mode not in MEAL_MODES:
        raise ValueError(f"mode must be one of {MEAL_MODES}; got {mode!r}")
    if adv_weight < 0:
        raise ValueError(f"adv_weight must be >= 0; got {adv_weight}")
    if mode == "reference" and (disc_lr is not None or disc_optimizer is not None):
        raise ValueError("disc_lr and disc_optimizer belong to mode='gan'; in mode='reference' the discriminator "
                         "trains with the student's optimizer and learning rate, as in the reference")
    disc_lr = 1e-4 if disc_lr is None else disc_lr
    disc_optimizer = "adam" if disc_optimizer is None else disc_optimizer
    if disc_lr <= 0:
        raise ValueError(f"disc_lr must be > 0; got {disc_lr}")
    if disc_optimizer not in ("adam", "sgd"):
        raise ValueError(f"disc_optimizer must be 'adam' or 'sgd'; got {disc_optimizer!r}")
    if disc_hidden is not None:
        disc_hidden = tuple(int(h) for h in disc_hidden)
        if len(disc_hidden) != 2 or min(disc_hidden) < 1:
            raise ValueError(f"disc_hidden must give 2 widths >= 1 (3 layers); got {disc_hidden}")
    if mode == "reference":
        return _reference_recipe(adv_weight, disc_hidden)
    disc = OutputDiscriminator(disc_hidden or (64, 64))

    def init_aux(rng, s_feats, t_feats):
        num_classes = s_feats["logits"].shape[-1]
        return {"params": {"discriminator": disc.init(rng, jnp.zeros((1, num_classes), jnp.float32))["params"]}}

    def loss(inp: LossInputs):
        t = losses.as_teacher_stack(inp.teacher_logits)
        kd = losses.meal_v2_kd(inp.student_logits, t)
        p_teacher = losses.ensemble_soft_labels(t, 1.0)
        p_student = jax.nn.softmax(inp.student_logits.astype(jnp.float32), axis=-1)
        d_params = inp.aux_params["discriminator"]
        real = disc.apply({"params": d_params}, p_teacher)
        fake = disc.apply({"params": d_params}, jax.lax.stop_gradient(p_student))
        disc_loss = (optax.sigmoid_binary_cross_entropy(real, jnp.ones_like(real))
                     + optax.sigmoid_binary_cross_entropy(fake, jnp.zeros_like(fake)))
        fooled = disc.apply({"params": jax.lax.stop_gradient(d_params)}, p_student)
        adv = optax.sigmoid_binary_cross_entropy(fooled, jnp.ones_like(fooled))
        parts = {"kd": kd, "adv": adv, "disc": disc_loss,
                 "disc_accuracy": 0.5 * ((real > 0).astype(jnp.float32) + (fake < 0).astype(jnp.float32))}
        return kd + adv_weight * adv + disc_loss, parts

    # the discriminator's own optimizer (jaxkd.train.param_groups), whatever config.optim says
    aux_optim = {"name": disc_optimizer, "lr": float(disc_lr), "schedule": "constant", "weight_decay": 0.0,
                 "momentum": 0.9, "nesterov": False, "warmup_epochs": 0.0}
    return Recipe(name="meal_v2", loss=loss, uses_teacher=True, init_aux=init_aux, multi_teacher=True,
                  aux_optim=aux_optim)


def _reference_recipe(adv_weight: float, disc_hidden) -> Recipe:
    def make_disc(num_classes):
        return ReferenceDiscriminator(disc_hidden or reference_disc_widths(num_classes))

    def init_aux(rng, s_feats, t_feats):
        num_classes = s_feats["logits"].shape[-1]
        disc = make_disc(num_classes)
        return {"params": {"discriminator": disc.init(rng, jnp.zeros((1, num_classes), jnp.float32))["params"]}}

    def loss(inp: LossInputs):
        t = losses.as_teacher_stack(inp.teacher_logits)
        kd = losses.meal_v2_kd(inp.student_logits, t)
        s = inp.student_logits.astype(jnp.float32)
        t_mean = jax.lax.stop_gradient(jnp.mean(t.astype(jnp.float32), axis=0))  # mean of the logits
        disc = make_disc(s.shape[-1])
        d_params = inp.aux_params["discriminator"]
        out_s = disc.apply({"params": d_params}, s)          # [B, 2], student rows: target [1, 0]
        out_t = disc.apply({"params": d_params}, t_mean)     # [B, 2], teacher rows: target [0, 1]
        student_target = jnp.broadcast_to(jnp.array([1.0, 0.0]), out_s.shape)
        bce_s = jnp.sum(optax.sigmoid_binary_cross_entropy(out_s, student_target), axis=-1)
        bce_t = jnp.sum(optax.sigmoid_binary_cross_entropy(out_t, 1.0 - student_target), axis=-1)
        disc_loss = (bce_s + bce_t) / 4.0  # batch mean = mean over the 2B x 2 outputs
        accuracy = 0.5 * ((out_s[:, 0] > out_s[:, 1]).astype(jnp.float32)
                          + (out_t[:, 1] > out_t[:, 0]).astype(jnp.float32))
        parts = {"kd": kd, "disc": disc_loss, "disc_accuracy": accuracy}
        return kd + adv_weight * disc_loss, parts

    return Recipe(name="meal_v2", loss=loss, uses_teacher=True, init_aux=init_aux, multi_teacher=True,
                  aux_optim={"weight_decay": 0.0})  # the student's optimizer settings, D not decayed


register_recipe("meal_v2", meal_v2_recipe)
