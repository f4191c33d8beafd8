"""User models in the generic loop: an NNX student registered by name trains like a built-in."""

import os

import pytest
from flax import nnx

from jaxkd import config as config_lib
from jaxkd import models
from jaxkd.models import registry
from jaxkd.train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class NnxMLP(nnx.Module):
    def __init__(self, num_classes: int, hidden: int, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(64, hidden, rngs=rngs)
        self.bn = nnx.BatchNorm(hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn(self.fc1(x.reshape((x.shape[0], -1)))))
        logits = self.fc2(h)
        return logits, {"embedding": h, "logits": logits}


def _nnx_builder(num_classes, hidden: int = 32):
    fns, _ = models.from_nnx(NnxMLP(num_classes, hidden, nnx.Rngs(0)), "nnx_mlp")
    return fns


@pytest.fixture
def nnx_registered(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "nnx_mlp", _nnx_builder)


def test_nnx_student_trains_in_the_loop(tmp_path, data_dir, nnx_registered):
    c = config_lib.load_config(os.path.join(ROOT, "experiments/configs/digits.py"))
    c.model.name, c.model.kwargs = "nnx_mlp", {"hidden": 32}
    c.method = {"name": "ce"}
    c.train.num_epochs, c.train.progress, c.train.tensorboard = 3, False, False
    summary = train_and_evaluate(c, str(tmp_path / "nnx"))
    assert summary["best_accuracy"] > 0.8  # digits: 10 classes, chance is 0.1


def test_register_model_errors():
    with pytest.raises(ValueError, match="already registered"):
        models.register_model("mlp", lambda num_classes: None)
    with pytest.raises(ValueError, match="num_classes"):
        models.register_model("x_new", lambda n: None)
