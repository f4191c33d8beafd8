"""Multi-stage runs: frozen parameter groups stay bit-for-bit, resume in the middle of stage 2."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax import checkpoint as ocp

from jaxkd import config as config_lib
from jaxkd import losses, models
from jaxkd.train import checkpoint as ckpt_lib
from jaxkd.train import recipes, step as step_lib
from jaxkd.train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FROZEN = ("student/bn2", "student/conv2", "student/hidden", "student/fc")
N = 320  # training digits: 5 steps an epoch
SPE = N // 64


def _first_block_only():
    """Trains only the stem block (conv1/bn1) on CE; everything after it is frozen."""
    def loss(inp):
        ce = losses.cross_entropy(inp.student_logits, inp.labels)
        return ce, {"ce": ce}
    return recipes.Recipe(name="first_block", loss=loss,
                          trainable=lambda path: not path.startswith(FROZEN))


@pytest.fixture(scope="module")
def first_block_recipe():
    # registered as a user's config file would (the same function again is fine)
    recipes.register_recipe("first_block", _first_block_only)


def _config(**over):
    c = config_lib.load_config(os.path.join(ROOT, "experiments/configs/digits.py"))
    c.model.name, c.model.kwargs = "cnn", {"width": 8}
    c.train.progress = c.train.tensorboard = False
    c.stages = [{"name": "warm", "num_epochs": 1, "method": {"name": "first_block"}},
                {"name": "main", "num_epochs": 2, "method": {"name": "ce"}, "optim": {"lr": 0.02}}]
    c.train.checkpoint_every_steps = 2
    c.data.num_train_examples = N
    return config_lib.apply_overrides(c, [f"{k}={v!r}" for k, v in over.items()])


def _state(workdir):
    mgr = ckpt_lib.run_manager(workdir)
    r = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return mgr.latest_step(), jax.tree.map(np.asarray, r.state)


def _flat(tree, prefix):
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {prefix + step_lib.param_path(p): v for p, v in flat}


def test_frozen_groups_are_bit_for_bit(tmp_path, data_dir, first_block_recipe):
    cfg = _config()
    steps_per_epoch = SPE
    wd = str(tmp_path / "a")
    train_and_evaluate(cfg, wd, stop_after_steps=steps_per_epoch)  # exactly the end of stage "warm"
    step, state = _state(wd)
    assert step == steps_per_epoch
    student = models.create_model("cnn", 10, width=8)
    init = step_lib.create_train_state(jax.random.PRNGKey(cfg.seed), student, _first_block_only(),
                                       __import__("optax").sgd(0.1), jnp.zeros((1, 8, 8, 1)))
    before = {**_flat(init.params, ""), **_flat(init.model_state["student"], "student/")}
    after = {**_flat(state["params"], ""), **_flat(state["model_state"]["student"], "student/")}
    for path, value in before.items():
        frozen = any(seg in path for seg in ("bn2", "conv2", "hidden", "fc"))
        if frozen:
            np.testing.assert_array_equal(after[path], np.asarray(value), err_msg=path)
        else:
            assert not np.array_equal(after[path], np.asarray(value)), f"{path} should have trained"
    # the "main" stage then trains everything
    train_and_evaluate(cfg, wd)
    _, final = _state(wd)
    assert not np.array_equal(final["params"]["student"]["fc"]["kernel"], state["params"]["student"]["fc"]["kernel"])


def test_resume_in_the_middle_of_stage_two(tmp_path, data_dir, first_block_recipe):
    cfg = _config()
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train_and_evaluate(cfg, a)
    steps_per_epoch = SPE
    stop = 8  # a checkpoint step (every 2) inside stage "main" (steps 5..14)
    assert steps_per_epoch < stop < 2 * steps_per_epoch
    train_and_evaluate(cfg, b, stop_after_steps=stop)
    assert _state(b)[0] == stop
    summary = train_and_evaluate(cfg, b)
    assert summary["steps"] == 3 * steps_per_epoch
    jax.tree.map(np.testing.assert_array_equal, _state(a)[1], _state(b)[1])


def test_a_stage_may_skip_the_student_eval(tmp_path, data_dir, first_block_recipe):
    import json
    cfg = _config()
    cfg.stages[0]["evaluate"] = False
    wd = str(tmp_path / "a")
    summary = train_and_evaluate(cfg, wd)
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        recs = [json.loads(ln) for ln in f]
    assert [(r["stage"], "eval/accuracy" in r) for r in recs] == [("warm", False), ("main", True), ("main", True)]
    assert "train/ce" in recs[0] and summary["best_epoch"] in (2, 3)
    with pytest.raises(config_lib.ConfigError, match=r"stages\[1\].evaluate=False: the final stage"):
        train_and_evaluate(_config(stages=[{"num_epochs": 1}, {"num_epochs": 1, "evaluate": False}]),
                           str(tmp_path / "x"))
    with pytest.raises(config_lib.ConfigError, match=r"stages\[0\].evaluate must be True or False"):
        train_and_evaluate(_config(stages=[{"num_epochs": 1, "evaluate": "no"}, {"num_epochs": 1}]),
                           str(tmp_path / "y"))


def test_bad_stage_spec(tmp_path, data_dir):
    with pytest.raises(config_lib.ConfigError, match=r"stages\[1\].num_epochs"):
        train_and_evaluate(_config(stages=[{"num_epochs": 1, "method": {"name": "ce"}}, {"num_epochs": 0}]),
                           str(tmp_path / "x"))
    with pytest.raises(config_lib.ConfigError, match=r"stages\[0\].method.name: unknown method 'cee'; did you mean 'ce'"):
        train_and_evaluate(_config(stages=[{"num_epochs": 1, "method": {"name": "cee"}}]), str(tmp_path / "y"))


def test_params_feeding_a_tap():
    """Gradient dependence finds exactly the layers before a tap (resnet8: stem, stage1, stage2)."""
    student = models.create_model("resnet8", 10)
    sample = jnp.zeros((1, 8, 8, 3))
    variables = jax.jit(student.init)(jax.random.PRNGKey(0), sample)
    feeding = step_lib.params_feeding(student, variables, sample, "stage2")
    tops = {p.split("/")[1] for p in feeding}
    assert tops == {"stem_conv", "stem_bn", "stage1_block0", "stage2_block0"}
    every = {"student/" + step_lib.param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        variables["params"])[0] if step_lib.param_path(p).startswith(("stem", "stage1", "stage2"))}
    assert feeding == every
    recipe = step_lib.resolve_trainable(recipes.Recipe("x", loss=None, train_up_to="stage2"), student,
                                        variables, sample)
    assert recipe.trainable("aux/regressor/conv/kernel") and recipe.trainable("student/stage1_block0/conv_a/kernel")
    assert not recipe.trainable("student/stage3_block0/conv_a/kernel") and not recipe.trainable("student/fc/kernel")
    with pytest.raises(ValueError, match="no feature 'stage9'"):
        step_lib.params_feeding(student, variables, sample, "stage9")
