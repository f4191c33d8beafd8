"""The `jaxkd` command: one clear error line for bad input; train/eval/compare on digits."""

import json
import os
import subprocess
import sys

import pytest

from jaxkd import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "experiments/configs/digits.py")


def _main(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.mark.parametrize("override,expected", [
    ("optim.lr=-1", "config.optim.lr must be a number > 0; got -1"),
    ("optim.learning_rate=0.1", "unknown config key 'optim.learning_rate'; did you mean 'optim.lr'?"),
    ("model.name=resnet33", "config.model: unknown model 'resnet33'. Did you mean 'resnet32'"),
    ("data.name=cifar1000", "cifar1000"),
    ("method.name=hinton", "config.method.name: unknown method 'hinton'; did you mean 'hinton_kd'?"),
    ("method.temprature=2", "method 'hinton_kd' has no option 'temprature'; did you mean 'temperature'?"),
    ("train.num_epochs=0", "config.train.num_epochs must be a positive int"),
])
def test_bad_input_gives_one_error_line(capsys, tmp_path, data_dir, override, expected):
    code, _, err = _main(capsys, "train", "--config", DIGITS, "--workdir", str(tmp_path / "w"), override)
    assert code == 2
    assert err.startswith("jaxkd: error: ")
    assert expected in err
    assert "Traceback" not in err


def test_missing_teacher_and_config_file(capsys, tmp_path, data_dir):
    code, _, err = _main(capsys, "train", "--config", DIGITS, "--workdir", str(tmp_path / "w"),
                         f"teacher.workdir={tmp_path / 'nope'}")
    assert code == 2 and "teacher work dir" in err and "does not exist" in err
    code, _, err = _main(capsys, "train", "--config", str(tmp_path / "missing.py"), "--workdir", str(tmp_path))
    assert code == 2 and "missing.py" in err


def test_train_eval_compare(capsys, tmp_path, data_dir):
    wd = str(tmp_path / "t")
    common = ["train.num_epochs=1", "train.progress=False", "train.tensorboard=False",
              "teacher.kwargs={'width': 4, 'hidden': 16}", "model.kwargs={'hidden': (16,)}"]
    code, out, _ = _main(capsys, "train", "--config", DIGITS, "--workdir", wd, "method.name=ce", *common)
    assert code == 0
    summary = json.loads(out[out.index("{"):])
    code, out, _ = _main(capsys, "eval", "--config", DIGITS, "--workdir", wd, "--checkpoint", "best", *common)
    assert code == 0
    result = json.loads(out[out.index("{"):])
    assert result["accuracy"] == pytest.approx(summary["best_accuracy"])
    assert result["count"] == 297
    cw = str(tmp_path / "c")
    code, out, _ = _main(capsys, "compare", "--config", DIGITS, "--workdir", cw, "--no-progress", *common)
    assert code == 0
    assert "| teacher | cnn |" in out and "| baseline | mlp |" in out and "| hinton_kd | mlp |" in out
    for name in ("results.md", "results.json", "curves.png"):
        assert os.path.exists(os.path.join(cw, name))
    # a second comparison (limited data) reuses the finished teacher instead of training one
    cw2 = str(tmp_path / "c2")
    code, out, _ = _main(capsys, "compare", "--config", DIGITS, "--workdir", cw2, "--no-progress", *common,
                         "--methods", "kd,bss",
                         f"teacher.workdir={os.path.join(cw, 'teacher')}", "data.num_train_examples=300")
    assert code == 0 and not os.path.exists(os.path.join(cw2, "teacher"))
    assert "train examples: 300" in out
    assert "| kd | mlp |" in out and "| bss | mlp |" in out
    bss_cfg = json.load(open(os.path.join(cw2, "bss", "seed0", "summary.json")))
    assert bss_cfg["method"] == "bss"
    rows = json.load(open(os.path.join(cw2, "results.json")))
    assert rows[0]["best_mean"] == json.load(open(os.path.join(cw, "results.json")))[0]["best_mean"]


def test_console_script_installed():
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "jaxkd"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "compare" in proc.stdout
