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
