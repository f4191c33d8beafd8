"""Pure distillation losses returning per-example values (optax convention)."""

from jaxkd.losses.logits import KD_MODES, cross_entropy, hinton_kd, soft_cross_entropy
from jaxkd.losses.logits import dist_inter, dist_intra, dist_loss, dkd, dkd_terms, standardize_logits
from jaxkd.losses.logits import apprentice_kd, apprentice_loss, refinery_kl

__all__ = ["KD_MODES", "cross_entropy", "hinton_kd", "soft_cross_entropy",
           "dist_inter", "dist_intra", "dist_loss", "dkd", "dkd_terms", "standardize_logits",
           "apprentice_kd", "apprentice_loss", "refinery_kl"]

from jaxkd.losses import features as _features
from jaxkd.losses.features import *  # noqa: F401,F403  (its __all__ is the public list)

__all__ += list(_features.__all__)

from jaxkd.losses import ensemble as _ensemble
from jaxkd.losses.ensemble import *  # noqa: F401,F403  (multi-teacher losses)

__all__ += list(_ensemble.__all__)

from jaxkd.losses import transformer as _transformer
from jaxkd.losses.transformer import *  # noqa: F401,F403  (TinyBERT, MiniLM attention losses)

__all__ += list(_transformer.__all__)

from jaxkd.losses import bss as _bss
from jaxkd.losses.bss import *  # noqa: F401,F403  (BSS's student loss and schedules)

__all__ += list(_bss.__all__)

from jaxkd.losses import contrastive as _contrastive
from jaxkd.losses.contrastive import *  # noqa: F401,F403  (CRD's NCE, scores, bank update)

__all__ += list(_contrastive.__all__)
