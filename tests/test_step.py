"""The generic train step: exact update against a numpy derivation, frozen teacher."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxkd import models
from jaxkd.train import InputPipeline, create_train_state, make_train_step, recipes


class Linear(nn.Module):
    num_classes: int = 5

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        logits = nn.Dense(self.num_classes, use_bias=False)(x)
        return logits, {"embedding": x, "logits": logits}


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def test_kd_step_matches_numpy_update():
    """One SGD step of gamma*CE + alpha*KD on a linear student equals the hand-derived update."""
    B, D, C, T, alpha, gamma, lr = 8, 6, 5, 3.0, 0.7, 0.4, 0.1
    student = models.from_linen(Linear(C), "linear")
    teacher = models.from_linen(Linear(C), "linear_teacher")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, D, 1)).astype(np.float32)
    y = rng.integers(0, C, size=B).astype(np.int32)
    recipe = recipes.hinton_kd_recipe(temperature=T, alpha=alpha, gamma=gamma)
    tx = optax.sgd(lr)
    pipeline = InputPipeline(mean=(0.0,), std=(1.0,))
    t_vars = teacher.init(jax.random.PRNGKey(1), jnp.zeros((1, D, 1)))
    state = create_train_state(jax.random.PRNGKey(0), student, recipe, tx, jnp.zeros((1, D, 1)))
    w0 = np.asarray(state.params["student"]["Dense_0"]["kernel"]).copy()
    wt = np.asarray(t_vars["params"]["Dense_0"]["kernel"])
    step = make_train_step(student, recipe, tx, pipeline, teacher=teacher, donate=False)
    new_state, metrics = step(state, t_vars, {"image": jnp.asarray(x), "label": jnp.asarray(y)})

    xf = x.reshape(B, D).astype(np.float64)
    s, t = xf @ w0, xf @ wt
    onehot = np.eye(C)[y]
    dlogits = gamma * (_softmax(s) - onehot) / B + alpha * T * (_softmax(s / T) - _softmax(t / T)) / B
    expected = w0 - lr * xf.T @ dlogits
    np.testing.assert_allclose(np.asarray(new_state.params["student"]["Dense_0"]["kernel"]), expected,
                               rtol=1e-5, atol=1e-6)
    ce = -np.log(_softmax(s)[np.arange(B), y]).mean()
    p_t = _softmax(t / T)
    kd = (p_t * (np.log(p_t) - np.log(_softmax(s / T)))).sum(-1).mean() * T * T
    np.testing.assert_allclose(float(metrics["loss"]), gamma * ce + alpha * kd, rtol=1e-5)
    assert int(new_state.step) == 1


def test_teacher_frozen_student_trained():
    student = models.create_model("mlp", 10)
    teacher = models.create_model("cnn", 10)
    sample = jnp.zeros((1, 8, 8, 1))
    t_vars = teacher.init(jax.random.PRNGKey(1), sample)
    t_before = jax.tree.map(np.array, t_vars)
    recipe = recipes.hinton_kd_recipe()
    tx = optax.sgd(0.1, momentum=0.9)
    state = create_train_state(jax.random.PRNGKey(0), student, recipe, tx, sample)
    s_before = jax.tree.map(np.array, state.params)
    step = make_train_step(student, recipe, tx, InputPipeline(mean=(0.5,), std=(0.25,), pad=1, flip=True),
                           teacher=teacher)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 255, (16, 8, 8, 1), dtype=np.uint8)),
             "label": jnp.asarray(rng.integers(0, 10, 16, dtype=np.int32))}
    for _ in range(3):
        state, _ = step(state, t_vars, batch)
    jax.tree.map(np.testing.assert_array_equal, t_before, jax.tree.map(np.array, t_vars))
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)),
                                           s_before, state.params))
    assert all(changed), "every student param should move in a KD step"
    # the teacher's params are not in the train state at all
    assert set(state.params) == {"student", "aux"}


def test_stage_clock_in_loss_inputs():
    """Recipes see the stage step, epoch, stage length and progress the loop gives the step."""
    seen = {}

    def loss(inp):
        z = jnp.zeros(inp.labels.shape[0])
        seen["num_epochs"] = inp.num_epochs
        return z, {"stage_step": z + inp.stage_step, "epoch": z + inp.epoch, "progress": z + inp.stage_progress}

    recipe = recipes.Recipe(name="clock", loss=loss)
    student = models.from_linen(Linear(3), "linear")
    tx = optax.sgd(0.1)
    state = create_train_state(jax.random.PRNGKey(0), student, recipe, tx, jnp.zeros((1, 2, 1)))
    state = state.replace(step=jnp.int32(17))
    step = make_train_step(student, recipe, tx, InputPipeline((0.0,), (1.0,)), steps_per_epoch=4, stage_start=5,
                           num_epochs=6, donate=False)
    _, m = step(state, None, {"image": jnp.ones((2, 2, 1)), "label": jnp.zeros((2,), jnp.int32)})
    assert seen["num_epochs"] == 6
    assert float(m["stage_step"]) == 12 and float(m["epoch"]) == 3
    assert float(m["progress"]) == pytest.approx(12 / 24)
