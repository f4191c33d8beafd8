"""NNX parity: a Linen model and the same model written in Flax NNX, given the same weights, give the
same KD train step (loss, parts, updated params and BatchNorm statistics) to float32 round-off.

Both go through jaxkd's own path: ``from_linen`` / ``from_nnx``, ``create_train_state``,
``make_train_step`` with a frozen teacher, for Hinton KD (logits) and attention transfer (taps the
models sow: Linen ``self.sow("intermediates", ...)``, NNX ``self.sow(nnx.Intermediate, ...)``).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxkd.core import build_recipe
from jaxkd.models import create_model, from_linen, from_nnx
from jaxkd.train import step as step_lib


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3), use_bias=False, name="conv1")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn1")(x))
        self.sow("intermediates", "block1", x)
        x = nn.relu(nn.Conv(16, (3, 3), strides=2, name="conv2")(x))
        self.sow("intermediates", "block2", x)
        pooled = x.mean((1, 2))
        return nn.Dense(10, name="head")(pooled), {"embedding": pooled}


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 8, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs)
        self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        self.sow(nnx.Intermediate, "block1", x)
        x = nnx.relu(self.conv2(x))
        self.sow(nnx.Intermediate, "block2", x)
        pooled = x.mean((1, 2))
        return self.head(pooled), {"embedding": pooled}


METHODS = {
    "hinton_kd": {"name": "hinton_kd", "temperature": 4.0, "alpha": 0.9, "gamma": 0.1},
    "at": {"name": "at", "student_layers": ("block1", "block2"), "teacher_layers": ("stage1", "stage2"),
           "alpha": 0.5, "gamma": 0.5},
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_linen_and_nnx_give_the_same_kd_steps(method):
    sample = jnp.zeros((1, 8, 8, 1))
    linen = from_linen(LinenNet(), "linen_net")
    nnx_fns, nnx_vars = from_nnx(NnxNet(nnx.Rngs(0)), "nnx_net")
    teacher = create_model("cnn", 10, width=4, hidden=8)
    t_vars = jax.jit(teacher.init)(jax.random.key(1), sample)
    recipe = build_recipe(dict(METHODS[method]))
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
    pipeline = step_lib.InputPipeline(mean=(0.5,), std=(0.25,))

    s_linen = step_lib.create_train_state(jax.random.key(0), linen, recipe, tx, sample)
    s_nnx = step_lib.create_train_state(jax.random.key(0), nnx_fns, recipe, tx, sample)
    # the NNX model gets the Linen model's weights: same names, same layouts (HWIO kernels, [in, out])
    lp, ls = s_linen.params["student"], s_linen.model_state["student"]
    assert jax.tree.structure(lp) == jax.tree.structure(nnx_vars["params"])
    params = {**s_nnx.params, "student": lp}
    model_state = {**s_nnx.model_state, "student": {"model_state": ls["batch_stats"]}}
    s_nnx = s_nnx.replace(params=params, model_state=model_state, opt_state=tx.init(params), rng=s_linen.rng)

    step_l = step_lib.make_train_step(linen, recipe, tx, pipeline, teacher=teacher, donate=False)
    step_n = step_lib.make_train_step(nnx_fns, recipe, tx, pipeline, teacher=teacher, donate=False)
    rng = np.random.default_rng(0)
    for _ in range(3):
        batch = {"image": jnp.asarray(rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)),
                 "label": jnp.asarray(rng.integers(0, 10, 16).astype(np.int32))}
        s_linen, m_l = step_l(s_linen, t_vars, batch)
        s_nnx, m_n = step_n(s_nnx, t_vars, batch)
        assert set(m_l) == set(m_n)
        for k in m_l:
            np.testing.assert_allclose(np.asarray(m_n[k]), np.asarray(m_l[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    if method == "at":
        assert float(m_l["at"]) > 0  # the sown taps were found and compared on both sides
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 s_nnx.params["student"], s_linen.params["student"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 s_nnx.model_state["student"]["model_state"], s_linen.model_state["student"]["batch_stats"])
    # and the weights really moved: the parity is not that of an idle step
    assert not np.allclose(s_linen.params["student"]["head"]["kernel"], lp["head"]["kernel"])
