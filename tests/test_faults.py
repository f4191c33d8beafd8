"""Faults: a damaged latest checkpoint, no usable checkpoint, a diverging run, a second run."""

import os
import warnings

import jax
import numpy as np
import pytest
from orbax import checkpoint as ocp

from jaxkd import config as config_lib
from jaxkd.train import checkpoint as ckpt_lib
from jaxkd.train.loop import TrainingError, train_and_evaluate, workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**over):
    c = config_lib.load_config(os.path.join(ROOT, "experiments/configs/digits.py"))
    c.method = {"name": "ce"}
    c.train.progress = c.train.tensorboard = False
    c.train.num_epochs = 2
    c.train.checkpoint_every_steps = 5
    return config_lib.apply_overrides(c, [f"{k}={v!r}" for k, v in over.items()])


def _truncate_all(path):
    for root, _, files in os.walk(path):
        for f in files:
            open(os.path.join(root, f), "w").close()


def _final_params(workdir):
    mgr = ckpt_lib.run_manager(workdir)
    r = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return jax.tree.map(np.asarray, r.state["params"])


def test_damaged_latest_checkpoint_falls_back_to_older(tmp_path, data_dir):
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    train_and_evaluate(_config(), ref)
    train_and_evaluate(_config(), run, stop_after_steps=20)
    _truncate_all(os.path.join(run, "checkpoints", "20", "state"))
    with pytest.warns(RuntimeWarning, match="checkpoint step 20 .* unusable"):
        summary = train_and_evaluate(_config(), run)
    assert os.path.isdir(os.path.join(run, "checkpoints", "20.unusable"))  # kept for inspection
    assert summary["steps"] == 2 * (1500 // 64)
    jax.tree.map(np.testing.assert_array_equal, _final_params(ref), _final_params(run))


def test_no_usable_checkpoint_is_a_clear_error(tmp_path, data_dir):
    run = str(tmp_path / "run")
    train_and_evaluate(_config(), run, stop_after_steps=10)
    for step in os.listdir(os.path.join(run, "checkpoints")):
        if step.isdigit():
            _truncate_all(os.path.join(run, "checkpoints", step, "state"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(2):  # the damaged steps stay in place: a rerun fails the same way
            with pytest.raises(ckpt_lib.CheckpointError, match="none of the checkpoints .* could be restored"):
                train_and_evaluate(_config(), run)


def test_non_finite_loss_stops_and_names_the_step(tmp_path, data_dir):
    run = str(tmp_path / "nan")
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step \d+; last good checkpoint"):
        train_and_evaluate(_config(**{"optim.lr": 1e12, "optim.schedule": "constant"}), run)
    mgr = ckpt_lib.run_manager(run)
    for step in mgr.all_steps():  # whatever was saved before the divergence is finite
        r = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(r.state["params"]))


def test_second_run_in_same_workdir_is_refused(tmp_path):
    wd = str(tmp_path / "locked")
    with workdir_lock(wd):
        with pytest.raises(TrainingError, match="in use by another jaxkd run"):
            with workdir_lock(wd):
                pass
    with workdir_lock(wd):  # released again
        pass
