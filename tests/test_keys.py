"""Typed PRNG keys: the train state holds a ``jax.random.key``, checkpoints hold its raw key data, and
checkpoints written with raw ``uint32`` keys (``jax.random.PRNGKey``, jaxkd before typed keys)
restore into a typed-key run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxkd.core import build_recipe
from jaxkd.models import create_model
from jaxkd.train import checkpoint as ckpt_lib
from jaxkd.train import keys as keys_lib
from jaxkd.train import step as step_lib

SAMPLE = jnp.zeros((1, 8, 8, 1))
TX = optax.sgd(0.1, momentum=0.9)


def _state(key):
    return step_lib.create_train_state(key, create_model("mlp", 10, hidden=(8,)), build_recipe({"name": "ce"}), TX,
                                       SAMPLE)


def _save_and_restore(tmp_path, saved, template):
    mgr = ckpt_lib.run_manager(str(tmp_path))
    ckpt_lib.save_run(mgr, 7, saved, {"pos": 3}, {"history": []})
    mgr.wait_until_finished()
    step, state, data, _ = ckpt_lib.restore_latest(ckpt_lib.run_manager(str(tmp_path)), template)
    assert (step, data["pos"]) == (7, 3)
    return state


def test_raw_key_checkpoint_restores_into_a_typed_key_template(tmp_path):
    raw = _state(jax.random.PRNGKey(3)).replace(step=jnp.asarray(7, jnp.int32))
    assert raw.rng.dtype == jnp.uint32 and raw.rng.shape == (2,)  # what old checkpoints hold
    template = _state(jax.random.key(0))
    assert keys_lib.is_typed_key(template.rng)
    state = _save_and_restore(tmp_path, raw, template)
    assert keys_lib.is_typed_key(state.rng)
    np.testing.assert_array_equal(jax.random.key_data(state.rng), raw.rng)
    jax.tree.map(np.testing.assert_array_equal, state.params, raw.params)
    # and the restored key draws what the raw one drew
    np.testing.assert_array_equal(jax.random.normal(jax.random.fold_in(state.rng, 5), (4,)),
                                  jax.random.normal(jax.random.fold_in(raw.rng, 5), (4,)))


def test_typed_key_round_trip_and_same_numbers_as_raw(tmp_path):
    typed, raw = _state(jax.random.key(11)), _state(jax.random.PRNGKey(11))
    np.testing.assert_array_equal(jax.random.key_data(typed.rng), raw.rng)  # same split of the same seed
    jax.tree.map(np.testing.assert_array_equal, typed.params, raw.params)  # same init
    state = _save_and_restore(tmp_path, typed, _state(jax.random.key(0)))
    assert keys_lib.is_typed_key(state.rng)
    assert jax.random.key_impl(state.rng) == jax.random.key_impl(typed.rng)
    np.testing.assert_array_equal(jax.random.key_data(state.rng), jax.random.key_data(typed.rng))
    # a raw-key template (code that still uses PRNGKey) gets the raw data back
    state = _save_and_restore(tmp_path / "b", typed, raw)
    assert state.rng.dtype == jnp.uint32
    np.testing.assert_array_equal(state.rng, raw.rng)
