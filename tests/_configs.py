"""Configs shared by the test files (the digits config with tiny models, no progress output)."""

import os

from jaxkd import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_digits_config(**over):
    """digits.py with a 16-unit mlp student, a width-4 cnn teacher, 128 images, one epoch."""
    c = config_lib.load_config(os.path.join(ROOT, "experiments/configs/digits.py"))
    c.model.kwargs = {"hidden": (16,)}
    c.teacher.kwargs = {"width": 4, "hidden": 16}
    c.data.num_train_examples = 128
    c.train.progress = c.train.tensorboard = False
    c.train.num_epochs = 1
    return config_lib.apply_overrides(c, [f"{k}={v!r}" for k, v in over.items()])
