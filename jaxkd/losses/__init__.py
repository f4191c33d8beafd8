"""Pure distillation losses returning per-example values (optax convention)."""

from jaxkd.losses.logits import KD_MODES, cross_entropy, hinton_kd, soft_cross_entropy

__all__ = ["KD_MODES", "cross_entropy", "hinton_kd", "soft_cross_entropy"]
