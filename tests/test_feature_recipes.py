"""FitNets (one- and two-stage), AT and FSP recipes through the generic loop.

Tiny runs (a narrow resnet8 student and teacher, widths 4/4/8/8, on 192 digits: 3 steps an
epoch); each checks what its recipe must do: the logged loss is
the recipe's weighted sum of its logged parts, frozen layers stay bit-for-bit, the regressor is
checkpointed but not exported.
"""

import json
import os

import jax
import numpy as np
import pytest
from orbax import checkpoint as ocp

from jaxkd.experiment import teacher_config
from jaxkd.train import checkpoint as ckpt_lib
from jaxkd.train.loop import train_and_evaluate

from _configs import digits_config

N = 192
SPE = N // 64  # steps per epoch
WIDTHS = (4, 4, 8, 8)  # stem, stage1..3 (equal for student and teacher, so FSP applies)


def _config(**over):
    return digits_config(**{"model.name": "resnet", "model.kwargs": {"depth": 8, "widths": WIDTHS}, "teacher.name": "resnet",
                            "teacher.kwargs": {"depth": 8, "widths": WIDTHS}, "train.num_epochs": 1,
                            "data.num_train_examples": N, **over})


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, data_dir):
    wd = str(tmp_path_factory.mktemp("resnet_teacher"))
    tc = teacher_config(_config())
    tc.data.num_train_examples = N  # a weak teacher is enough here
    train_and_evaluate(tc, wd)
    return wd


def _state(workdir):
    mgr = ckpt_lib.run_manager(workdir)
    r = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return jax.tree.map(np.asarray, r.state)


def _history(workdir):
    return [json.loads(ln) for ln in open(os.path.join(workdir, "metrics.jsonl"))]


def test_fitnets_one_stage_loss_regressor_checkpointed_not_exported(tmp_path, teacher):
    wd = str(tmp_path / "fitnets")
    train_and_evaluate(_config(**{"teacher.workdir": teacher, "method": {"name": "fitnets"}}), wd)
    state = _state(wd)
    reg = state["params"]["aux"]["regressor"]
    assert reg["conv"]["kernel"].shape == (1, 1, 8, 8)  # stage2 2x2x8 for both: a 1x1 conv
    assert np.any(state["model_state"]["aux"]["batch_stats"]["regressor"]["bn"]["mean"] != 0)  # BN updated
    rec = _history(wd)[-1]
    # RepDistiller's one-stage FitNets: CE + 100 * hint (epoch means of a linear combination)
    assert rec["train/loss"] == pytest.approx(rec["train/ce"] + 100.0 * rec["train/hint"], rel=1e-5)
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
    assert hist[0]["train/loss"] == pytest.approx(hist[0]["train/hint"], rel=1e-6)  # the hint alone
    assert "train/ce" not in hist[0] and "train/kd" in hist[1]


def test_attention_and_fsp_recipes(tmp_path, teacher):
    wd = str(tmp_path / "at")
    at = train_and_evaluate(_config(**{"teacher.workdir": teacher, "method": {"name": "at"}}), wd)
    assert at["steps"] == SPE
    rec = _history(wd)[-1]
    assert rec["train/at"] > 0 and rec["train/loss"] == pytest.approx(rec["train/ce"] + rec["train/at"], rel=1e-5)
    stages = [{"name": "fsp_init", "num_epochs": 1, "method": {"name": "fsp"}},
              {"name": "train", "num_epochs": 1, "method": {"name": "ce"}}]
    cfg = _config(**{"teacher.workdir": teacher, "stages": stages, "train.checkpoint_every_steps": 1})
    wd = str(tmp_path / "fsp")
    train_and_evaluate(cfg, wd, stop_after_steps=1)
    first = _state(wd)["params"]["student"]
    train_and_evaluate(cfg, wd, stop_after_steps=SPE)
    init_done = _state(wd)["params"]["student"]
    # RepDistiller's FSP initialisation stage trains the layers up to the last tapped one (stage3)
    # only: the classifier keeps its step-1 values, which are its init; stage3 moved
    jax.tree.map(np.testing.assert_array_equal, first["fc"], init_done["fc"])
    assert not np.array_equal(jax.tree.leaves(first["stage3_block0"])[0],
                              jax.tree.leaves(init_done["stage3_block0"])[0])
    train_and_evaluate(cfg, wd)
    assert not np.array_equal(_state(wd)["params"]["student"]["fc"]["kernel"], init_done["fc"]["kernel"])
    hist = _history(wd)
    assert hist[0]["train/loss"] == pytest.approx(hist[0]["train/fsp"], rel=1e-6) and "train/ce" in hist[1]


def test_fsp_channel_mismatch_is_a_clear_error(tmp_path, teacher):
    cfg = _config(**{"teacher.workdir": teacher, "model.kwargs": {"depth": 8, "widths": (4, 8, 8, 8)}, "method": {"name": "fsp"}})
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
