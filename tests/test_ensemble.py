"""Multi-teacher losses against numpy, the ensemble teacher model, the config and the loop."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxkd import config as config_lib
from jaxkd import losses
from jaxkd.experiment import teacher_config
from jaxkd.models import create_model
from jaxkd.models.ensemble import stack_variables, stacked_ensemble, tuple_ensemble, unstack_variables
from jaxkd.train import checkpoint as ckpt_lib
from jaxkd.train import step as step_lib
from jaxkd.train.loop import train_and_evaluate
from jaxkd.train.recipes import build_recipe

from _configs import digits_config, tiny_digits_config

N, B, C = 3, 5, 4


def _np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _logits(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(B, C)).astype(np.float32) * 2, rng.normal(size=(N, B, C)).astype(np.float32) * 3)


def _np_kl(p, q):
    return np.sum(p * (np.log(p) - np.log(q)), -1)


@pytest.mark.parametrize("weights", [None, [0.2, 0.3, 0.5], [1.0, 0.0, 3.0]])
def test_ensemble_kd_matches_numpy(weights):
    s, t = _logits()
    T = 2.0
    w = np.full(N, 1 / N) if weights is None else np.asarray(weights) / np.sum(weights)
    pbar = np.einsum("n,nbc->bc", w, _np_softmax(t / T))
    want = T ** 2 * _np_kl(pbar, _np_softmax(s / T))
    np.testing.assert_allclose(losses.ensemble_kd(jnp.asarray(s), jnp.asarray(t), T, weights), want, rtol=1e-5)
    # one teacher: Hinton KD
    np.testing.assert_allclose(losses.ensemble_kd(s, t[:1], T), losses.hinton_kd(s, t[0], T), rtol=1e-5)
    np.testing.assert_allclose(losses.ensemble_kd(s, t[0], T), losses.hinton_kd(s, t[0], T), rtol=1e-5)


@pytest.mark.parametrize("kind", ["neg_entropy", "max_prob"])
def test_confidence_weights_match_numpy(kind):
    s, t = _logits(1)
    T, tau = 2.0, 0.5
    p = _np_softmax(t / T)
    conf = np.sum(p * np.log(p), -1) if kind == "neg_entropy" else p.max(-1)
    w = np.exp(conf / tau) / np.exp(conf / tau).sum(0, keepdims=True)  # [N, B]
    got = losses.confidence_weights(t, kind, T, tau)
    np.testing.assert_allclose(got, w, rtol=1e-5)
    pbar = np.einsum("nb,nbc->bc", w, p)
    np.testing.assert_allclose(losses.ensemble_kd(s, t, T, got), T ** 2 * _np_kl(pbar, _np_softmax(s / T)),
                               rtol=1e-5)
    # the recipe's confidence weighting is the same loss
    recipe = build_recipe({"name": "ensemble_kd", "temperature": T, "confidence": kind, "weight_temperature": tau,
                           "alpha": 1.0, "gamma": 0.0})
    total, parts = recipe.loss(_inputs(s, t))
    np.testing.assert_allclose(total, parts["kd"])
    np.testing.assert_allclose(parts["kd"], T ** 2 * _np_kl(pbar, _np_softmax(s / T)), rtol=1e-5)


def _inputs(s, t, rng=jax.random.PRNGKey(0)):
    from jaxkd.core import LossInputs
    return LossInputs(student_logits=jnp.asarray(s), student_features={}, teacher_logits=jnp.asarray(t),
                      teacher_features={}, labels=jnp.arange(B) % C, step=jnp.zeros((), jnp.int32), aux_params={},
                      rng=rng, stage_step=jnp.zeros((), jnp.int32))


def test_relabel_kd_matches_numpy_and_has_the_uniform_ensemble_gradient():
    s, t = _logits(2)
    T = 3.0
    q = _np_softmax(s / T)
    want = T ** 2 * np.mean([_np_kl(_np_softmax(t[n] / T), q) for n in range(N)], 0)
    np.testing.assert_allclose(losses.relabel_kd(s, t, T), want, rtol=1e-5)
    g_relabel = jax.grad(lambda z: jnp.sum(losses.relabel_kd(z, t, T)))(jnp.asarray(s))
    g_avg = jax.grad(lambda z: jnp.sum(losses.ensemble_kd(z, t, T)))(jnp.asarray(s))
    np.testing.assert_allclose(g_relabel, g_avg, rtol=1e-4, atol=1e-6)


def test_random_teacher_is_reproducible_varies_and_matches_numpy():
    s, t = _logits(3)
    T = 2.0
    key = jax.random.PRNGKey(7)
    k = np.asarray(losses.choose_teachers(key, N, 64, "example"))
    np.testing.assert_array_equal(k, losses.choose_teachers(key, N, 64, "example"))  # same key, same draw
    assert set(k) == set(range(N))  # all teachers used within a batch
    draws = {tuple(np.asarray(losses.choose_teachers(jax.random.PRNGKey(i), N, 64))) for i in range(5)}
    assert len(draws) == 5  # different keys, different draws
    per_batch = [np.asarray(losses.choose_teachers(jax.random.PRNGKey(i), N, 8, "batch")) for i in range(20)]
    assert all(len(set(b)) == 1 for b in per_batch) and len({b[0] for b in per_batch}) > 1
    kb = np.asarray(losses.choose_teachers(key, N, B, "example"))
    want = T ** 2 * np.array([_np_kl(_np_softmax(t[kb[i], i] / T), _np_softmax(s[i] / T)) for i in range(B)])
    np.testing.assert_allclose(losses.random_teacher_kd(s, t, key, T), want, rtol=1e-5)
    # the recipe draws from LossInputs.rng
    recipe = build_recipe({"name": "random_teacher_kd", "temperature": T, "alpha": 1.0, "gamma": 0.0})
    np.testing.assert_allclose(recipe.loss(_inputs(s, t, key))[1]["kd"], want, rtol=1e-5)


def test_meal_v2_kd_matches_numpy():
    s, t = _logits(4)
    pbar = _np_softmax(t).mean(0)
    np.testing.assert_allclose(losses.meal_v2_kd(s, t), -np.sum(pbar * np.log(_np_softmax(s)), -1), rtol=1e-5)


def test_bad_shapes_and_options():
    s, t = _logits()
    with pytest.raises(ValueError, match="num_teachers"):
        losses.ensemble_kd(s, t[None], 1.0)
    with pytest.raises(ValueError, match="disagree"):
        losses.relabel_kd(s[:2], t, 1.0)
    with pytest.raises(ValueError, match="weights"):
        losses.ensemble_kd(s, t, 1.0, [1.0, 2.0])
    with pytest.raises(ValueError, match="not both"):
        build_recipe({"name": "ensemble_kd", "weights": [1, 1, 1], "confidence": "max_prob"})
    with pytest.raises(ValueError, match="per"):
        build_recipe({"name": "random_teacher_kd", "per": "epoch"})


def _x():
    return jax.random.normal(jax.random.PRNGKey(1), (6, 8, 8, 1))


def test_stacked_vmap_forward_equals_looping_teachers():
    cnn = create_model("cnn", 10, width=4, hidden=8)
    x = _x()
    init = jax.jit(cnn.init)  # (eager Flax init is slow on CPU)
    vs = [init(jax.random.PRNGKey(i), x) for i in range(3)]
    ens = stacked_ensemble(cnn, 3)
    logits, feats, _ = jax.jit(lambda v, x: ens.apply(v, x, train=False))(stack_variables(vs), x)
    assert logits.shape == (3, 6, 10)
    one = jax.jit(lambda v, x: cnn.apply(v, x, train=False))
    for n, v in enumerate(vs):
        l_n, f_n, _ = one(v, x)
        np.testing.assert_allclose(logits[n], l_n, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(feats["embedding"][n], f_n["embedding"], rtol=1e-5, atol=1e-6)
    back = unstack_variables(stack_variables(vs), 3)
    jax.tree.map(np.testing.assert_array_equal, back[2], jax.tree.map(np.asarray, vs[2]))
    # different architectures: a tuple, same logits as each teacher alone
    mlp = create_model("mlp", 10, hidden=(16,))
    tup = tuple_ensemble([cnn, mlp])
    tv = (vs[0], jax.jit(mlp.init)(jax.random.PRNGKey(5), x))
    tl, tf, _ = jax.jit(lambda v, x: tup.apply(v, x, train=False))(tv, x)
    np.testing.assert_allclose(tl[1], mlp.apply(tv[1], x, train=False)[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tl[0], logits[0], rtol=1e-5, atol=1e-6)
    assert "teacher1/hidden1" in tf and "teacher0/stage1" in tf
    with pytest.raises(ValueError, match="same architecture"):
        stack_variables([vs[0], tv[1]])


def test_train_step_with_ensemble_keeps_teachers_and_trains_student():
    cnn = create_model("cnn", 10, width=4, hidden=8)
    student = create_model("mlp", 10, hidden=(8,))
    x = jnp.zeros((1, 8, 8, 1))
    init = jax.jit(cnn.init)
    t_vars = stack_variables([init(jax.random.PRNGKey(i), x) for i in range(3)])
    before = jax.tree.map(np.array, t_vars)
    ens = stacked_ensemble(cnn, 3)
    recipe = build_recipe({"name": "random_teacher_kd", "per": "batch"})
    tx = optax.sgd(0.1)
    state = step_lib.create_train_state(jax.random.PRNGKey(0), student, recipe, tx, x, teacher=ens,
                                        teacher_variables=t_vars)
    s0 = jax.tree.map(np.array, state.params["student"])
    step = step_lib.make_train_step(student, recipe, tx, step_lib.InputPipeline((0.0,), (1.0,)), teacher=ens)
    batch = {"image": jax.random.uniform(jax.random.PRNGKey(2), (16, 8, 8, 1)), "label": jnp.arange(16) % 10}
    for _ in range(2):
        state, metrics = step(state, t_vars, batch)
    assert np.isfinite(float(metrics["kd"])) and 0 <= float(metrics["teacher_accuracy"]) <= 1
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, t_vars), before)
    assert not np.array_equal(jax.tree.leaves(state.params["student"])[0], jax.tree.leaves(s0)[0])


# ---- through the config and the loop (tiny teachers trained for one epoch) ----

_config = tiny_digits_config


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, data_dir):
    """A cnn teacher, one epoch on 128 images."""
    cnn_dir = str(tmp_path_factory.mktemp("cnn_teacher"))
    tc = teacher_config(_config())
    tc.data.num_train_examples = 128
    train_and_evaluate(tc, cnn_dir)
    return cnn_dir


def _twice_config(**over):
    """A tiny mlp student of the session's digits teacher (128 images, 2 steps)."""
    return digits_config(**{"model.kwargs": {"hidden": (16,)}, "data.num_train_examples": 128,
                            "train.num_epochs": 1, **over})


def _student_params(workdir):
    return ckpt_lib.load_run_state(workdir)[1]["params"]["student"]


@pytest.mark.parametrize("method", ["ensemble_kd", "random_teacher_kd", "relabel_kd"])
def test_one_teacher_twice_distils_like_hinton_kd(tmp_path, digits_teacher, method):
    """Through config and loop: the ensemble of one trained teacher listed twice (stacked params,
    one vmapped forward) gives every multi-teacher method the soft labels of that teacher, so the
    student trains as with hinton_kd from it, step for step (to float32 round-off)."""
    teacher = digits_teacher[0]
    ref = str(tmp_path / "hinton")
    train_and_evaluate(_twice_config(**{"teacher.workdir": teacher}), ref)
    wd = str(tmp_path / method)
    s = train_and_evaluate(_twice_config(**{"teacher.workdir": [teacher, teacher], "method": {"name": method}}), wd)
    assert s["teacher_accuracy"] == pytest.approx(digits_teacher[1]["best_accuracy"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 _student_params(ref), _student_params(wd))


def test_meal_v2_end_to_end_trains_its_discriminator_and_the_student_like_label_refinery(tmp_path, digits_teacher):
    """MEAL V2 through config and loop with adv_weight=0: the student's gradient is the soft-label
    term's alone (the discriminator only watches), which is label_refinery's KL(p_t || p_s) to the
    same teacher, so the students match; the discriminator trains with its own Adam."""
    teacher = digits_teacher[0]
    ref = str(tmp_path / "refinery")
    train_and_evaluate(_twice_config(**{"teacher.workdir": teacher, "method": {"name": "label_refinery"}}), ref)
    wd = str(tmp_path / "meal")
    cfg = _twice_config(**{"teacher.workdir": [teacher, teacher], "train.checkpoint_every_steps": 1,
                           "method": {"name": "meal_v2", "mode": "gan", "adv_weight": 0.0, "disc_lr": 1e-2}})
    train_and_evaluate(cfg, wd, stop_after_steps=1)
    d1 = jax.tree.map(np.array, ckpt_lib.load_run_state(wd)[1]["params"]["aux"]["discriminator"])
    train_and_evaluate(cfg, wd)
    step, state = ckpt_lib.load_run_state(wd)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 _student_params(ref), state["params"]["student"])
    d2 = state["params"]["aux"]["discriminator"]
    assert not np.array_equal(d1["Dense_0"]["kernel"], d2["Dense_0"]["kernel"])  # it trained on step 2
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]]
    assert any("discriminator" in p and "mu" in p for p in paths)  # Adam moments: its own optimizer
    rec = [json.loads(ln) for ln in open(os.path.join(wd, "metrics.jsonl"))][-1]
    assert "train/ce" not in rec and rec["train/loss"] == pytest.approx(rec["train/kd"] + rec["train/disc"], rel=1e-5)


@pytest.mark.slow
def test_loop_tuple_ensemble(tmp_path, teachers):
    # different architectures: config.teachers -> a tuple (an mlp trained as a second "teacher")
    mlp_dir = str(tmp_path / "mlp_teacher")
    train_and_evaluate(_config(method={"name": "ce"}), mlp_dir)
    teachers_cfg = [{"workdir": teachers}, {"name": "mlp", "kwargs": {"hidden": (16,)}, "workdir": mlp_dir}]
    s = train_and_evaluate(_config(teachers=teachers_cfg, method={"name": "relabel_kd"}), str(tmp_path / "tuple"))
    assert s["best_accuracy"] is not None


@pytest.mark.parametrize("over, match", [
    ({"teacher.workdir": []}, "teacher.workdir"),
    ({"teachers": [{"name": "cnn"}]}, r"teachers\[0\].workdir"),
    ({"teachers": [{"workdir": "x", "lr": 1}]}, "unknown key"),
    ({"teachers": [{"workdir": "x", "name": "nope"}]}, "unknown model"),
    ({"teachers": "x"}, "teachers"),
])
def test_bad_teacher_configs(tmp_path, over, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        train_and_evaluate(_config(method={"name": "ensemble_kd"}, **over), str(tmp_path / "bad"))


def test_several_teachers_with_a_single_teacher_method_is_refused(tmp_path, data_dir):
    # refused before any checkpoint is read
    with pytest.raises(config_lib.ConfigError, match="multi-teacher"):
        train_and_evaluate(_config(**{"teacher.workdir": ["t0", "t1"], "method": {"name": "hinton_kd"}}),
                           str(tmp_path / "kd"))


@pytest.mark.slow
def test_compare_with_a_list_of_teacher_workdirs(tmp_path, teachers):
    from jaxkd.experiment import compare

    rows = compare(_config(**{"teacher.workdir": [teachers, teachers], "method": {"name": "ensemble_kd"}}),
                   str(tmp_path / "cmp"), seeds=(0,), progress=False)
    by_run = {r["run"]: r for r in rows}
    assert by_run["teacher"]["seeds"] == 2 and by_run["ensemble_kd"]["best_mean"] > 0
