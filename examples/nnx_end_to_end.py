"""Flax NNX end to end: an NNX teacher and an NNX student, feature taps by ``sow``, trained,
checkpointed with Orbax, resumed exactly, distilled with FitNets, and loaded back into NNX.

    python examples/nnx_end_to_end.py --workdir runs/nnx [--epochs 5] [--train-examples 512]

1. ``CNN`` is an ordinary ``nnx.Module``. It sows its blocks' outputs as ``nnx.Intermediate``
   (``self.sow(nnx.Intermediate, "block2", x)``); :func:`jaxkd.models.from_nnx` runs every call
   under ``nnx.capture`` and hands them to the recipes as the feature taps ``"block1"``, ``"block2"``.
2. ``register_model`` makes it a model name, so the jaxkd runner (``train_and_evaluate``) trains it:
   Orbax checkpoints of params, BatchNorm statistics, optimizer state, RNG and data position.
3. The teacher (width 16) trains with cross-entropy; the student (width 4) is distilled with
   FitNets (``CE + beta * hint``: a regressor maps the student's ``block2`` to the teacher's).
   The distillation is interrupted half way and restarted in the same work dir, and ends with
   exactly the params of an uninterrupted run (checked here, bit for bit).
4. The best student checkpoint goes back into a fresh NNX module (``nnx.update``) and is
   evaluated in plain NNX, matching the runner's own evaluation.
"""
import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxkd
from jaxkd.config import base_config
from jaxkd.models import from_nnx, register_model


class CNN(nnx.Module):
    def __init__(self, width: int, num_classes: int = 10, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, width, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(width, rngs=rngs)
        self.conv2 = nnx.Conv(width, 2 * width, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(2 * width, rngs=rngs)
        self.head = nnx.Linear(2 * width, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        self.sow(nnx.Intermediate, "block1", x)
        x = nnx.relu(self.bn2(self.conv2(x)))
        self.sow(nnx.Intermediate, "block2", x)
        pooled = x.mean((1, 2))
        return self.head(pooled), {"embedding": pooled}


def nnx_cnn(num_classes: int, width: int = 8, init_seed: int = 0):
    """The registered builder: a ``ModelFns`` (an NNX module is initialised when it is built, from
    ``init_seed``; jaxkd's ``config.seed`` still drives the data order and the step's RNG)."""
    fns, _ = from_nnx(CNN(width, num_classes, rngs=nnx.Rngs(init_seed)), f"nnx_cnn{width}")
    return fns


register_model("nnx_cnn", nnx_cnn, overwrite=True)


def make_config(epochs: int, train_examples: int | None):
    c = base_config()
    c.data.name, c.data.batch_size, c.data.num_train_examples = "digits", 64, train_examples
    c.teacher.name, c.teacher.kwargs = "nnx_cnn", {"width": 16}
    c.model.name, c.model.kwargs = "nnx_cnn", {"width": 4, "init_seed": 1}
    c.method = {"name": "fitnets", "student_layer": "block2", "teacher_layer": "block2", "beta": 10.0}
    c.optim.lr, c.optim.schedule = 0.05, "cosine"
    c.train.num_epochs, c.train.progress, c.train.tensorboard = epochs, False, False
    return c


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="runs/nnx")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-examples", type=int, default=None)
    args = p.parse_args(argv)
    jaxkd.apply_cpu_defaults()
    from jaxkd.experiment import teacher_config
    from jaxkd.train import checkpoint as ckpt_lib
    from jaxkd.train import setup as setup_lib
    from jaxkd.train.loop import train_and_evaluate

    config = make_config(args.epochs, args.train_examples)
    teacher_dir = os.path.join(args.workdir, "teacher")
    teacher = train_and_evaluate(teacher_config(config), teacher_dir)  # config.teacher, CE, all data

    config.teacher.workdir = teacher_dir
    run, ref = os.path.join(args.workdir, "student"), os.path.join(args.workdir, "student_uninterrupted")
    steps_per_epoch = (args.train_examples or 1500) // config.data.batch_size
    half = max(1, args.epochs * steps_per_epoch // 2)
    train_and_evaluate(config, run, stop_after_steps=half)        # "killed" after a checkpoint
    student = train_and_evaluate(config, run)                     # restarted: resumes at `half`
    train_and_evaluate(config, ref)
    (_, a), (_, b) = ckpt_lib.load_run_state(run), ckpt_lib.load_run_state(ref)
    exact = all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    # the best distilled student, back in a fresh NNX module, evaluated in plain NNX
    info, eval_src, _, pipeline, variables, _ = setup_lib.build_eval(config, run)
    model = CNN(4, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    nnx.replace_by_pure_dict(params, variables["params"])
    nnx.replace_by_pure_dict(rest, variables["model_state"])
    model = nnx.merge(graphdef, params, rest)
    model.eval()
    batch = eval_src.gather(np.arange(len(eval_src)))
    x = pipeline(None, jnp.asarray(batch["image"]), train=False)  # normalised as in training
    (logits, _), _taps = nnx.capture(model, nnx.Intermediate)(x)  # (sow needs nnx.capture outside jaxkd too)
    nnx_accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == batch["label"]))
    out = {"teacher_accuracy": teacher["best_accuracy"], "student_accuracy": student["best_accuracy"],
           "nnx_reloaded_accuracy": nnx_accuracy, "resumed_from_step": half, "resumed_exactly": exact}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
