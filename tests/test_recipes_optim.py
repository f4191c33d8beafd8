"""Weight schedules, the CIFAR step schedule, recipe construction errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd.train import optim, recipes


def test_weight_schedules():
    const = recipes.make_weight_schedule(0.9)
    assert float(const(jnp.int32(123))) == pytest.approx(0.9)
    lin = recipes.make_weight_schedule({"type": "linear", "init": 1.0, "end": 0.0, "steps": 100})
    assert [float(lin(s)) for s in (0, 50, 100, 200)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    cos = recipes.make_weight_schedule({"type": "cosine", "init": 2.0, "end": 0.0, "steps": 10})
    assert float(cos(5)) == pytest.approx(1.0, abs=1e-6)  # 2 * (1 + cos(pi/2)) / 2
    pw = recipes.make_weight_schedule({"type": "piecewise", "init": 1.0, "boundaries": [10], "scales": [0.1],
                                      "unit": "steps"})
    assert float(pw(9)) == pytest.approx(1.0) and float(pw(11)) == pytest.approx(0.1)
    by_progress = recipes.make_weight_schedule({"type": "linear", "init": 4.0, "end": 1.0})
    assert [float(by_progress(0, p)) for p in (0.0, 0.5, 1.0)] == pytest.approx([4.0, 2.5, 1.0])
    with pytest.raises(ValueError, match="progress"):
        by_progress(3)
    pw_frac = recipes.make_weight_schedule({"type": "piecewise", "init": 2.0, "boundaries": [0.5, 0.75],
                                            "scales": [0.5, 0.1]})
    assert [float(pw_frac(0, p)) for p in (0.4, 0.5, 0.8)] == pytest.approx([2.0, 1.0, 0.1])
    with pytest.raises(ValueError, match="unknown weight schedule"):
        recipes.make_weight_schedule({"type": "exp"})


def test_kd_recipe_uses_scheduled_alpha():
    r = recipes.hinton_kd_recipe(temperature=2.0, alpha={"type": "linear", "init": 1.0, "end": 0.0, "steps": 10},
                                 gamma=0.0)
    s = jnp.array([[0.0, 1.0], [2.0, 0.0]])
    t = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    inp = dict(student_logits=s, student_features={}, teacher_logits=t, teacher_features={},
               labels=jnp.array([0, 1]), aux_params={}, rng=None)
    full, parts = r.loss(recipes.LossInputs(step=jnp.int32(0), stage_step=jnp.int32(0), **inp))
    half, _ = r.loss(recipes.LossInputs(step=jnp.int32(5), stage_step=jnp.int32(5), **inp))
    np.testing.assert_allclose(np.asarray(full), np.asarray(parts["kd"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(half), 0.5 * np.asarray(parts["kd"]), rtol=1e-6)


def test_cifar_step_schedule():
    opt = {"name": "sgd", "lr": 0.05, "schedule": "step", "milestones": (150, 180, 210), "decay": 0.1}
    _, sched = optim.make_optimizer(opt, steps_per_epoch=10, num_epochs=240)
    lrs = {e: float(sched(e * 10)) for e in (0, 149, 150, 179, 180, 210, 239)}
    assert lrs[0] == pytest.approx(0.05) and lrs[149] == pytest.approx(0.05)
    assert lrs[150] == pytest.approx(0.005) and lrs[179] == pytest.approx(0.005)
    assert lrs[180] == pytest.approx(0.0005) and lrs[210] == pytest.approx(0.00005)


def test_sgd_weight_decay_is_pytorch_style():
    # one step from p with grad g: momentum buffer = g + wd*p, p' = p - lr*(g + wd*p)
    opt = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "schedule": "constant"}
    tx, _ = optim.make_optimizer(opt, 1, 1)
    p, g = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.5])
    st = tx.init(p)
    u, st = tx.update(g, st, p)
    np.testing.assert_allclose(np.asarray(p + u), np.asarray(p - 0.1 * (g + 0.01 * p)), rtol=1e-6)
    u2, _ = tx.update(g, st, p + u)
    p1 = p + u
    buf = 0.9 * (g + 0.01 * p) + (g + 0.01 * p1)
    np.testing.assert_allclose(np.asarray(p1 + u2), np.asarray(p1 - 0.1 * buf), rtol=1e-6)


def test_build_recipe_errors():
    with pytest.raises(ValueError, match="unknown method 'hinton'; did you mean 'hinton_kd'"):
        recipes.build_recipe({"name": "hinton"})
    with pytest.raises(ValueError, match="has no option 'temprature'; did you mean 'temperature'"):
        recipes.build_recipe({"name": "hinton_kd", "temprature": 3})
    with pytest.raises(ValueError, match="unknown hinton_kd mode"):
        recipes.build_recipe({"name": "hinton_kd", "mode": "batchmean"})
    assert recipes.build_recipe({"name": "hinton_kd", "temperature": 3.0}).uses_teacher
    assert not recipes.build_recipe({"name": "ce"}).uses_teacher
