"""Configs shared by the test files (the digits config with tiny models, no progress output)."""

import os

from jaxkd import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "experiments/configs/digits.py")

# The session's digits teacher (conftest.digits_teacher): experiments/configs/digits.py's cnn
# (width 32) trained 2 epochs on all 1,500 training digits.
TEACHER_EPOCHS = 2


def digits_config(**over):
    """experiments/configs/digits.py without progress bars or TensorBoard, plus overrides."""
    c = config_lib.load_config(DIGITS)
    c.train.progress = c.train.tensorboard = False
    return config_lib.apply_overrides(c, [f"{k}={v!r}" for k, v in over.items()])


def tiny_digits_config(**over):
    """digits.py with a 16-unit mlp student, a width-4 cnn teacher, 128 images, one epoch."""
    c = digits_config()
    c.model.kwargs = {"hidden": (16,)}
    c.teacher.kwargs = {"width": 4, "hidden": 16}
    c.data.num_train_examples = 128
    c.train.num_epochs = 1
    return config_lib.apply_overrides(c, [f"{k}={v!r}" for k, v in over.items()])
