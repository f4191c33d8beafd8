"""jaxkd's distillation methods: each module builds recipes and registers them by name.

Importing this package registers every built-in method (``ce``, ``hinton_kd``, ``fitnets``,
``fitnets_hint``, ``at``, ``fsp``, ``bss``, ``apprentice``, ``label_refinery``, ``ensemble_kd``,
``random_teacher_kd``, ``relabel_kd``, ``relabel_data_kd``, ``meal_v2``, ``crd``, ``dkd``, ``dist``,
``hinton_kd_ls``, ``tinybert``, ``minilm``, ``sskd``, ``sskd_teacher_head``); :func:`build_recipe` then builds any
registered one from ``config.method``. A method of your own registers the same way, with
:func:`jaxkd.core.register_recipe`, from its own module or config file.
"""

from jaxkd.core import build_recipe, list_recipes, recipe_options, register_recipe
from jaxkd.methods import (apprentice, bss, crd, ensemble, feature_kd, kd, label_refinery, logit_kd, meal, sskd,
                           transformer_kd)

__all__ = ["apprentice", "bss", "build_recipe", "crd", "ensemble", "feature_kd", "kd", "label_refinery",
           "list_recipes", "logit_kd", "meal", "recipe_options", "register_recipe", "sskd", "transformer_kd"]
