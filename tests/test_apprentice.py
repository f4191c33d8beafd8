"""Apprentice: the loss against numpy, which params train, two optimizers, exact resume."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax import checkpoint as ocp

from jaxkd import config as config_lib
from jaxkd import models
from jaxkd.experiment import teacher_config
from jaxkd.methods.apprentice import apprentice_kd, apprentice_loss, apprentice_recipe
from jaxkd.train import checkpoint as ckpt_lib
from jaxkd.train import param_groups, step as step_lib
from jaxkd.train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_loss_matches_numpy():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(5, 7)).astype(np.float32), 3 * rng.normal(size=(5, 7)).astype(np.float32)
    y = rng.integers(0, 7, 5)
    for wt, ws, wkd, temp in ((1.0, 0.5, 0.5, 1.0), (0.3, 1.0, 2.0, 4.0)):
        total, parts = apprentice_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), wt, ws, wkd, temp)
        ls, lt = _np_log_softmax(s), _np_log_softmax(t)
        h_t = -lt[np.arange(5), y]
        h_s = -ls[np.arange(5), y]
        p_t = np.exp(_np_log_softmax(t / temp))
        kd = -(p_t * _np_log_softmax(s / temp)).sum(-1) * temp ** 2
        np.testing.assert_allclose(parts["teacher_ce"], h_t, rtol=1e-5)
        np.testing.assert_allclose(parts["ce"], h_s, rtol=1e-5)
        np.testing.assert_allclose(parts["kd"], kd, rtol=1e-5)
        np.testing.assert_allclose(total, wt * h_t + ws * h_s + wkd * kd, rtol=1e-5)


def test_kd_gradient_reaches_teacher_only_when_asked():
    s, t = jnp.array([[1.0, 0.0, -1.0]]), jnp.array([[0.0, 2.0, 0.5]])
    g_off = jax.grad(lambda t: apprentice_kd(s, t, 1.0, teacher_grad=False).sum())(t)
    g_on = jax.grad(lambda t: apprentice_kd(s, t, 1.0, teacher_grad=True).sum())(t)
    assert np.all(np.asarray(g_off) == 0) and np.any(np.asarray(g_on) != 0)


def _batches(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"image": rng.integers(0, 17, (16, 8, 8, 1)).astype(np.uint8),
             "label": rng.integers(0, 10, 16).astype(np.int32)} for _ in range(n)]


def _run_steps(recipe, n=2, quant=None):
    student = models.create_model("mlp", 10, hidden=(16,), **({"quant": quant} if quant else {}))
    teacher = models.create_model("cnn", 10, width=4, hidden=16)
    sample = jnp.zeros((1, 8, 8, 1))
    t_vars = teacher.init(jax.random.PRNGKey(3), sample)
    tx, sched = param_groups.make_optimizer({"name": "sgd", "lr": 0.1, "momentum": 0.9}, recipe.aux_optim, 10, 1)
    state = step_lib.create_train_state(jax.random.PRNGKey(0), student, recipe, tx, sample,
                                        trainable_teacher_variables=t_vars)
    init = jax.tree.map(np.asarray, state)
    step = step_lib.make_train_step(student, recipe, tx, step_lib.InputPipeline((8.0,), (4.0,)), teacher=teacher,
                                    lr_schedule=sched, steps_per_epoch=10, num_epochs=1, donate=False)
    for batch in _batches(n):
        state, metrics = step(state, None, batch)
    return init, jax.tree.map(np.asarray, state), metrics


def test_teacher_trains_jointly_and_stays_frozen_when_asked():
    init, state, metrics = _run_steps(apprentice_recipe(), quant={"weight_bits": 4, "act_bits": 4})
    assert {"teacher_ce", "ce", "kd", "teacher_accuracy"} <= set(metrics)
    for who in ("student", "aux"):
        changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), init.params[who], state.params[who])
        assert all(jax.tree.leaves(changed)), f"every {who} param should train"
    assert not np.array_equal(init.model_state["aux"]["batch_stats"]["teacher"]["bn1"]["mean"],
                              state.model_state["aux"]["batch_stats"]["teacher"]["bn1"]["mean"])
    # two optimizers, each with its own state
    assert set(state.opt_state.inner_states) == {"student", "aux"}

    init, state, _ = _run_steps(apprentice_recipe(train_teacher=False))
    jax.tree.map(np.testing.assert_array_equal, init.params["aux"], state.params["aux"])
    jax.tree.map(np.testing.assert_array_equal, init.model_state["aux"], state.model_state["aux"])
    assert not np.array_equal(init.params["student"]["fc"]["kernel"], state.params["student"]["fc"]["kernel"])


def test_single_optimizer_without_aux_optim_is_the_stages_sgd():
    """Without ``aux_optim`` the stage's one SGD updates student and auxiliary params alike, by the
    hand-written PyTorch rule: buffer = momentum * buffer + (g + wd * p), p -= lr * buffer."""
    lr, mom, wd = 0.1, 0.9, 5e-4
    tx, _ = param_groups.make_optimizer({"name": "sgd", "lr": lr, "momentum": mom, "weight_decay": wd,
                                         "schedule": "constant"}, None, 10, 2)
    p = {"student": {"w": np.array([1.0, -2.0, 0.5])}, "aux": {"head": np.array([0.25, 3.0])}}
    grads = [{"student": {"w": np.array([0.5, 0.5, -1.0])}, "aux": {"head": np.array([1.0, -0.5])}},
             {"student": {"w": np.array([-0.2, 0.1, 0.3])}, "aux": {"head": np.array([0.0, 2.0])}}]
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)
    state = tx.init(params)
    want, buf = jax.tree.map(np.float64, p), None
    for g in grads:
        u, state = tx.update(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), g), state, params)
        params = jax.tree.map(lambda a, b: a + b, params, u)
        d = jax.tree.map(lambda gi, pi: gi + wd * pi, g, want)
        buf = d if buf is None else jax.tree.map(lambda b, di: mom * b + di, buf, d)
        want = jax.tree.map(lambda pi, b: pi - lr * b, want, buf)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6), params, want)


def _config(**over):
    c = config_lib.load_config(os.path.join(ROOT, "experiments/configs/digits.py"))
    c.train.num_epochs = 1
    c.train.progress = c.train.tensorboard = False
    c.train.checkpoint_every_steps = 2
    c.data.num_train_examples = 384  # 6 steps an epoch
    c.teacher.kwargs = {"width": 8, "hidden": 32}
    c.model.kwargs = {"hidden": (32,)}
    c.method = {"name": "apprentice", "teacher_optim": {"lr": 0.02}}
    return config_lib.apply_overrides(c, [f"{k}={v!r}" for k, v in over.items()])


def _state(workdir):
    mgr = ckpt_lib.run_manager(workdir)
    r = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return jax.tree.map(np.asarray, r.state)


def test_exact_resume_with_two_optimizers(tmp_path, data_dir):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    full = train_and_evaluate(_config(), a)
    train_and_evaluate(_config(), b, stop_after_steps=2)
    resumed = train_and_evaluate(_config(), b)
    sa, sb = _state(a), _state(b)
    jax.tree.map(np.testing.assert_array_equal, sa, sb)
    assert set(sa["opt_state"]["inner_states"]) == {"student", "aux"}  # both optimizers' states saved
    assert "teacher" in sa["params"]["aux"] and "teacher" in sa["model_state"]["aux"]["batch_stats"]
    assert full["last_accuracy"] == resumed["last_accuracy"]
    # the exported student holds no teacher; the joint teacher has its own best checkpoint
    teacher = models.create_model("cnn", 10, width=8, hidden=32)
    t_vars, meta = ckpt_lib.load_model_variables(os.path.join(a, "joint_teacher"),
                                                 teacher.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1))))
    assert meta["accuracy"] == pytest.approx(full["teacher_accuracy"])
    student = models.create_model("mlp", 10, hidden=(32,))
    ckpt_lib.load_model_variables(a, student.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1))), what="student")


def test_joint_teacher_is_picked_on_the_validation_set(tmp_path, data_dir):
    import json
    wd = str(tmp_path / "run")
    summary = train_and_evaluate(_config(**{"data.val_fraction": 0.2, "train.num_epochs": 2}), wd)
    history = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    t_val = [r["val/teacher_accuracy"] for r in history]
    best = max(range(len(history)), key=lambda i: (t_val[i], -history[i]["val/teacher_loss"], -i))
    joint = json.load(open(os.path.join(wd, "joint_teacher", "summary.json")))
    assert joint["selected_on"] == "val" and joint["best_val_accuracy"] == t_val[best]
    assert joint["best_epoch"] == history[best]["epoch"]
    assert joint["best_accuracy"] == history[best]["eval/teacher_accuracy"] == summary["teacher_accuracy"]
    teacher = models.create_model("cnn", 10, width=8, hidden=32)
    _, meta = ckpt_lib.load_model_variables(os.path.join(wd, "joint_teacher"),
                                            teacher.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1))))
    assert meta["epoch"] == joint["best_epoch"] and meta["val_accuracy"] == t_val[best]


@pytest.mark.slow
def test_pretrained_teacher_from_workdir(tmp_path, data_dir):
    tw = str(tmp_path / "teacher")
    train_and_evaluate(teacher_config(_config(method={"name": "ce"})), tw)
    teacher = models.create_model("cnn", 10, width=8, hidden=32)
    loaded, _ = ckpt_lib.load_model_variables(tw, teacher.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1))))
    wd = str(tmp_path / "app")
    train_and_evaluate(_config(**{"teacher.workdir": tw,
                                  "method": {"name": "apprentice", "train_teacher": False}}), wd)
    state = _state(wd)
    jax.tree.map(np.testing.assert_array_equal, loaded["params"], state["params"]["aux"]["teacher"])
