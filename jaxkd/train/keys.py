"""Typed PRNG keys in the train state, raw key data in checkpoints.

jaxkd makes its keys with ``jax.random.key`` (typed keys: a key is one scalar of a key dtype, and
mixing it up with an integer array is an error). Orbax stores arrays, not key dtypes, so a run
checkpoint holds ``jax.random.key_data(state.rng)``: the raw ``uint32`` words, which is also what
checkpoints written when jaxkd used ``jax.random.PRNGKey`` hold. Restoring goes through the raw form
and wraps the key again when the template's key is typed (:func:`wrap_like`), so old and new
checkpoints restore the same way. Both kinds of key give the same random numbers for the same
seed (threefry), so a run does not change by switching.
"""

from __future__ import annotations

from typing import Any

import jax

__all__ = ["is_typed_key", "to_key_data", "wrap_like"]


def is_typed_key(x: Any) -> bool:
    """Whether ``x`` is an array of typed PRNG keys (``jax.random.key``), not raw ``uint32`` data."""
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_key_data(state):
    """``state`` with a typed ``rng`` replaced by its raw key data (what a checkpoint stores)."""
    rng = getattr(state, "rng", None)
    return state.replace(rng=jax.random.key_data(rng)) if is_typed_key(rng) else state


def wrap_like(state, template):
    """``state`` (restored from raw key data) with ``rng`` typed again when ``template.rng`` is typed
    (with the template's PRNG implementation); unchanged otherwise."""
    rng, want = getattr(state, "rng", None), getattr(template, "rng", None)
    if not is_typed_key(want) or is_typed_key(rng):
        return state
    return state.replace(rng=jax.random.wrap_key_data(rng, impl=jax.random.key_impl(want)))
