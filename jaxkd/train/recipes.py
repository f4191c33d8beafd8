"""Recipes for the train step: the registry of :mod:`jaxkd.core` with jaxkd's methods loaded.

Kept for callers that build steps by hand (benchmarks, research code): ``build_recipe``,
``hinton_kd_recipe`` and the types, from one import. The methods live in :mod:`jaxkd.methods`,
the registry in :mod:`jaxkd.core`.
"""

from jaxkd.core import LossFn, LossInputs, Recipe, build_recipe, list_recipes, make_weight_schedule, register_recipe
from jaxkd.methods.kd import cross_entropy_recipe, hinton_kd_recipe

__all__ = ["LossFn", "LossInputs", "Recipe", "build_recipe", "cross_entropy_recipe", "hinton_kd_recipe",
           "list_recipes", "make_weight_schedule", "register_recipe"]
