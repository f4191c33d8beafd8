"""Contrastive representation distillation (CRD, Tian et al., ICLR 2020): the NCE loss against
memory banks, the contrast scores and the banks' momentum update, as pure functions.

Notation (RepDistiller's ``crd``): ``v`` an L2-normalised embedding of one network, ``m`` rows of
the other network's memory bank; the score of a pair is ``exp(<v, m> / T) / Z``; one positive (the
example's own bank row) and ``K`` negatives per anchor; the noise distribution is uniform over
the ``N`` training examples, ``Pn = 1 / N``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxkd.core import update_rows

__all__ = ["contrast_scores", "crd_nce_loss", "l2_normalize", "momentum_update"]

NCE_EPS = 1e-7  # RepDistiller's ContrastLoss eps


def l2_normalize(x: chex.Array, axis: int = -1, eps: float = 1e-12) -> chex.Array:
    """``x / ||x||_2`` along ``axis`` (RepDistiller's ``Normalize``: ``x / x.pow(2).sum(1).pow(0.5)``;
    ``eps`` only guards an all-zero row)."""
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=axis, keepdims=True), eps * eps))


def contrast_scores(anchor: chex.Array, rows: chex.Array, temperature: float) -> chex.Array:
    """``exp(<anchor_i, rows_ij> / T)`` (not yet divided by ``Z``): ``anchor [B, d]``,
    ``rows [B, K+1, d]`` -> ``[B, K+1]``."""
    if anchor.ndim != 2 or rows.ndim != 3 or rows.shape[0] != anchor.shape[0] or rows.shape[2] != anchor.shape[1]:
        raise ValueError(f"contrast_scores needs anchor [B, d] and rows [B, K+1, d]; got {anchor.shape}, {rows.shape}")
    return jnp.exp(jnp.einsum("bd,bkd->bk", anchor.astype(jnp.float32), rows.astype(jnp.float32)) / temperature)


def crd_nce_loss(scores: chex.Array, num_data: int, eps: float = NCE_EPS) -> chex.Array:
    """NCE loss per anchor (RepDistiller's ``ContrastLoss``), ``[B]``.

    ``scores [B, 1 + K]``: column 0 the positive's ``P_pos``, the others the negatives' ``P_neg``
    (contrast scores divided by ``Z``). With ``Pn = 1 / num_data``::

        loss = -log(P_pos / (P_pos + K Pn + eps)) - sum_neg log(K Pn / (P_neg + K Pn + eps))

    The batch mean is the reference's ``-(log_D1.sum(0) + log_D0.view(-1, 1).sum(0)) / bsz``.
    """
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be [B, 1 + K] with K >= 1 negatives; got {scores.shape}")
    k = scores.shape[1] - 1
    kpn = k / float(num_data)
    pos, neg = scores[:, 0], scores[:, 1:]
    log_d1 = jnp.log(pos / (pos + kpn + eps))
    log_d0 = jnp.sum(jnp.log(kpn / (neg + kpn + eps)), axis=1)
    return -(log_d1 + log_d0)


def momentum_update(bank: chex.Array, index: chex.Array, new: chex.Array, momentum: float) -> chex.Array:
    """The bank with rows ``index`` replaced by ``normalize(momentum * old + (1 - momentum) * new)``.

    ``new`` is not differentiated. A batch that holds an example twice updates its row once, from
    the last occurrence (:func:`jaxkd.core.update_rows`), computed from the old row.
    """
    new = jax.lax.stop_gradient(new).astype(bank.dtype)
    mixed = l2_normalize(momentum * bank[index] + (1.0 - momentum) * new)
    return update_rows(bank, index, mixed)
