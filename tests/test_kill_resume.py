"""A training process killed with SIGKILL and restarted with the same command ends bit-identical."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from orbax import checkpoint as ocp

from jaxkd.train import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(workdir):
    return [sys.executable, "-m", "jaxkd.cli", "train", "--config",
            os.path.join(ROOT, "experiments/configs/digits.py"), "--workdir", workdir, "method.name=ce",
            "train.num_epochs=3", "train.checkpoint_every_steps=4", "train.progress=False",
            "train.tensorboard=False"]


def _final_state(workdir):
    mgr = ckpt_lib.run_manager(workdir)
    r = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return jax.tree.map(np.asarray, r.state)


def _history(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(ln).items() if k != "time_s"} for ln in f]


def test_sigkill_then_rerun_matches_uninterrupted(tmp_path, data_dir):
    env = dict(os.environ, JAXKD_DATA_DIR=data_dir)
    ref = str(tmp_path / "ref")
    subprocess.run(_cmd(ref), check=True, env=env, timeout=300, capture_output=True)

    run = str(tmp_path / "run")
    proc = subprocess.Popen(_cmd(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckdir = os.path.join(run, "checkpoints")
    deadline = time.time() + 240
    try:
        # kill once a few checkpoints exist, i.e. somewhere in the middle of the run
        while time.time() < deadline and proc.poll() is None:
            steps = [d for d in os.listdir(ckdir) if d.isdigit()] if os.path.isdir(ckdir) else []
            if len(steps) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "run finished before it could be killed; make it longer"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed_at = max(int(d) for d in os.listdir(ckdir) if d.isdigit())
    assert killed_at < 3 * 23, "killed too late"
    rerun = subprocess.run(_cmd(run), check=True, env=env, timeout=300, capture_output=True, text=True)
    resumed = [ln for ln in rerun.stdout.splitlines() if ln.startswith("jaxkd: resuming from checkpoint step")]
    assert resumed and int(resumed[0].split("step ")[1].split()[0]) > 0, rerun.stdout[-2000:]

    jax.tree.map(np.testing.assert_array_equal, _final_state(ref), _final_state(run))
    assert _history(ref) == _history(run)


TWO_STAGE = ("stages=[{'name': 'warmup', 'num_epochs': 1, 'method': {'name': 'ce'}}, "
             "{'name': 'kd', 'num_epochs': 2, 'method': {'name': 'hinton_kd', 'temperature': 4.0, "
             "'gamma': 0.1, 'alpha': {'type': 'linear', 'init': 0.9, 'end': 0.5}}}]")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["kd", "two_stage"])
def test_killed_at_random_points_and_during_a_save_ends_identical(tmp_path, data_dir, digits_teacher, recipe):
    """Kills (SIGKILL) after a random number of steps, again later, then in the middle of an
    asynchronous checkpoint save; each time the same command is run again. The end state and
    the metrics equal those of a run never interrupted (3 epochs, 69 steps, a save every 4)."""
    import random

    def cmd(workdir):
        c = [sys.executable, "-m", "jaxkd.cli", "train", "--config",
             os.path.join(ROOT, "experiments/configs/digits.py"), "--workdir", workdir,
             "train.num_epochs=3", "train.checkpoint_every_steps=4", "train.progress=False",
             "train.tensorboard=False", f"teacher.workdir={digits_teacher[0]}"]
        return c + ([TWO_STAGE] if recipe == "two_stage" else [])

    env = dict(os.environ, JAXKD_DATA_DIR=data_dir)
    ref = str(tmp_path / "ref")
    subprocess.run(cmd(ref), check=True, env=env, timeout=300, capture_output=True)

    rng = random.Random(recipe)
    first = rng.randint(2, 30)
    second = rng.randint(first + 6, 55)
    save_at = 4 * rng.randint(second // 4 + 2, 16)  # a checkpoint step after the second kill
    run = str(tmp_path / "run")
    for fault in (f"kill_at_step:{first}", f"kill_at_step:{second}", f"kill_during_save:{save_at}"):
        proc = subprocess.run(cmd(run), env=dict(env, JAXKD_FAULT=fault), timeout=300, capture_output=True,
                              text=True)
        assert proc.returncode == -signal.SIGKILL, (fault, proc.returncode, proc.stderr[-2000:])
    ckdir = os.path.join(run, "checkpoints")
    assert any("tmp" in d for d in os.listdir(ckdir)) or str(save_at) in os.listdir(ckdir)
    final = subprocess.run(cmd(run), check=True, env=env, timeout=300, capture_output=True, text=True)
    assert "jaxkd: resuming from checkpoint step" in final.stdout
    jax.tree.map(np.testing.assert_array_equal, _final_state(ref), _final_state(run))
    assert _history(ref) == _history(run)
