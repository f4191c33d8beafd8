"""MEAL V2 (Shen & Savvides, arXiv 2009.08453): ensemble soft labels plus a discriminator.

The student learns only from the teachers' averaged softmax (``T = 1``, no hard labels),
``-sum_c pbar_c log softmax(s)_c`` (:func:`jaxkd.losses.meal_v2_kd`), regularised by a small
discriminator ``D`` (a 3-layer MLP on the C-dimensional output vectors, here the
probabilities ``pbar`` and ``softmax(s)``) trained adversarially with binary cross-entropy:

* ``D`` learns ``BCE(D(pbar), 1) + BCE(D(softmax(s)), 0)`` (teacher = real);
* the student learns ``kd + adv_weight * BCE(D(softmax(s)), 1)`` (look like the teacher).

Both objectives live in one per-example loss: ``stop_gradient`` keeps each term to its own
params (the student's output is a constant in ``D``'s term, ``D``'s params are constants in
the student's term), so the one gradient of the step gives each player its own objective.
``D`` is an auxiliary module (``aux/discriminator``, checkpointed with the student, not
exported) with its own optimizer (Adam, ``disc_lr`` 1e-4 as in the reference; see
:mod:`jaxkd.train.param_groups`).
The student should start from a pretrained checkpoint: ``config.model.init_from``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxkd import losses
from jaxkd.core import LossInputs, Recipe, register_recipe

__all__ = ["OutputDiscriminator", "meal_v2_recipe"]


class OutputDiscriminator(nn.Module):
    """MLP ``C -> hidden[0] -> hidden[1] -> 1`` (LeakyReLU 0.2), returning one logit per example."""

    hidden: Sequence[int] = (64, 64)

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = nn.leaky_relu(nn.Dense(width)(x), 0.2)
        return nn.Dense(1)(x)[..., 0]


def meal_v2_recipe(adv_weight: float = 1.0, disc_lr: float = 1e-4, disc_optimizer: str = "adam",
                   disc_hidden: Sequence[int] = (64, 64)) -> Recipe:
    """MEAL V2: soft labels of the teacher ensemble (``T = 1``, no CE) + adversarial output matching.

    Args:
      adv_weight: weight of the student's adversarial term (0 turns the discriminator's effect
        on the student off; ``D`` still trains).
      disc_lr: the discriminator's learning rate (constant).
      disc_optimizer: ``"adam"`` or ``"sgd"`` for the discriminator.
      disc_hidden: the two hidden widths of the 3-layer discriminator.
    """
    if adv_weight < 0:
        raise ValueError(f"adv_weight must be >= 0; got {adv_weight}")
    if disc_lr <= 0:
        raise ValueError(f"disc_lr must be > 0; got {disc_lr}")
    if disc_optimizer not in ("adam", "sgd"):
        raise ValueError(f"disc_optimizer must be 'adam' or 'sgd'; got {disc_optimizer!r}")
    disc_hidden = tuple(int(h) for h in disc_hidden)
    if len(disc_hidden) != 2:
        raise ValueError(f"disc_hidden must give 2 widths (3 layers); got {disc_hidden}")
    disc = OutputDiscriminator(disc_hidden)

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


register_recipe("meal_v2", meal_v2_recipe)
