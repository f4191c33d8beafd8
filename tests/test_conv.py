"""jaxkd.models.conv: the CPU formulations give lax.conv_general_dilated's numbers, values and
derivatives (reverse and forward mode), and are the ones that run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxkd.models import conv as conv_lib
from jaxkd.models import create_model

FLAX_DN = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # what nn.Conv passes
CASES = [  # (H, W, c_in, c_out, kernel, stride, expected fast path)
    (8, 8, 4, 6, 3, 2, "strided3x3"),
    (6, 10, 3, 5, 3, 2, "strided3x3"),
    (8, 8, 4, 6, 1, 2, "pointwise"),
    (8, 8, 4, 6, 1, 1, "pointwise"),
    (8, 8, 4, 6, 3, 1, None),
    (7, 7, 4, 6, 3, 2, None),  # odd size: no parity phases of equal shape
]


def _ref(x, w, stride, pad):
    return lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _ours(x, w, stride, pad):
    return conv_lib.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                         dimension_numbers=FLAX_DN)


@pytest.mark.parametrize("h,w_,cin,cout,k,stride,case", CASES)
def test_values_and_derivatives_match_lax(h, w_, cin, cout, k, stride, case):
    pad = k // 2
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (2, h, w_, cin))
    w = jax.random.normal(keys[1], (k, k, cin, cout))
    assert conv_lib._fast_case(x, w, (stride, stride), ((pad, pad), (pad, pad)), None, None, FLAX_DN, 1) == case
    want = _ref(x, w, stride, pad)
    got = jax.jit(lambda x, w: _ours(x, w, stride, pad))(x, w)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    dy = jax.random.normal(keys[2], want.shape)
    want_g = jax.vjp(lambda x, w: _ref(x, w, stride, pad), x, w)[1](dy)
    got_g = jax.jit(lambda x, w, dy: jax.vjp(lambda x, w: _ours(x, w, stride, pad), x, w)[1](dy))(x, w, dy)
    for g, r in zip(got_g, want_g):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4)
    tangents = (jax.random.normal(keys[3], x.shape), jax.random.normal(keys[4], w.shape))
    want_t = jax.jvp(lambda x, w: _ref(x, w, stride, pad), (x, w), tangents)[1]
    got_t = jax.jit(lambda x, w: jax.jvp(lambda x, w: _ours(x, w, stride, pad), (x, w), tangents)[1])(x, w)
    np.testing.assert_allclose(got_t, want_t, rtol=1e-5, atol=1e-4)


def test_strided_input_gradient_has_no_dilated_convolution_on_cpu():
    """The input gradient of the strided 3x3 conv runs as stride-1 convolutions (no
    ``lhs_dilate``), where lax's own rule convolves a zero-dilated input."""
    if jax.default_backend() != "cpu":
        pytest.skip("the polyphase form is the CPU path")
    x = jnp.ones((2, 8, 8, 4))
    w = jnp.ones((3, 3, 4, 6))

    def hlo(conv):
        f = jax.jit(lambda x, w: jax.grad(lambda x: jnp.sum(conv(x, w, 2, 1) ** 2))(x))
        return f.lower(x, w).compile().as_text()

    assert "lhs_dilate" in hlo(_ref)
    assert "lhs_dilate" not in hlo(_ours)


def test_model_matches_a_plain_lax_model(monkeypatch):
    """resnet8x4 (strided 3x3 and 1x1 shortcuts) with the CPU formulations against the same
    parameters run through plain lax convolutions: logits and parameter gradients."""
    model = create_model("resnet8x4", 10)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x[:1])

    def loss(params):
        logits, _, _ = model.apply({**variables, "params": params}, x, train=True)
        return jnp.sum(logits ** 2), logits

    (_, ours), g_ours = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    monkeypatch.setattr(conv_lib, "_fast_case", lambda *a, **k: None)  # everything through lax
    (_, plain), g_plain = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    np.testing.assert_allclose(ours, plain, rtol=1e-4, atol=1e-4)
    flat_o, flat_p = jax.tree.leaves(g_ours), jax.tree.leaves(g_plain)
    assert len(flat_o) == len(flat_p)
    for a, b in zip(flat_o, flat_p):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3 * float(jnp.max(jnp.abs(b))))
