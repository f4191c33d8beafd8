"""Your own model, registered and distilled by `jaxkd train` from this config file.

The file is a jaxkd config (it defines ``get_config()``) that also defines and registers a Linen
model, so `jaxkd train --config examples/own_model.py` knows the name ``my_cnn``. Train a wide
teacher with cross-entropy, then distil a narrow student with attention transfer on the taps the
model sows (``block1``, ``block2``) plus Hinton KD:

    jaxkd train --config examples/own_model.py --workdir runs/own/teacher \\
        method.name=ce model.kwargs.width=32
    jaxkd train --config examples/own_model.py --workdir runs/own/student teacher.workdir=runs/own/teacher

or both in one go: ``python examples/own_model.py --workdir runs/own [--epochs 3] [key=value ...]``.
"""
import argparse
import os
import sys

import flax.linen as nn

from jaxkd.config import base_config
from jaxkd.models import register_model


class MyCNN(nn.Module):
    num_classes: int
    width: int = 8

    @nn.compact
    def __call__(self, x, train: bool):
        for i, w in enumerate((self.width, 2 * self.width)):
            x = nn.Conv(w, (3, 3), use_bias=False)(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
            self.sow("intermediates", f"block{i + 1}", x)    # feature taps "block1", "block2"
        return nn.Dense(self.num_classes)(x.mean((1, 2)))


def my_cnn(num_classes: int, width: int = 8):
    return MyCNN(num_classes, width)


register_model("my_cnn", my_cnn, overwrite=True)  # overwrite: the file may be loaded more than once


def get_config():
    c = base_config()
    c.data.name, c.data.batch_size = "digits", 64
    c.model.name, c.model.kwargs = "my_cnn", {"width": 4}
    c.teacher.name, c.teacher.kwargs = "my_cnn", {"width": 32}
    c.method = {"name": "at", "student_layers": ("block1", "block2"), "alpha": 0.9, "gamma": 0.1,
                "temperature": 4.0}
    c.optim.lr, c.optim.schedule = 0.05, "cosine"
    c.train.num_epochs = 10
    return c


def main(argv=None):
    from jaxkd import cli

    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="runs/own")
    p.add_argument("--epochs", type=int, default=None)
    args, overrides = p.parse_known_args(argv)
    if args.epochs:
        overrides.append(f"train.num_epochs={args.epochs}")
    me = os.path.abspath(__file__)
    teacher = os.path.join(args.workdir, "teacher")
    for argv_ in (["train", "--config", me, "--workdir", teacher, "method.name=ce", "model.kwargs.width=32"],
                  ["train", "--config", me, "--workdir", os.path.join(args.workdir, "student"),
                   f"teacher.workdir={teacher}"]):
        if cli.run(argv_ + overrides + ["train.progress=False"]) != 0:
            sys.exit(1)


if __name__ == "__main__":
    main()
