"""The generic train loop, the step builder, recipes, optimizers and checkpoints."""

from jaxkd.train.loop import TrainingError, evaluate, train_and_evaluate
from jaxkd.train.recipes import RECIPES, LossInputs, Recipe, build_recipe, make_weight_schedule
from jaxkd.train.step import (InputPipeline, TrainState, create_train_state, make_eval_step, make_mesh,
                              make_train_step, shard_batch)

__all__ = ["RECIPES", "InputPipeline", "LossInputs", "Recipe", "TrainState", "TrainingError", "build_recipe",
           "create_train_state", "evaluate", "make_eval_step", "make_mesh", "make_train_step",
           "make_weight_schedule", "shard_batch", "train_and_evaluate"]
