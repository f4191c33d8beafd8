"""The scripts in examples/ run, on tiny settings, each in a fresh process (as a user runs them).

* own_loop.py: a user's Flax model and optax loop with jaxkd's losses and taps, no jaxkd trainer;
* own_model.py: a user's model registered in a config file outside the package and distilled by
  ``jaxkd train`` (the CLI), with attention transfer on the taps the model sows;
* nnx_end_to_end.py: NNX teacher and student, sown taps, FitNets, Orbax checkpoints, an
  interrupted run that resumes exactly, and the student reloaded into NNX.
"""

import json
import math
import os
import subprocess
import sys

from conftest import child_xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name, *args, data_dir=None, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=child_xla_flags())
    if data_dir is not None:
        env["JAXKD_DATA_DIR"] = data_dir
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_own_loop():
    out = json.loads(run_example("own_loop.py", "--teacher-steps", "100", "--student-steps", "60").splitlines()[-1])
    assert out["teacher_accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert math.isfinite(out["last_loss"]) and out["last_loss"] < out["first_loss"]


def test_own_model_distilled_by_the_cli(tmp_path, data_dir):
    wd = str(tmp_path / "own")
    run_example("own_model.py", "--workdir", wd, "--epochs", "1", "data.num_train_examples=128",
                "train.tensorboard=False", data_dir=data_dir)
    teacher = json.load(open(os.path.join(wd, "teacher", "summary.json")))
    student = json.load(open(os.path.join(wd, "student", "summary.json")))
    assert (teacher["model"], teacher["method"]) == ("my_cnn", "ce")
    assert (student["model"], student["method"]) == ("my_cnn", "at")
    assert student["teacher_accuracy"] == teacher["best_accuracy"]  # distilled from that teacher
    last = records(os.path.join(wd, "student"))[-1]
    assert last["train/at"] > 0 and math.isfinite(last["train/at"])  # AT on the sown taps ran
    assert "train/kd" in last


def test_nnx_end_to_end(tmp_path, data_dir):
    wd = str(tmp_path / "nnx")
    out = json.loads(run_example("nnx_end_to_end.py", "--workdir", wd, "--epochs", "2", "--train-examples", "256",
                                 data_dir=data_dir).splitlines()[-1])
    assert out["resumed_exactly"] is True and out["resumed_from_step"] == 4
    # the reloaded NNX module gives the runner's accuracy for the best checkpoint
    assert abs(out["nnx_reloaded_accuracy"] - out["student_accuracy"]) < 1e-9
    student = records(os.path.join(wd, "student"))
    assert all(math.isfinite(r["train/hint"]) and r["train/hint"] > 0 for r in student)
    assert [r["step"] for r in student] == [4, 8]  # the record of the epoch before the restart is kept once
