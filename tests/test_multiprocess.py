"""Two processes on 127.0.0.1 (jax.distributed, gloo) train data-parallel KD like one process.

Every process is started in its own session and the whole group is killed on timeout, so a
hanging collective never leaves processes behind.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxkd import config as config_lib
from jaxkd.train import checkpoint as ckpt_lib
from jaxkd.train.loop import train_and_evaluate

from conftest import child_xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments/configs/digits.py")
# KD from a trained teacher, 2 epochs of 23 steps, a checkpoint every 5 steps; one step in
# flight (multi-process CPU collectives stall when many steps are queued)
OVERRIDES = ["train.num_epochs=2", "train.checkpoint_every_steps=5", "train.max_inflight_steps=1",
             "train.progress=False", "train.tensorboard=False"]
TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir, teacher, n=2):
    port = _free_port()
    env = dict(os.environ)
    env["XLA_FLAGS"] = child_xla_flags()  # one CPU device per process
    procs = []
    for i in range(n):
        cmd = [sys.executable, "-m", "jaxkd.cli", "train", "--config", CONFIG, "--workdir", workdir,
               *OVERRIDES, f"teacher.workdir={teacher}", "--coordinator", f"127.0.0.1:{port}",
               "--num-processes", str(n), "--process-id", str(i)]
        log = open(os.path.join(os.path.dirname(workdir), f"{os.path.basename(workdir)}.p{i}.log"), "w")
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return procs


def _kill(procs):
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        p.wait(timeout=30)


def _wait(procs, workdir, until=None):
    """Waits for all processes (or for ``until()`` to hold); kills the group on timeout."""
    deadline = time.time() + TIMEOUT
    try:
        while time.time() < deadline:
            if until is not None and until():
                return
            if all(p.poll() is not None for p in procs):
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"multi-process run in {workdir} did not finish within {TIMEOUT} s")
    finally:
        if until is None or any(p.poll() is None for p in procs):
            _kill(procs)
    logs = [open(os.path.join(os.path.dirname(workdir), f"{os.path.basename(workdir)}.p{i}.log")).read()
            for i in range(len(procs))]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return logs


def _history(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(ln).items() if k != "time_s"} for ln in f]


@pytest.fixture(scope="module")
def teacher_and_reference(tmp_path_factory, digits_teacher):
    """The session's trained teacher and the one-process KD run with the same global batch."""
    root = tmp_path_factory.mktemp("mp")
    base = config_lib.apply_overrides(config_lib.load_config(CONFIG), OVERRIDES)
    teacher = digits_teacher[0]
    ref = str(root / "ref")
    train_and_evaluate(config_lib.apply_overrides(base, [f"teacher.workdir={teacher!r}", "train.num_devices=1"]),
                       ref)
    return teacher, ref


def test_two_processes_match_one(tmp_path, teacher_and_reference):
    teacher, ref = teacher_and_reference
    run = str(tmp_path / "mp")
    _wait(_start(run, teacher), run)
    step_ref, s_ref = ckpt_lib.load_run_state(ref)
    step_mp, s_mp = ckpt_lib.load_run_state(run)
    assert step_ref == step_mp == 46
    # same global batch and data order; only the cross-process sum order differs
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), s_ref, s_mp)
    h_ref, h_mp = _history(ref), _history(run)
    assert [r["step"] for r in h_ref] == [r["step"] for r in h_mp]
    np.testing.assert_allclose([r["eval/accuracy"] for r in h_ref], [r["eval/accuracy"] for r in h_mp],
                               atol=1.5 / 297)  # at most one of 297 test digits flips
    # one lock per process, and the checkpoint holds process 0's data position, valid for both
    assert sorted(f for f in os.listdir(run) if f.startswith(".lock")) == [".lock.process0", ".lock.process1"]


@pytest.mark.slow
def test_two_processes_killed_and_restarted_end_identical(tmp_path, teacher_and_reference):
    teacher, _ = teacher_and_reference
    full, run = str(tmp_path / "full"), str(tmp_path / "killed")
    _wait(_start(full, teacher), full)
    ckdir = os.path.join(run, "checkpoints")

    def mid_run():
        return os.path.isdir(ckdir) and len([d for d in os.listdir(ckdir) if d.isdigit()]) >= 3

    procs = _start(run, teacher)
    _wait(procs, run, until=mid_run)
    _kill(procs)
    killed_at = max(int(d) for d in os.listdir(ckdir) if d.isdigit())
    assert killed_at < 46, "the run ended before it was killed"
    logs = _wait(_start(run, teacher), run)
    assert "resuming from checkpoint step" in logs[0], logs[0][-2000:]
    jax.tree.map(np.testing.assert_array_equal, ckpt_lib.load_run_state(full)[1], ckpt_lib.load_run_state(run)[1])
    assert _history(full) == _history(run)
