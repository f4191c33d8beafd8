"""Fake quantisation: forward = numpy rounding, gradient = straight-through; quantised models train."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import config as config_lib
from jaxkd import models
from jaxkd.models.quant import fake_quant, quantize_activation, quantize_params
from jaxkd.train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _np_quant(x, bits, signed=True, keep_axis=None, clip=None):
    n = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
    lo = -1.0 if signed else 0.0
    if clip is not None:
        xc, scale = np.clip(x, lo * clip, clip), clip / n
    else:
        xc = x if signed else np.maximum(x, 0)
        axes = tuple(a for a in range(x.ndim) if keep_axis is None or a != keep_axis % x.ndim)
        scale = np.abs(xc).max(axis=axes, keepdims=True) / n
    return np.clip(np.round(xc / scale), lo * n, n) * scale


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_forward_equals_numpy_rounding(bits):
    x = np.random.default_rng(bits).normal(size=(6, 5)).astype(np.float32) * 3
    for kw, npkw in (({}, {}), ({"axis": -1}, {"keep_axis": -1}), ({"signed": False}, {"signed": False}),
                     ({"clip": 1.5}, {"clip": 1.5}), ({"signed": False, "clip": 2.0}, {"signed": False, "clip": 2.0})):
        got = np.asarray(fake_quant(jnp.asarray(x), bits, **kw))
        np.testing.assert_allclose(got, _np_quant(x, bits, **npkw), rtol=1e-6, atol=1e-6, err_msg=str(kw))
        levels = 2 ** (bits - 1) * 2 - 1 if kw.get("signed", True) else 2 ** bits
        cols = got if "axis" in kw else got.reshape(-1, 1)
        for c in range(cols.shape[1]):
            assert len(np.unique(cols[:, c])) <= levels
    assert fake_quant(jnp.asarray(x), None) is not None
    np.testing.assert_array_equal(fake_quant(jnp.asarray(x), None), x)


def test_gradient_is_straight_through():
    x = jnp.linspace(-3.0, 3.0, 13)
    g = jax.grad(lambda v: jnp.sum(fake_quant(v, 3, clip=2.0) * jnp.arange(13.0)))(x)
    inside = np.abs(np.asarray(x)) <= 2.0
    np.testing.assert_array_equal(np.asarray(g)[inside], np.arange(13.0)[inside])  # identity inside
    np.testing.assert_array_equal(np.asarray(g)[~inside], 0.0)                       # zero where clipped
    g = jax.grad(lambda v: jnp.sum(fake_quant(v, 2) * 2.0))(x)                       # dynamic range: no clipping
    np.testing.assert_array_equal(g, 2.0)
    g = jax.grad(lambda v: jnp.sum(fake_quant(v, 2, signed=False)))(x)               # unsigned clips negatives
    np.testing.assert_array_equal(g, (np.asarray(x) >= 0).astype(np.float32))


def test_quantised_linear_model_is_exact():
    """A logistic regression (mlp with no hidden layer): logits = q_act(x) @ q_w(W) + b."""
    model = models.create_model("mlp", 10, hidden=(), quant={"weight_bits": 3, "act_bits": 4, "per_channel": False})
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
    v = models.create_model("mlp", 10, hidden=()).init(jax.random.PRNGKey(1), x)
    logits, _, _ = model.apply(v, x, train=False)
    flat = np.asarray(x).reshape(4, -1)
    act = np.stack([_np_quant(r[None], 4) [0] if r.min() < 0 else _np_quant(r[None], 4, signed=False)[0]
                    for r in flat])
    w = _np_quant(np.asarray(v["params"]["fc"]["kernel"]), 3)
    np.testing.assert_allclose(logits, act @ w + np.asarray(v["params"]["fc"]["bias"]), rtol=1e-5, atol=1e-5)
    nonneg = jnp.abs(x)
    np.testing.assert_allclose(quantize_activation(nonneg, 4)[0], _np_quant(np.asarray(nonneg)[:1], 4, signed=False)[0],
                               rtol=1e-6, atol=1e-6)


def test_skip_and_per_channel_weights():
    params = {"a": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32),
                    "bias": jnp.ones(3)}, "fc": {"kernel": jnp.ones((3, 2)) * 0.3}}
    q = quantize_params(params, 2, per_channel=True, skip=("fc",))
    np.testing.assert_array_equal(q["fc"]["kernel"], params["fc"]["kernel"])
    np.testing.assert_array_equal(q["a"]["bias"], params["a"]["bias"])
    for c in range(3):  # 2 bits signed: {-m, 0, m} with m = max |W[:, c]| per output channel
        m = float(jnp.abs(params["a"]["kernel"][:, c]).max())
        got = np.abs(np.asarray(q["a"]["kernel"][:, c]))
        assert np.all(np.isclose(got, 0.0) | np.isclose(got, m, rtol=1e-6)), (got, m)
    with pytest.raises(ValueError, match="unknown key"):
        models.create_model("mlp", 10, quant={"bitz": 2})


def test_quantised_student_trains_through_the_loop(tmp_path, data_dir):
    c = config_lib.load_config(os.path.join(ROOT, "experiments/configs/digits.py"))
    c.train.num_epochs, c.train.progress, c.train.tensorboard = 2, False, False
    c.method = {"name": "ce"}
    c.model.kwargs = {"hidden": (32,), "quant": {"weight_bits": 2, "act_bits": 2}}
    summary = train_and_evaluate(c, str(tmp_path / "q"))
    assert summary["best_accuracy"] > 0.3  # chance: 0.1
