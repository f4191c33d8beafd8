"""Distillation methods that need more than a loss on logits (sample generators etc.)."""

from jaxkd.methods.bss import (
    BSSLossTerms,
    BSSOptions,
    BSSResult,
    boundary_supporting_samples,
    bss_loss,
    bss_statistics,
    bss_weights,
)
