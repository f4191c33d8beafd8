"""The library core (losses, models, train steps) runs with only the fixed accelerator stack.

Accelerator images (the device check's H200 image: jax, flax, optax, orbax-checkpoint, chex,
torch) have no ml_collections, tensorflow-datasets, grain or tqdm: building and running a KD
step there must not import them. A child process blocks those imports and builds one.
"""

import os
import subprocess
import sys

CHILD = r"""
import sys

BLOCKED = ("ml_collections", "tensorflow_datasets", "grain", "tqdm", "tensorflow")


class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked for this test: {name}")
        return None


sys.meta_path.insert(0, Block())
import jax
import jax.numpy as jnp
import numpy as np

import jaxkd.losses
from jaxkd.models import create_model
from jaxkd.train import optim, recipes
from jaxkd.train import step as step_lib

student, teacher = create_model("mlp", 10, hidden=(8,)), create_model("cnn", 10, width=4, hidden=8)
recipe = recipes.hinton_kd_recipe(4.0, 0.9, 0.1)
tx, _ = optim.make_optimizer({"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
                              "schedule": "constant"}, 1, 1)
pipeline = step_lib.InputPipeline(mean=(0.5,), std=(0.25,), pad=1, flip=True)
sample = jnp.zeros((2, 8, 8, 1))
state = step_lib.create_train_state(jax.random.key(0), student, recipe, tx, sample)
t_vars = jax.jit(teacher.init)(jax.random.key(1), sample)
rng = np.random.default_rng(0)
batch = {"image": jnp.asarray(rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)),
         "label": jnp.asarray(rng.integers(0, 10, 4).astype(np.int32))}
state, metrics = step_lib.make_train_step(student, recipe, tx, pipeline, teacher=teacher)(state, t_vars, batch)
out = step_lib.make_eval_step(teacher, step_lib.InputPipeline(mean=(0.5,), std=(0.25,)))(t_vars, batch)
assert np.isfinite(float(metrics["loss"])) and float(out["count"]) == 4.0
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded
print("ok", float(metrics["loss"]))
"""


def test_train_step_needs_only_the_core_stack():
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")


def test_loop_exports_still_resolve():
    """The lazily imported loop and data pipeline names are still there for callers."""
    import jaxkd.data as data
    import jaxkd.train as train
    from jaxkd.train import loop

    assert train.train_and_evaluate is loop.train_and_evaluate
    assert train.TrainingError is loop.TrainingError
    assert data.load_dataset is data.pipeline.load_dataset
    assert callable(data.eval_batches)
