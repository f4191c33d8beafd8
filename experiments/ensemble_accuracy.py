"""Test accuracy of each teacher and of their ensemble (mean of softmax outputs).

    python experiments/ensemble_accuracy.py --config experiments/configs/digits_ensemble.py WORKDIR...
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import config as config_lib
from jaxkd import data as data_lib
from jaxkd import models as models_lib
from jaxkd.train import setup as setup_lib, step as step_lib
from jaxkd.train.recipes import build_recipe


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("workdirs", nargs="+")
    args = ap.parse_args()
    cfg = config_lib.load_config(args.config)
    cfg.teachers = [{"workdir": w} for w in args.workdirs]
    d = cfg.data
    info, _, eval_src = data_lib.load_dataset(d.name, data_dir=d.data_dir, train_split=d.train_split,
                                              eval_split=d.eval_split, builder_kwargs=dict(d.builder_kwargs))
    pipeline = step_lib.InputPipeline(mean=tuple(info.mean), std=tuple(info.std))
    sample = jnp.zeros((1, *info.input_shape), jnp.float32)
    single = models_lib.create_model(cfg.teacher.name, info.num_classes, **dict(cfg.teacher.kwargs))
    recipes = [build_recipe({"name": "ensemble_kd"})]
    model, variables, _ = setup_lib.load_teachers(cfg, single, sample, recipes, info.num_classes)
    probs = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, pipeline(None, x, train=False), train=False)[0]))
    correct_each, correct_ens, n = 0, 0, 0
    for batch in data_lib.eval_batches(eval_src, d.eval_batch_size):
        p = np.asarray(probs(variables, jnp.asarray(batch["image"])))  # [N, B, C]
        m = np.asarray(batch["mask"]).astype(bool)
        y = np.asarray(batch["label"])[m]
        p = p[:, m]
        correct_each = correct_each + (p.argmax(-1) == y).sum(-1)
        correct_ens += int((p.mean(0).argmax(-1) == y).sum())
        n += int(m.sum())
    out = {"teachers": [float(c) / n for c in correct_each], "ensemble": correct_ens / n, "count": n}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
