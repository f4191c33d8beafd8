"""Pure distillation losses returning per-example values (optax convention)."""

from jaxkd.losses.logits import KD_MODES, cross_entropy, hinton_kd, soft_cross_entropy

__all__ = ["KD_MODES", "cross_entropy", "hinton_kd", "soft_cross_entropy"]

from jaxkd.losses import features as _features
from jaxkd.losses.features import *  # noqa: F401,F403  (its __all__ is the public list)

__all__ += list(_features.__all__)

from jaxkd.losses import ensemble as _ensemble
from jaxkd.losses.ensemble import *  # noqa: F401,F403  (multi-teacher losses)

__all__ += list(_ensemble.__all__)

from jaxkd.losses import transformer as _transformer
from jaxkd.losses.transformer import *  # noqa: F401,F403  (TinyBERT, MiniLM attention losses)

__all__ += list(_transformer.__all__)
