"""Optimizers: any optax optimizer by name, clipping, a weight-decay mask, clear errors, and the
sgd/adam/adamw configs of earlier versions update exactly as recorded before the rewrite."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxkd.errors import ConfigError
from jaxkd.train import optim

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "optim_reference.json")


def _tree():
    rng = np.random.default_rng(0)
    return {"student": {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
                                 "bias": rng.normal(size=(4,)).astype(np.float32)},
                        "bn": {"scale": rng.normal(size=(4,)).astype(np.float32)}},
            "aux": {"head": {"kernel": rng.normal(size=(4, 3)).astype(np.float32)}}}


def _grads(i):
    rng = np.random.default_rng(100 + i)
    return jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), _tree())


def _run(cfg, steps=6, steps_per_epoch=2, num_epochs=3):
    return _updated(optim.make_optimizer(cfg, steps_per_epoch, num_epochs)[0], steps)


def _updated(tx, steps):
    """``_tree()`` after ``steps`` updates by ``tx`` with the gradients ``_grads(0..)``."""
    p = jax.tree.map(jnp.asarray, _tree())
    s = tx.init(p)
    upd = jax.jit(tx.update)
    for i in range(steps):
        u, s = upd(jax.tree.map(jnp.asarray, _grads(i)), s, p)
        p = optax.apply_updates(p, u)
    return p


def test_earlier_configs_update_bit_for_bit_as_recorded():
    """tests/data/optim_reference.json: six updates of sgd (step, nesterov + cosine + warm-up, no
    momentum), adam and adamw, recorded at commit 7209601 with the optimizer module before
    'any optax optimizer'; today's module gives the same float32 bytes."""
    ref = json.load(open(REFERENCE))
    for name, run in ref["runs"].items():
        cfg = {**run["config"], "milestones": tuple(run["config"]["milestones"])}
        got = _run(cfg, ref["num_steps"], ref["steps_per_epoch"], ref["num_epochs"])
        for path, leaf in jax.tree_util.tree_flatten_with_path(got)[0]:
            assert np.asarray(leaf).tobytes().hex() == run["hex"][jax.tree_util.keystr(path)], (name, path)


def test_sgd_state_structure_is_unchanged():
    # checkpoints of earlier runs hold a chain's state for sgd/adam and AdamW's own for adamw
    p = jax.tree.map(jnp.asarray, _tree())
    sgd, _ = optim.make_optimizer({"name": "sgd", "lr": 0.1, "weight_decay": 0.0}, 1, 1)
    assert jax.tree.structure(sgd.init(p)) == jax.tree.structure(
        optax.chain(optax.sgd(optax.constant_schedule(0.1), 0.9)).init(p))
    adamw, _ = optim.make_optimizer({"name": "adamw", "lr": 0.1, "weight_decay": 0.01}, 1, 1)
    want = optax.adamw(optax.constant_schedule(0.1), weight_decay=0.01)
    assert jax.tree.structure(adamw.init(p)) == jax.tree.structure(want.init(p))


def test_any_optax_optimizer_with_its_kwargs():
    cfg = {"name": "rmsprop", "lr": 0.01, "weight_decay": 0.0, "schedule": "constant",
           "kwargs": {"decay": 0.5, "eps": 1e-3}}
    want = _updated(optax.rmsprop(0.01, decay=0.5, eps=1e-3), 3)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), _run(cfg, steps=3), want)


def test_decoupled_weight_decay_goes_to_the_optimizer_that_takes_it():
    # lamb takes weight_decay itself: it gets it (decoupled), nothing is added to the gradient
    cfg = {"name": "lamb", "lr": 0.01, "weight_decay": 0.1, "schedule": "constant"}
    want = _updated(optax.lamb(0.01, weight_decay=0.1), 2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), _run(cfg, steps=2), want)


def test_clip_then_masked_decay_then_sgd_by_hand():
    """One SGD step with clipping to norm 1 and decay on kernels only:
    g' = g * min(1, 1/||g||); d = g' + wd * p (kernels) or g' (others); p -= lr * d."""
    lr, wd = 0.1, 0.5
    cfg = {"name": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": wd, "schedule": "constant",
           "clip_grad_norm": 1.0, "weight_decay_mask": [r"kernel$"]}
    got = _run(cfg, steps=1)
    p, g = _tree(), _grads(0)
    norm = np.sqrt(sum(np.sum(np.square(x.astype(np.float64))) for x in jax.tree.leaves(g)))
    assert norm > 1.0  # the clip is active

    def want(path, pi, gi):
        key = jax.tree_util.keystr(path, simple=True, separator="/")
        d = gi / norm + (wd * pi if key.endswith("kernel") else 0.0)
        return pi - lr * d
    expected = jax.tree_util.tree_map_with_path(want, p, g)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6), got, expected)


def test_errors_name_the_key():
    base = {"lr": 0.1, "weight_decay": 0.0}
    with pytest.raises(ConfigError, match=r"optim.name: 'adamm' is not an optax optimizer; did you mean 'adam'"):
        optim.make_optimizer({**base, "name": "adamm"}, 1, 1)
    with pytest.raises(ConfigError, match=r"optim.kwargs: optax.adam takes no argument\(s\) \['betas'\]"):
        optim.make_optimizer({**base, "name": "adam", "kwargs": {"betas": (0.9, 0.99)}}, 1, 1)
    with pytest.raises(ConfigError, match="clip_grad_norm"):
        optim.make_optimizer({**base, "name": "sgd", "clip_grad_norm": -1}, 1, 1)
    with pytest.raises(ConfigError, match="weight_decay_mask"):
        optim.make_optimizer({**base, "name": "sgd", "weight_decay_mask": "kernel"}, 1, 1)
    with pytest.raises(ConfigError, match="momentum"):
        optim.make_optimizer({**base, "name": "sgd", "momentum": 1.5}, 1, 1)
    with pytest.raises(ConfigError, match="schedule"):
        optim.make_optimizer({**base, "name": "sgd", "schedule": "linear"}, 1, 1)
