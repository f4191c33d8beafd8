"""Label Refinery (Bagherinezhad et al., arXiv 1805.02641): generations of soft labels.

Generation 0 is trained on the hard labels (plain cross-entropy). Generation ``t >= 1`` is
trained *only* on ``KL(p_R || p_S)``, with ``p_R`` the softmax of the refinery (generation
``t-1``, or for generation 1 any other network, e.g. a bigger one) computed on the very same
augmented crop the student sees (the train step feeds both the same view); no hard labels.
The refinery is a frozen teacher loaded from its work dir (``config.teacher.workdir``); the
``jaxkd refine`` command (:mod:`jaxkd.refinery`) chains the generations.

Adversarial jittering (optional, ``adversarial_eps > 0``): a fraction of the batch is replaced
by ``x + eps * sign(grad_x CE(R(x), argmax R(x)))``, one signed-gradient step that moves the
input away from the refinery's own top-1 prediction (no hard label is used), computed inside
the jitted step through ``LossInputs.teacher_apply``; refinery and student then both see the
jittered input. ``eps`` is in the units of the normalised input. (Our reading of the paper's
"adversarial jittering"; its exact recipe, e.g. which examples are jittered, was not
re-checked here.) **Unverified** (issue 19): the authors' code (hessamb/label-refinery, its
only branch) has no adversarial jittering at all, and no other implementation was found in the
code, issue and web indexes searched, so jittering stays off by default (``adversarial_eps =
0``) and every detail of it here is jaxkd's own. Known difference from that code: its refinery
is a registered submodule put in train mode with the student (``model.train()``), so its
BatchNorm normalises with batch statistics; jaxkd runs the refinery in inference mode.
"""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.core import LossInputs, Recipe, register_recipe
from jaxkd.losses import refinery_kl


def adversarial_jitter(refinery_apply: Callable, x: chex.Array, eps: float, rng: chex.Array,
                       fraction: float = 0.5) -> chex.Array:
    """``x`` with a random ``fraction`` of its examples moved one signed-gradient step of size
    ``eps`` that increases the refinery's cross-entropy w.r.t. its own top-1 prediction on ``x``.

    ``refinery_apply(x) -> (logits, features)`` must be differentiable w.r.t. ``x``.
    """
    def ce_to_own_prediction(inputs):
        logits = refinery_apply(inputs)[0]
        target = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1)
        return jnp.sum(losses.cross_entropy(logits, target))

    grad = jax.grad(ce_to_own_prediction)(x)
    x_adv = jax.lax.stop_gradient(x + eps * jnp.sign(grad))
    chosen = jax.random.bernoulli(rng, fraction, (x.shape[0],)).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(chosen, x_adv, x)


def label_refinery_recipe(adversarial_eps: float = 0.0, adversarial_fraction: float = 0.5) -> Recipe:
    """Generation ``t >= 1`` of Label Refinery: KL to the refinery's predictions, no hard labels."""
    if adversarial_eps < 0 or not 0.0 <= adversarial_fraction <= 1.0:
        raise ValueError("adversarial_eps must be >= 0 and adversarial_fraction in [0, 1]; got "
                         f"{adversarial_eps}, {adversarial_fraction}")

    def loss(inp: LossInputs):
        student_logits, refinery_logits = inp.student_logits, inp.teacher_logits
        if adversarial_eps > 0:
            x = adversarial_jitter(inp.teacher_apply, inp.inputs, adversarial_eps, inp.rng, adversarial_fraction)
            refinery_logits = jax.lax.stop_gradient(inp.teacher_apply(x)[0])
            student_logits = inp.student_apply(x)[0]
        kl = refinery_kl(student_logits, refinery_logits)
        return kl, {"kd": kl}

    return Recipe(name="label_refinery", loss=loss, uses_teacher=True,
                  teacher_logits_only=adversarial_eps == 0,  # jittering runs the refinery
                  teacher_temperature=1.0)


register_recipe("label_refinery", label_refinery_recipe)
