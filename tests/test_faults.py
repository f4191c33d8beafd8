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
    cfg = _config(**{"optim.lr": 1e12, "optim.schedule": "constant", "train.checkpoint_every_steps": 1})
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step (\d+); last good checkpoint: step (\d+) in ") as e:
        train_and_evaluate(cfg, run)
    import re
    bad_step, last_good = map(int, re.search(r"at step (\d+); last good checkpoint: step (\d+)", str(e.value)).groups())
    assert last_good == bad_step - 1 >= 1  # a checkpoint every step: the one just before the divergence
    mgr = ckpt_lib.run_manager(run)
    assert last_good in mgr.all_steps() and max(mgr.all_steps()) == last_good  # nothing from the bad step
    for step in mgr.all_steps():  # everything saved before the divergence is finite
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


def test_parallel_comparisons_put_off_a_busy_run_and_come_back_to_it(tmp_path, data_dir, capsys):
    """A compare that meets a run another process holds trains the rest first, then waits for it
    and reads its result: two comparisons on one work dir share the runs instead of failing."""
    import threading
    import time

    from jaxkd.experiment import compare
    cw = tmp_path / "c"
    c = _config(**{"method": {"name": "hinton_kd"}, "train.num_epochs": 1, "train.checkpoint_every_steps": 0,
                   "teacher.kwargs": {"width": 4, "hidden": 16}, "model.kwargs": {"hidden": (16,)}})
    busy, other = cw / "hinton_kd" / "seed0", cw / "hinton_kd" / "seed1"
    held, events = threading.Event(), []

    def other_process():  # holds seed 0's work dir until the comparison has finished seed 1
        with workdir_lock(str(busy)):
            held.set()
            deadline = time.monotonic() + 120
            while not (other / "summary.json").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            events.append("released")

    t = threading.Thread(target=other_process, daemon=True)
    t.start()
    assert held.wait(30)
    rows = compare(c, str(cw), seeds=(0, 1), progress=False)
    t.join(30)
    out = capsys.readouterr().out
    assert events == ["released"]
    assert f"{busy} is in use by another process; coming back to it at the end" in out
    assert out.index("hinton_kd seed 1") < out.index("hinton_kd seed 0 (waiting for the other process)")
    assert (busy / "summary.json").stat().st_mtime > (other / "summary.json").stat().st_mtime
    kd = next(r for r in rows if r["run"] == "hinton_kd")
    assert kd["seeds"] == 2 and [s["seed"] for s in kd["summaries"]] == [0, 1]  # job order, not finishing order
    with workdir_lock(str(busy)):  # nothing left holding it
        pass


def test_skip_nonfinite_step_changes_nothing_and_counts():
    """With skip_nonfinite a NaN batch leaves params, batch stats and optimizer state bit-identical."""
    import jax.numpy as jnp
    import optax

    from jaxkd import models
    from jaxkd.train import InputPipeline, create_train_state, make_train_step, recipes

    student = models.create_model("mlp", 10, hidden=(16,))
    recipe = recipes.cross_entropy_recipe()
    tx = optax.sgd(0.1, momentum=0.9)
    pipe = InputPipeline(mean=(0.0,), std=(1.0,))
    rng = np.random.default_rng(0)
    good = {"image": rng.normal(size=(8, 8, 8, 1)).astype(np.float32),
            "label": rng.integers(0, 10, 8).astype(np.int32)}
    bad = {"image": good["image"].copy(), "label": good["label"]}
    bad["image"][3, 2, 2, 0] = np.nan
    state = create_train_state(jax.random.PRNGKey(0), student, recipe, tx, jnp.zeros((1, 8, 8, 1)))
    step = make_train_step(student, recipe, tx, pipe, skip_nonfinite=True, donate=False)
    s1, m1 = step(state, None, good)
    assert float(m1["skipped"]) == 0.0
    s2, m2 = step(s1, None, bad)
    assert float(m2["skipped"]) == 1.0 and not np.isfinite(float(m2["loss"]))
    assert int(s2.step) == int(s1.step) + 1
    for part in ("params", "model_state", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, getattr(s1, part), getattr(s2, part))
    s3, m3 = step(s2, None, good)  # and training goes on from there
    assert float(m3["skipped"]) == 0.0
    assert any(np.any(np.asarray(a) != np.asarray(b)) for a, b in
               zip(jax.tree.leaves(s2.params), jax.tree.leaves(s3.params)))
    # without the option the same batch updates the params with NaN
    plain = make_train_step(student, recipe, tx, pipe, donate=False)
    s_nan, _ = plain(s1, None, bad)
    assert not all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(s_nan.params))


def _nan_on_bright_batches(num_classes, hidden=(16,)):
    """An MLP whose loss is NaN on about half of the batches (first image brighter than the batch)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from jaxkd import models

    class Flaky(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            h = nn.relu(nn.Dense(hidden[0])(x.reshape((x.shape[0], -1))))
            logits = nn.Dense(num_classes)(h)
            logits = logits + jnp.where(jnp.mean(x[0]) > jnp.mean(x), jnp.nan, 0.0)
            return logits, {"logits": logits}

    return models.from_linen(Flaky(), "flaky")


def test_skip_nonfinite_in_the_loop_counts_and_keeps_checkpoints_finite(tmp_path, data_dir, monkeypatch):
    from jaxkd.models import registry

    monkeypatch.setitem(registry._REGISTRY, "flaky", _nan_on_bright_batches)
    cfg = _config(**{"model.name": "flaky", "model.kwargs": {}, "train.on_nonfinite": "skip"})
    run = str(tmp_path / "skip")
    summary = train_and_evaluate(cfg, run)
    assert summary["steps"] == 2 * 23
    assert 0 < summary["skipped_steps"] < summary["steps"], summary  # some batches, not all
    import json
    with open(os.path.join(run, "metrics.jsonl")) as f:
        records = [json.loads(ln) for ln in f]
    assert sum(r["train/skipped_steps"] for r in records) == summary["skipped_steps"]
    assert all(np.isfinite(r["train/loss"]) for r in records)  # means over the good steps only
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(ckpt_lib.load_run_state(run)[1]["params"]))
    # the default stops at the first such step
    with pytest.raises(TrainingError, match=r"non-finite loss .*no verified checkpoint.*train.on_nonfinite='skip' would skip"):
        train_and_evaluate(_config(**{"model.name": "flaky", "model.kwargs": {}}), str(tmp_path / "stop"))


def test_skip_nonfinite_gives_up_after_consecutive_skips(tmp_path, data_dir):
    cfg = _config(**{"optim.lr": 1e12, "optim.schedule": "constant", "train.on_nonfinite": "skip",
                     "train.max_consecutive_skips": 3})
    with pytest.raises(TrainingError, match="3 steps in a row were non-finite"):
        train_and_evaluate(cfg, str(tmp_path / "diverged"))
