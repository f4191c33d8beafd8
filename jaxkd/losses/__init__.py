"""Pure distillation losses returning per-example values (optax convention)."""

from jaxkd.losses.logits import KD_MODES, cross_entropy, hinton_kd, soft_cross_entropy

__all__ = ["KD_MODES", "cross_entropy", "hinton_kd", "soft_cross_entropy"]

from jaxkd.losses.features import (  # noqa: E402
    AT_DEFAULT_BETA,
    AT_MODES,
    attention_map,
    attention_transfer,
    fitnets_hint,
    fsp_loss,
    fsp_matrix,
    gradient_attention,
    gradient_attention_map,
    gradient_attention_transfer,
    input_gradient,
)

__all__ += [
    "AT_DEFAULT_BETA",
    "AT_MODES",
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
