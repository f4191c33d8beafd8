"""No recompilation after the first step: a run of 3 epochs (train steps, evals, checkpoints)
compiles exactly as many XLA programs as a run of 1 epoch."""

import os

import jax.monitoring

from jaxkd import config as config_lib
from jaxkd.train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_events: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _events.append(event) if event.endswith("backend_compile_duration") else None)


def _compiles(workdir, epochs, **over):
    c = config_lib.load_config(os.path.join(ROOT, "experiments/configs/digits.py"))
    c.method = {"name": "ce"}
    c.train.num_epochs, c.train.progress, c.train.tensorboard = epochs, False, False
    c.train.checkpoint_every_steps = 7
    c = config_lib.apply_overrides(c, [f"{k}={v!r}" for k, v in over.items()])
    before = len(_events)
    train_and_evaluate(c, workdir)
    return len(_events) - before


def test_no_recompilation_across_epochs_and_evals(tmp_path, data_dir):
    _compiles(str(tmp_path / "warm"), 1)  # module-level caches (data, constants) warm up here
    one = _compiles(str(tmp_path / "one"), 1)
    three = _compiles(str(tmp_path / "three"), 3)
    assert one > 0
    # 23 steps per epoch, an eval with a padded last batch each epoch, a save every 7 steps
    assert three == one, f"{three - one} extra compilations in epochs 2-3"
