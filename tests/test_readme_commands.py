"""Every shell command shown in README.md works: parsed out of the README at test time (so a
changed README is what is tested), run on tiny settings in a temporary directory.

The README's commands train for many epochs; ``TINY`` is appended to each, so the same command
runs for one epoch on 64 training digits. A command is either run or on ``EXEMPT`` with the
reason; anything else shown in a code block (an install line, ...) must match ``NOT_JAXKD``.
"""

import os
import re
import shlex

import jax
import jax.numpy as jnp
import pytest

from jaxkd import cli
from jaxkd import config as config_lib
from jaxkd import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

# appended to every command (later overrides win): one epoch of one batch
TINY = ["train.num_epochs=1", "data.num_train_examples=64", "train.progress=False", "train.tensorboard=False"]
NO_PROGRESS = {"compare", "refine", "cache-teacher"}  # commands with a --no-progress flag

# (pattern on the command line, reason): commands shown but not run here
EXEMPT = [
    (r"configs/cifar100\.py", "CIFAR-100 is a tfds download (needs the network, which tests never use) "
                              "and its ResNets take minutes a step on 2 CPU cores"),
]
# shell lines in the README's code blocks that are not jaxkd commands (never run by this test)
NOT_JAXKD = [
    (r"^python3? -m venv ", "creates a virtual environment (installation)"),
    (r"^(\S*/)?pip3? install ", "installs packages (installation; needs the network)"),
    (r"^(\S*/)?python3? -m pytest\b", "runs this test suite"),
    (r"^apt-get ", "system package installation"),
]


def readme_commands(path=README):
    """``[(line, argv)]``: every ``jaxkd`` command in the README's bash/sh code blocks (backslash
    continuations joined, ``#`` comments dropped, ``a && b`` split), ``argv`` without the
    program name; and the other shell segments as ``(line, None)``."""
    with open(path) as f:
        text = f.read()
    out = []
    for block in re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if not tokens:
                continue
            segments, current = [], []
            for tok in tokens + ["&&"]:
                if tok in ("&&", ";", "||"):
                    if current:
                        segments.append(current)
                    current = []
                else:
                    current.append(tok)
            for seg in segments:
                text_seg = shlex.join(seg)
                if os.path.basename(seg[0]) == "jaxkd":
                    out.append((text_seg, seg[1:]))
                else:
                    out.append((text_seg, None))
    return out


def _exemption(line):
    for pattern, reason in EXEMPT:
        if re.search(pattern, line):
            return reason
    return None


def _tiny_argv(argv):
    """The command with the config path made absolute and ``TINY`` (and --no-progress) appended."""
    argv = list(argv)
    if "--config" in argv:
        i = argv.index("--config") + 1
        if not os.path.isabs(argv[i]):
            argv[i] = os.path.join(ROOT, argv[i])
    return argv + (["--no-progress"] if argv[0] in NO_PROGRESS else []) + TINY


def _runnable():
    return [(line, argv) for line, argv in readme_commands() if argv is not None and _exemption(line) is None]


def test_readme_is_parsed_into_commands_and_every_other_line_is_known():
    cmds = readme_commands()
    jaxkd_cmds = [argv for _, argv in cmds if argv is not None]
    assert len(jaxkd_cmds) >= 5 and {a[0] for a in jaxkd_cmds} >= {"train", "eval", "compare"}
    unknown = [line for line, argv in cmds
               if argv is None and not any(re.search(p, line) for p, _ in NOT_JAXKD)]
    assert not unknown, f"README shows shell lines this test neither runs nor exempts: {unknown}"
    # the parser itself: continuations, comments and && chains
    sample = "```bash\npython3 -m venv .venv && .venv/bin/jaxkd compare --config c.py \\\n  --seeds 0,1  # note\n```\n"
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".md", delete=False) as f:
        f.write(sample)
    try:
        assert readme_commands(f.name) == [("python3 -m venv .venv", None),
                                           (".venv/bin/jaxkd compare --config c.py --seeds 0,1",
                                            ["compare", "--config", "c.py", "--seeds", "0,1"])]
    finally:
        os.remove(f.name)


@pytest.mark.parametrize("line,argv", _runnable(), ids=[line[:70] for line, _ in _runnable()])
def test_readme_command_parses_and_its_config_builds_its_models(line, argv):
    """Fast for every command: the CLI accepts it, its config loads with its overrides and
    validates, and the student and teacher models it names build from their kwargs (the
    trap: ``model.name=cnn`` on a config whose ``model.kwargs`` were set for ``mlp``)."""
    argv = _tiny_argv(argv)
    args, extra = cli._parser().parse_known_args(argv)
    assert not [e for e in extra if e.startswith("-") or "=" not in e], extra
    cfg = config_lib.apply_overrides(config_lib.load_config(args.config), list(args.overrides) + extra)
    config_lib.validate(cfg)
    for section in ("model", "teacher"):
        m = models.create_model(cfg[section].name, 10, **dict(cfg[section].kwargs))
        m.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))


def test_readmes_first_train_command_runs(tmp_path, data_dir, monkeypatch, capsys):
    """The first ``jaxkd train`` command of the README, run as shown (plus ``TINY``)."""
    line, argv = next((line, argv) for line, argv in _runnable() if argv[0] == "train")
    monkeypatch.chdir(tmp_path)
    assert cli.run(_tiny_argv(argv)) == 0, line
    out = capsys.readouterr().out
    assert '"steps": 1' in out, out[-1000:]


@pytest.mark.slow
def test_every_readme_command_runs_in_order(tmp_path, data_dir, monkeypatch, capsys):
    """All commands, in README order in one directory (later ones use the work dirs of earlier
    ones: ``teacher.workdir=runs/teacher``), each on ``TINY`` settings."""
    monkeypatch.chdir(tmp_path)
    for line, argv in _runnable():
        try:
            rc = cli.run(_tiny_argv(argv))
        except SystemExit as e:  # argparse
            rc = e.code
        assert rc == 0, f"README command failed: {line}"
    capsys.readouterr()
