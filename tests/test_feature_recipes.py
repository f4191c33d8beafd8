"""FitNets (one- and two-stage), AT and FSP recipes through the generic loop (resnet14 -> resnet8)."""

import json
import os

import jax
import numpy as np
import pytest
from orbax import checkpoint as ocp

from jaxkd import config as config_lib
from jaxkd.experiment import teacher_config
from jaxkd.train import checkpoint as ckpt_lib
from jaxkd.train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPE = 1500 // 64  # digits steps per epoch


def _config(**over):
    c = config_lib.load_config(os.path.join(ROOT, "experiments/configs/digits.py"))
    c.model.name, c.model.kwargs = "resnet8", {}
    c.teacher.name, c.teacher.kwargs = "resnet14", {}
    c.train.progress = c.train.tensorboard = False
    c.train.num_epochs = 1
    return config_lib.apply_overrides(c, [f"{k}={v!r}" for k, v in over.items()])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, data_dir):
    wd = str(tmp_path_factory.mktemp("resnet_teacher"))
    train_and_evaluate(teacher_config(_config()), wd)
    return wd


def _state(workdir):
    mgr = ckpt_lib.run_manager(workdir)
    r = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return jax.tree.map(np.asarray, r.state)


def _history(workdir):
    return [json.loads(ln) for ln in open(os.path.join(workdir, "metrics.jsonl"))]


def test_fitnets_one_stage_regressor_is_checkpointed_not_exported(tmp_path, teacher):
    wd = str(tmp_path / "fitnets")
    train_and_evaluate(_config(**{"teacher.workdir": teacher, "method": {"name": "fitnets"}}), wd)
    state = _state(wd)
    reg = state["params"]["aux"]["regressor"]
    assert reg["conv"]["kernel"].shape == (1, 1, 32, 32)  # resnet8/14 stage2: 4x4x32 both: 1x1 conv
    assert "regressor" in state["model_state"]["aux"]["batch_stats"]
    assert np.any(state["model_state"]["aux"]["batch_stats"]["regressor"]["bn"]["mean"] != 0)
    hist = _history(wd)
    assert hist[-1]["train/hint"] > 0 and "train/ce" in hist[-1]
    # the exported (best) student has no regressor, and loads as a plain resnet8
    mgr = ckpt_lib.best_manager(wd)
    best = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(model=ocp.args.StandardRestore())).model
    assert set(best) == {"params", "model_state"} and "regressor" not in best["params"]


def test_fitnets_two_stage_freezes_then_trains_all(tmp_path, teacher):
    stages = [{"name": "hint", "num_epochs": 1, "method": {"name": "fitnets_hint"}},
              {"name": "kd", "num_epochs": 1,
               "method": {"name": "hinton_kd", "gamma": 1.0, "alpha": {"type": "linear", "init": 4.0, "end": 1.0}}}]
    cfg = _config(**{"teacher.workdir": teacher, "stages": stages, "train.checkpoint_every_steps": 1})
    wd = str(tmp_path / "two")
    train_and_evaluate(cfg, wd, stop_after_steps=1)
    first = _state(wd)
    train_and_evaluate(cfg, wd, stop_after_steps=SPE)
    hint_done = _state(wd)
    s0, s1 = first["params"]["student"], hint_done["params"]["student"]
    # after the hint stage: layers after the guided layer (stage2) are as after step 1, which
    # equals their init (they never train in this stage); stem..stage2 and the regressor moved
    for name in ("stage3_block0", "fc"):
        jax.tree.map(np.testing.assert_array_equal, s0[name], s1[name])
        jax.tree.map(np.testing.assert_array_equal, first["model_state"]["student"]["batch_stats"].get(name, {}),
                     hint_done["model_state"]["student"]["batch_stats"].get(name, {}))
    for name in ("stem_conv", "stage2_block0"):
        assert not np.array_equal(jax.tree.leaves(s0[name])[0], jax.tree.leaves(s1[name])[0]), name
    train_and_evaluate(cfg, wd)
    final = _state(wd)["params"]["student"]
    assert not np.array_equal(final["fc"]["kernel"], s1["fc"]["kernel"])
    hist = _history(wd)
    assert [r["stage"] for r in hist] == ["hint", "kd"]
    assert "train/hint" in hist[0] and "train/kd" in hist[1]


def test_attention_and_fsp_recipes_run(tmp_path, teacher):
    at = train_and_evaluate(_config(**{"teacher.workdir": teacher, "method": {"name": "at"}}), str(tmp_path / "at"))
    assert at["steps"] == SPE
    assert _history(str(tmp_path / "at"))[-1]["train/at"] > 0
    stages = [{"name": "fsp_init", "num_epochs": 1, "method": {"name": "fsp"}},
              {"name": "train", "num_epochs": 1, "method": {"name": "ce"}}]
    train_and_evaluate(_config(**{"teacher.workdir": teacher, "stages": stages}), str(tmp_path / "fsp"))
    hist = _history(str(tmp_path / "fsp"))
    assert hist[0]["train/fsp"] > 0 and "train/ce" in hist[1]


def test_fsp_channel_mismatch_is_a_clear_error(tmp_path, teacher):
    cfg = _config(**{"teacher.workdir": teacher, "model.name": "resnet8x4", "method": {"name": "fsp"}})
    with pytest.raises(ValueError, match="channel"):
        train_and_evaluate(cfg, str(tmp_path / "bad"))


def test_gradient_attention_option_matches_numpy_on_a_linear_student():
    """grad-AT inside the step: for linear models the input gradient of CE is W (p - y)."""
    import flax.linen as nn
    import jax.numpy as jnp
    import optax

    from jaxkd import models
    from jaxkd.methods.feature_kd import attention_recipe
    from jaxkd.train import InputPipeline, create_train_state, make_train_step

    class Lin(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            logits = nn.Dense(3, use_bias=False)(x.reshape((x.shape[0], -1)))
            return logits, {"logits": logits}

    s_fns, t_fns = models.from_linen(Lin(), "s"), models.from_linen(Lin(), "t")
    x = np.random.default_rng(0).normal(size=(4, 2, 2, 1)).astype(np.float32)
    y = np.array([0, 1, 2, 1], np.int32)
    recipe = attention_recipe(student_layers=(), gradient_beta=2.0, gamma=0.0)
    t_vars = t_fns.init(jax.random.PRNGKey(1), jnp.zeros((1, 2, 2, 1)))
    state = create_train_state(jax.random.PRNGKey(0), s_fns, recipe, optax.sgd(0.0), jnp.zeros((1, 2, 2, 1)))
    step = make_train_step(s_fns, recipe, optax.sgd(0.0), InputPipeline((0.0,), (1.0,)), teacher=t_fns,
                           donate=False)
    _, m = step(state, t_vars, {"image": jnp.asarray(x), "label": jnp.asarray(y)})

    def np_map(w):
        z = x.reshape(4, 4) @ w
        pr = np.exp(z - z.max(1, keepdims=True))
        pr /= pr.sum(1, keepdims=True)
        g = (pr - np.eye(3)[y]) @ w.T  # d CE_i / d x_i, shape (4, 4) = (B, H*W*C)
        q = np.abs(g)
        return q / np.linalg.norm(q, axis=1, keepdims=True)

    ws = np.asarray(state.params["student"]["Dense_0"]["kernel"], np.float64)
    wt = np.asarray(t_vars["params"]["Dense_0"]["kernel"], np.float64)
    expected = ((np_map(ws) - np_map(wt)) ** 2).sum(1).mean()
    assert float(m["grad_at"]) == pytest.approx(expected, rel=1e-4)
    assert float(m["loss"]) == pytest.approx(2.0 * expected, rel=1e-4)
