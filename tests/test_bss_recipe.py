"""BSS wired into the generic loop: runs end to end, compiles the step once per run."""

import os

import pytest

from jaxkd import config as config_lib
from jaxkd.train import step as step_lib
from jaxkd.train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**over):
    c = config_lib.load_config(os.path.join(ROOT, "experiments/configs/digits.py"))
    c.train.progress = c.train.tensorboard = False
    return config_lib.apply_overrides(c, [f"{k}={v!r}" for k, v in over.items()])


@pytest.fixture
def compiled(monkeypatch):
    """Records every jitted train/eval step the loop builds, to count their compilations."""
    built = []
    for name in ("make_train_step", "make_eval_step"):
        original = getattr(step_lib, name)

        def wrapper(*a, _original=original, _name=name, **k):
            fn = _original(*a, **k)
            built.append((_name, fn))
            return fn
        monkeypatch.setattr(step_lib, name, wrapper)
    return built


def test_bss_and_kd_runs_compile_each_step_once(tmp_path, digits_teacher, compiled):
    teacher_wd, _ = digits_teacher
    summary = train_and_evaluate(_config(**{"method": {"name": "bss", "temperature": 3.0},
                                            "teacher.workdir": teacher_wd, "train.num_epochs": 2,
                                            "data.num_train_examples": 512}),
                                 str(tmp_path / "bss"))
    assert summary["steps"] == 2 * (512 // 64)
    import json
    from jaxkd.methods.bss import bss_weights
    hist = [json.loads(ln) for ln in open(os.path.join(tmp_path, "bss", "metrics.jsonl"))]
    # the logged loss is the BSS objective with the paper's schedule over the run's 2 epochs:
    # clean + r_adv(epoch) * adversarial (r_adv is constant within an epoch)
    for rec in hist:
        r_adv = float(bss_weights(rec["epoch"], 2)[1])  # epochs counted from 1, as the reference
        assert rec["train/loss"] == pytest.approx(rec["train/clean"] + r_adv * rec["train/adversarial"], rel=1e-5)
    # the attack really moves samples across the teacher's boundary (needs gradients w.r.t.
    # the teacher's input inside the step): most base samples reach their target class
    assert hist[-1]["train/bss_valid"] > 0
    assert hist[-1]["train/bss_target"] > 0.5
    assert 0 < hist[-1]["train/bss_iters"] < 10
    # two epochs with varying BSS loop lengths and two evals: one compilation each
    assert [n for n, _ in compiled] == ["make_eval_step", "make_train_step"]
    for name, fn in compiled:
        assert fn._cache_size() == 1, name
