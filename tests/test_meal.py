"""MEAL V2: the loss against numpy, the adversarial split of gradients, the discriminator's own
optimizer and params, and ``config.model.init_from``."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from orbax import checkpoint as ocp

from jaxkd import config as config_lib
from jaxkd.core import LossInputs
from jaxkd.experiment import teacher_config
from jaxkd.methods.meal import OutputDiscriminator
from jaxkd.train import checkpoint as ckpt_lib
from jaxkd.train.loop import train_and_evaluate
from jaxkd.train.recipes import build_recipe

from _configs import tiny_digits_config



def _np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_mlp(params, x):
    for i in range(3):
        layer = params[f"Dense_{i}"]
        x = x @ np.asarray(layer["kernel"]) + np.asarray(layer["bias"])
        if i < 2:
            x = np.where(x > 0, x, 0.2 * x)
    return x[..., 0]


def _np_bce(logit, target):
    p = 1 / (1 + np.exp(-logit))
    return -(target * np.log(p) + (1 - target) * np.log(1 - p))


def _setup(adv_weight=0.5):
    rng = np.random.default_rng(0)
    s = rng.normal(size=(6, 5)).astype(np.float32)
    t = 2 * rng.normal(size=(3, 6, 5)).astype(np.float32)
    recipe = build_recipe({"name": "meal_v2", "mode": "gan", "adv_weight": adv_weight, "disc_hidden": (8, 8)})
    aux = recipe.init_aux(jax.random.PRNGKey(1), {"logits": jnp.asarray(s)}, None)
    return s, t, recipe, aux["params"]


def _inputs(s, t, aux_params):
    return LossInputs(student_logits=jnp.asarray(s), student_features={}, teacher_logits=jnp.asarray(t),
                      teacher_features={}, labels=jnp.zeros(6, jnp.int32), step=jnp.zeros((), jnp.int32),
                      aux_params=aux_params, rng=jax.random.PRNGKey(0))


def test_meal_v2_loss_matches_numpy():
    s, t, recipe, aux = _setup(adv_weight=0.5)
    total, parts = recipe.loss(_inputs(s, t, aux))
    pbar, q = _np_softmax(t).mean(0), _np_softmax(s)
    d = jax.tree.map(np.asarray, aux["discriminator"])
    kd = -np.sum(pbar * np.log(q), -1)
    disc = _np_bce(_np_mlp(d, pbar), 1.0) + _np_bce(_np_mlp(d, q), 0.0)
    adv = _np_bce(_np_mlp(d, q), 1.0)
    np.testing.assert_allclose(parts["kd"], kd, rtol=1e-5)
    np.testing.assert_allclose(parts["disc"], disc, rtol=1e-5)
    np.testing.assert_allclose(parts["adv"], adv, rtol=1e-5)
    np.testing.assert_allclose(total, kd + 0.5 * adv + disc, rtol=1e-5)
    assert total.shape == (6,) and "ce" not in parts  # soft labels only


def _np_student_objective(s, t, d, adv_weight):
    """What the student minimises, written out in numpy: mean(kd + adv_weight * BCE(D(q), 1))."""
    pbar, q = _np_softmax(t).mean(0), _np_softmax(s)
    kd = -np.sum(pbar * np.log(q), -1)
    return np.mean(kd + adv_weight * _np_bce(_np_mlp(d, q), 1.0))


def _np_disc_objective(s, t, d):
    """What the discriminator minimises: mean(BCE(D(pbar), 1) + BCE(D(q), 0))."""
    pbar, q = _np_softmax(t).mean(0), _np_softmax(s)
    return np.mean(_np_bce(_np_mlp(d, pbar), 1.0) + _np_bce(_np_mlp(d, q), 0.0))


def _central_difference(f, x, h=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        g[i] = (f(x + e) - f(x - e)) / (2 * h)
    return g


def test_each_player_gets_only_its_own_objective():
    """The one gradient of the summed loss gives the student d(kd + w*adv)/ds and the
    discriminator d(disc)/dD, each checked against central differences of the numpy formulas."""
    s, t, recipe, aux = _setup(adv_weight=0.5)

    def total(student_logits, aux_params):
        return jnp.mean(recipe.loss(_inputs(student_logits, t, aux_params))[0])

    g_s, g_d = jax.grad(total, argnums=(0, 1))(jnp.asarray(s), aux)
    s64, t64 = s.astype(np.float64), t.astype(np.float64)
    d64 = jax.tree.map(lambda a: np.asarray(a, np.float64), aux["discriminator"])
    want_s = _central_difference(lambda z: _np_student_objective(z, t64, d64, 0.5), s64)
    np.testing.assert_allclose(g_s, want_s, rtol=2e-3, atol=1e-6)
    # the adversarial term reaches the student: its gradient is not the soft-label term's alone
    kd_only = _central_difference(lambda z: _np_student_objective(z, t64, d64, 0.0), s64)
    assert np.max(np.abs(want_s - kd_only)) > 1e-3
    assert np.max(np.abs(np.asarray(g_s) - kd_only)) > 1e-3
    # the discriminator: only BCE(D(teacher), 1) + BCE(D(student), 0), leaf by leaf
    for layer in d64:
        for name in d64[layer]:
            def f(v, layer=layer, name=name):
                return _np_disc_objective(s64, t64, {**d64, layer: {**d64[layer], name: v}})
            want = _central_difference(f, d64[layer][name])
            got = np.asarray(g_d["discriminator"][layer][name])
            np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-6, err_msg=f"{layer}/{name}")
            assert np.any(np.abs(got) > 1e-6), f"{layer}/{name} gets no gradient"


def test_bad_options():
    for opts, match in (({"adv_weight": -1.0}, "adv_weight"), ({"disc_lr": 0.0, "mode": "gan"}, "disc_lr"),
                        ({"disc_optimizer": "rmsprop", "mode": "gan"}, "disc_optimizer"),
                        ({"disc_hidden": (8,)}, "disc_hidden"), ({"mode": "paper"}, "mode"),
                        ({"disc_lr": 1e-3}, "belong to mode='gan'")):
        with pytest.raises(config_lib.ConfigError, match=match):
            build_recipe({"name": "meal_v2", **opts})
    assert OutputDiscriminator((4, 4)).init(jax.random.PRNGKey(0), jnp.zeros((2, 3)))["params"].keys() == {
        "Dense_0", "Dense_1", "Dense_2"}


# ---- through the loop: tiny teacher and baseline student, one epoch each ----

_config = tiny_digits_config


@pytest.fixture(scope="module")
def student(tmp_path_factory, data_dir):
    """A baseline mlp student, one epoch on 128 images."""
    wd = str(tmp_path_factory.mktemp("student"))
    train_and_evaluate(_config(method={"name": "ce"}), wd)
    return wd


def test_meal_v2_steps_train_the_discriminator_with_its_own_optimizer():
    from jaxkd.models import create_model
    from jaxkd.models.ensemble import stack_variables, stacked_ensemble
    from jaxkd.train import param_groups
    from jaxkd.train import step as step_lib

    cnn, student = create_model("cnn", 10, width=4, hidden=8), create_model("mlp", 10, hidden=(8,))
    x = jnp.zeros((1, 8, 8, 1))
    init = jax.jit(cnn.init)
    t_vars = stack_variables([init(jax.random.PRNGKey(i), x) for i in range(2)])
    before = jax.tree.map(np.array, t_vars)
    ens = stacked_ensemble(cnn, 2)
    recipe = build_recipe({"name": "meal_v2", "mode": "gan", "disc_lr": 1e-3})
    tx, _ = param_groups.make_optimizer({"name": "sgd", "lr": 0.1, "momentum": 0.9}, recipe.aux_optim, 10, 1)
    state = step_lib.create_train_state(jax.random.PRNGKey(0), student, recipe, tx, x, teacher=ens,
                                        teacher_variables=t_vars)
    d0 = jax.tree.map(np.array, state.params["aux"]["discriminator"])
    step = step_lib.make_train_step(student, recipe, tx, step_lib.InputPipeline((0.0,), (1.0,)), teacher=ens)
    batch = {"image": jax.random.uniform(jax.random.PRNGKey(2), (16, 8, 8, 1)), "label": jnp.arange(16) % 10}
    for _ in range(2):
        state, metrics = step(state, t_vars, batch)
    assert {"kd", "adv", "disc"} <= set(metrics) and "ce" not in metrics
    d1 = state.params["aux"]["discriminator"]
    assert not np.array_equal(d0["Dense_0"]["kernel"], np.asarray(d1["Dense_0"]["kernel"]))
    # Adam moments for the discriminator (its own optimizer), teachers untouched
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]]
    assert any("discriminator" in p and "mu" in p for p in paths)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, t_vars), before)


def _state(workdir, step=None):
    mgr = ckpt_lib.run_manager(workdir)
    r = mgr.restore(step if step is not None else mgr.latest_step(),
                    args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return jax.tree.map(np.asarray, r.state)


@pytest.mark.slow
def test_meal_v2_run_from_pretrained_student(tmp_path, student):
    teacher = str(tmp_path / "teacher")
    tc = teacher_config(_config())
    tc.data.num_train_examples = 128
    train_and_evaluate(tc, teacher)
    wd = str(tmp_path / "meal")
    cfg = _config(**{"teacher.workdir": [teacher, teacher], "method": {"name": "meal_v2", "mode": "gan", "disc_lr": 1e-3},
                     "model.init_from": student, "train.checkpoint_every_steps": 1})
    train_and_evaluate(cfg, wd, stop_after_steps=1)
    first = _state(wd)
    train_and_evaluate(cfg, wd)
    last = _state(wd)
    # the discriminator is checkpointed with the run and trains
    d0, d1 = first["params"]["aux"]["discriminator"], last["params"]["aux"]["discriminator"]
    assert not np.array_equal(d0["Dense_0"]["kernel"], d1["Dense_0"]["kernel"])
    # ... with its own optimizer: Adam's moments for the aux group, SGD momentum for the student
    leaves = [p for p, _ in jax.tree_util.tree_flatten_with_path(last["opt_state"])[0]]
    assert any("discriminator" in jax.tree_util.keystr(p) and "mu" in jax.tree_util.keystr(p) for p in leaves)
    # init_from: one SGD step away from the pretrained student, not from a random init
    pre = ckpt_lib.load_model_variables(student, {"params": first["params"]["student"]}, what="student")[0]
    diff = max(float(np.max(np.abs(a - b))) for a, b in
               zip(jax.tree.leaves(pre["params"]), jax.tree.leaves(first["params"]["student"])))
    assert diff < 0.05
    hist = [json.loads(ln) for ln in open(os.path.join(wd, "metrics.jsonl"))]
    assert {"train/kd", "train/adv", "train/disc"} <= set(hist[-1]) and "train/ce" not in hist[-1]


def test_init_from_loads_exact_params_and_errors(tmp_path, student):
    from jaxkd.train import setup as setup_lib
    from jaxkd.models import create_model
    from jaxkd.train import step as step_lib
    import optax

    model = create_model("mlp", 10, hidden=(16,))
    state = step_lib.create_train_state(jax.random.PRNGKey(3), model, build_recipe({"name": "ce"}), optax.sgd(0.1),
                                        jnp.zeros((1, 8, 8, 1)))
    assert student.endswith("0")  # pytest's tmp dir "student0": "student{seed}" with seed 0
    cfg = _config(**{"model.init_from": student[:-1] + "{seed}", "seed": 0})
    loaded = setup_lib.init_student_from(cfg, state)
    # the saved best student, read straight from its Orbax folder (not through the loader under test)
    steps = [int(d) for d in os.listdir(os.path.join(student, "best")) if d.isdigit()]
    saved = ocp.StandardCheckpointer().restore(os.path.join(student, "best", str(max(steps)), "model"))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded.params["student"]),
                 jax.tree.map(np.asarray, saved["params"]))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded.model_state["student"]),
                 jax.tree.map(np.asarray, saved["model_state"]))
    assert setup_lib.init_student_from(_config(), state) is state  # unset: unchanged
    other = step_lib.create_train_state(jax.random.PRNGKey(3), create_model("mlp", 10, hidden=(8,)),
                                        build_recipe({"name": "ce"}), optax.sgd(0.1), jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(config_lib.ConfigError, match="init_from.*shape"):  # checkpoint of another width
        setup_lib.init_student_from(_config(**{"model.init_from": student}), other)
    with pytest.raises(config_lib.ConfigError, match="does not exist"):
        setup_lib.init_student_from(_config(**{"model.init_from": str(tmp_path / "nowhere")}), state)
    with pytest.raises(config_lib.ConfigError, match="model.init_from"):
        train_and_evaluate(_config(**{"model.init_from": 3}), str(tmp_path / "bad"))


# ---- mode="reference": the authors' train.py ----

def _np_ref_disc(params, x):
    for i in range(3):
        layer = params[f"Dense_{i}"]
        x = np.maximum(x @ np.asarray(layer["kernel"]) + np.asarray(layer["bias"]), 0.0)  # ReLU after every layer
    return x


def _np_ref_objective(s, t, d, adv_weight=1.0):
    """train.py's loss written out: soft CE to the teachers' mean softmax, plus
    BCEWithLogitsLoss(D(cat[s; mean_n t_n])) against cat[[1,0]*B; [0,1]*B], mean over all 4B outputs."""
    pbar = _np_softmax(t).mean(0)
    g = np.mean(-np.sum(pbar * np.log(_np_softmax(s)), -1))
    inputs = np.concatenate([_np_ref_disc(d, s), _np_ref_disc(d, t.mean(0))], 0)
    b = s.shape[0]
    targets = np.concatenate([np.tile([1.0, 0.0], (b, 1)), np.tile([0.0, 1.0], (b, 1))], 0)
    return g + adv_weight * np.mean(_np_bce(inputs, targets))


def _ref_setup(hidden=(8, 8)):
    rng = np.random.default_rng(5)
    s = rng.normal(size=(6, 5)).astype(np.float32)
    t = 2 * rng.normal(size=(3, 6, 5)).astype(np.float32)
    recipe = build_recipe({"name": "meal_v2", "mode": "reference", "disc_hidden": hidden})
    aux = recipe.init_aux(jax.random.PRNGKey(1), {"logits": jnp.asarray(s)}, None)["params"]
    # positive biases keep every ReLU unit alive, so the gradients checked below are not all 0
    aux = jax.tree.map(lambda a: a + 0.5 if a.ndim == 1 else a, aux)
    return s, t, recipe, aux


def test_meal_v2_reference_mode_is_the_default_and_matches_numpy():
    assert build_recipe({"name": "meal_v2"}).aux_optim == {"weight_decay": 0.0}  # the student's optimizer, no decay
    assert build_recipe({"name": "meal_v2", "mode": "gan"}).aux_optim["lr"] == 1e-4
    s, t, recipe, aux = _ref_setup()
    total, parts = recipe.loss(_inputs(s, t, aux))
    d = jax.tree.map(np.asarray, aux["discriminator"])
    assert set(d) == {"Dense_0", "Dense_1", "Dense_2"} and d["Dense_2"]["kernel"].shape == (8, 2)
    np.testing.assert_allclose(np.mean(total), _np_ref_objective(s, t, d), rtol=1e-5)
    np.testing.assert_allclose(np.mean(parts["disc"]), _np_ref_objective(s, t, d) - np.mean(parts["kd"]), rtol=1e-5)
    assert "adv" not in parts and "ce" not in parts
    # D sees logits, not probabilities: shifting the teachers' logits by a constant changes its loss
    _, shifted = recipe.loss(_inputs(s, t + 3.0, aux))
    np.testing.assert_allclose(shifted["kd"], parts["kd"], rtol=1e-5)
    assert not np.allclose(shifted["disc"], parts["disc"])


def test_meal_v2_reference_widths():
    from jaxkd.methods.meal import reference_disc_widths
    assert reference_disc_widths(1000) == (125, 15)  # the reference's 1000 -> 125 -> 15 -> 2
    assert reference_disc_widths(100) == (12, 4) and reference_disc_widths(10) == (4, 4)
    recipe = build_recipe({"name": "meal_v2"})
    params = recipe.init_aux(jax.random.PRNGKey(0), {"logits": jnp.zeros((1, 1000))}, None)["params"]
    shapes = [params["discriminator"][f"Dense_{i}"]["kernel"].shape for i in range(3)]
    assert shapes == [(1000, 125), (125, 15), (15, 2)]


def test_meal_v2_reference_both_players_descend_the_same_loss():
    """The student's gradient is d(kd + disc)/ds (no detach, no fooling term) and D's is d(disc)/dD,
    each against central differences of the numpy objective."""
    s, t, recipe, aux = _ref_setup()

    def total(student_logits, aux_params):
        return jnp.mean(recipe.loss(_inputs(student_logits, t, aux_params))[0])

    g_s, g_d = jax.grad(total, argnums=(0, 1))(jnp.asarray(s), aux)
    s64, t64 = s.astype(np.float64), t.astype(np.float64)
    d64 = jax.tree.map(lambda a: np.asarray(a, np.float64), aux["discriminator"])
    want_s = _central_difference(lambda z: _np_ref_objective(z, t64, d64), s64)
    np.testing.assert_allclose(g_s, want_s, rtol=2e-3, atol=1e-6)
    kd_only = _central_difference(lambda z: _np_ref_objective(z, t64, d64, adv_weight=0.0), s64)
    assert np.max(np.abs(np.asarray(g_s) - kd_only)) > 1e-4  # the D loss reaches the student
    for layer in d64:
        for name in d64[layer]:
            def f(v, layer=layer, name=name):
                return _np_ref_objective(s64, t64, {**d64, layer: {**d64[layer], name: v}})
            want = _central_difference(f, d64[layer][name])
            np.testing.assert_allclose(np.asarray(g_d["discriminator"][layer][name]), want, rtol=2e-3, atol=1e-6,
                                       err_msg=f"{layer}/{name}")


def test_meal_v2_reference_step_uses_the_student_optimizer():
    from jaxkd.models import create_model
    from jaxkd.models.ensemble import stack_variables, stacked_ensemble
    from jaxkd.train import param_groups
    from jaxkd.train import step as step_lib

    cnn, student = create_model("cnn", 10, width=4, hidden=8), create_model("mlp", 10, hidden=(8,))
    x = jnp.zeros((1, 8, 8, 1))
    t_vars = stack_variables([jax.jit(cnn.init)(jax.random.PRNGKey(i), x) for i in range(2)])
    recipe = build_recipe({"name": "meal_v2"})
    tx, _ = param_groups.make_optimizer({"name": "sgd", "lr": 0.1, "momentum": 0.9}, recipe.aux_optim, 10, 1)
    state = step_lib.create_train_state(jax.random.PRNGKey(0), student, recipe, tx, x, teacher=stacked_ensemble(cnn, 2),
                                        teacher_variables=t_vars)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]]
    assert any("discriminator" in p for p in paths) and not any("mu" in p for p in paths)  # SGD trace, no Adam
    step = step_lib.make_train_step(student, recipe, tx, step_lib.InputPipeline((0.0,), (1.0,)),
                                    teacher=stacked_ensemble(cnn, 2))
    batch = {"image": jax.random.uniform(jax.random.PRNGKey(2), (16, 8, 8, 1)), "label": jnp.arange(16) % 10}
    state, metrics = step(state, t_vars, batch)
    assert {"kd", "disc", "disc_accuracy"} <= set(metrics) and "adv" not in metrics


def test_meal_v2_reference_does_not_decay_the_discriminator():
    """The student's weight decay (SGD, coupled: g + wd * w) reaches the student, not D; the
    learning rate and momentum are the student's for both."""
    from jaxkd.train import param_groups

    recipe = build_recipe({"name": "meal_v2"})
    optim = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "schedule": "constant"}
    tx, _ = param_groups.make_optimizer(optim, recipe.aux_optim, 10, 1)
    params = {"student": {"w": jnp.full((3,), 2.0)}, "aux": {"discriminator": {"w": jnp.full((3,), 2.0)}}}
    grads = {"student": {"w": jnp.full((3,), 0.5)}, "aux": {"discriminator": {"w": jnp.full((3,), 0.5)}}}
    opt_state = tx.init(params)
    for step in range(2):  # momentum 0.9: the second update is lr * (0.9 * g1 + g2)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    # student: 2 -> 2 - 0.1*(0.5+0.02)=1.948; then g = 0.5 + 0.01*1.948, buf = 0.9*0.52 + g
    g2 = 0.5 + 0.01 * 1.948
    np.testing.assert_allclose(params["student"]["w"], 1.948 - 0.1 * (0.9 * 0.52 + g2), rtol=1e-6)
    np.testing.assert_allclose(params["aux"]["discriminator"]["w"], 2.0 - 0.1 * 0.5 - 0.1 * (0.9 * 0.5 + 0.5), rtol=1e-6)
