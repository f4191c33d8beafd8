"""The generic train loop, the step builder, recipes, optimizers and checkpoints.

The step builder, recipes and optimizers need only the fixed stack (jax, flax, optax, chex);
the loop (``train_and_evaluate``, ``evaluate``, ``TrainingError``) also needs the runner's
dependencies (ml_collections, tfds, grain, orbax) and is imported on first use, so research
code, benchmarks and accelerator images without those can still build and run train steps.
"""

from jaxkd.train.recipes import LossInputs, Recipe, build_recipe, list_recipes, make_weight_schedule, register_recipe
from jaxkd.train.step import (InputPipeline, TrainState, create_train_state, make_eval_step, make_mesh,
                              make_train_step, shard_batch)

_LOOP_EXPORTS = ("TrainingError", "evaluate", "train_and_evaluate")


def __getattr__(name: str):
    if name in _LOOP_EXPORTS:
        from jaxkd.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'jaxkd.train' has no attribute {name!r}")


__all__ = ["InputPipeline", "LossInputs", "Recipe", "TrainState", "TrainingError", "build_recipe",
           "create_train_state", "evaluate", "make_eval_step", "make_mesh", "make_train_step",
           "list_recipes", "make_weight_schedule", "register_recipe", "shard_batch", "train_and_evaluate"]
