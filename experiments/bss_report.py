"""Measures the BSS generator on a trained teacher and student (stop reasons, iterations).

    python experiments/bss_report.py --config experiments/configs/digits.py \
        --teacher-workdir runs/digits/teacher --student-workdir runs/digits/baseline/seed0

Runs the generator over the evaluation split in batches (the same options as training:
eta 0.3, at most 10 iterations, clamp [-2.5, 2.5], at most 64 base samples per batch) and
prints, over all valid base samples: the fraction whose teacher prediction reaches the sampled
target class, reaches another class, or hits the iteration cap, and the mean iterations.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import config as config_lib
from jaxkd import data as data_lib
from jaxkd import models
from jaxkd.methods import bss
from jaxkd.train import checkpoint as ckpt_lib
from jaxkd.train.step import InputPipeline


def measure(config, teacher_workdir: str, student_workdir: str, batch_size: int = 64, seed: int = 0,
            options: bss.BSSOptions = bss.BSSOptions()) -> dict:
    d = config.data
    info, _, eval_src = data_lib.load_dataset(d.name, data_dir=d.data_dir, builder_kwargs=dict(d.builder_kwargs))
    sample = jnp.zeros((1, *info.input_shape), jnp.float32)
    teacher = models.create_model(config.teacher.name, info.num_classes, **dict(config.teacher.kwargs))
    student = models.create_model(config.model.name, info.num_classes, **dict(config.model.kwargs))
    t_vars, _ = ckpt_lib.load_model_variables(teacher_workdir, teacher.init(jax.random.PRNGKey(0), sample))
    s_vars, _ = ckpt_lib.load_model_variables(student_workdir, student.init(jax.random.PRNGKey(0), sample),
                                              what="student")
    pipeline = InputPipeline(mean=tuple(info.mean), std=tuple(info.std))

    def teacher_logits(variables, x):
        return teacher.apply(variables, x, train=False)[0]

    @jax.jit
    def student_logits(x):
        return student.apply(s_vars, x, train=False)[0]

    totals = {"num_valid": 0, "target": 0, "other": 0, "max_iters": 0, "iterations": 0.0, "batches": 0}
    rng = jax.random.PRNGKey(seed)
    for i, batch in enumerate(data_lib.eval_batches(eval_src, batch_size)):
        mask = np.asarray(batch["mask"])
        if not mask.all():  # the padded last batch: drop it rather than attack padding
            continue
        x = pipeline(None, jnp.asarray(batch["image"]), train=False)
        labels = jnp.asarray(batch["label"])
        result = bss.boundary_supporting_samples(teacher_logits, t_vars, x, labels, student_logits(x),
                                                 jax.random.fold_in(rng, i), options)
        stats = bss.bss_statistics(result)
        n = stats["num_valid"]
        totals["num_valid"] += n
        totals["target"] += round(stats["target_fraction"] * n)
        totals["other"] += round(stats["other_fraction"] * n)
        totals["max_iters"] += round(stats["max_iters_fraction"] * n)
        totals["iterations"] += stats["mean_iterations"] * n
        totals["batches"] += 1
    n = max(totals["num_valid"], 1)
    return {"batches": totals["batches"], "base_samples": totals["num_valid"],
            "reached_target": totals["target"] / n, "reached_other_class": totals["other"] / n,
            "hit_iteration_cap": totals["max_iters"] / n, "mean_iterations": totals["iterations"] / n}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--teacher-workdir", required=True)
    p.add_argument("--student-workdir", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    config = config_lib.apply_overrides(config_lib.load_config(args.config), args.overrides)
    out = measure(config, args.teacher_workdir, args.student_workdir, args.batch_size)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
