"""Cost of transformer distillation: one KD train step vs its parts (teacher forward + student step).

    python benchmarks/bench_transformer_kd.py [--batch 128] [--patch 7] [--student vit_student]
                                              [--methods ce,hinton_kd,tinybert,tinybert_pred,minilm,minilm_v2]

Fashion-MNIST-shaped random data (uint8 28x28x1, 10 classes), the ViT pair of
``experiments/configs/fashion_vit.py``: ``vit_teacher`` (6 layers, D=256, 8 heads) to
``vit_student`` (3 layers, D=128, 8 heads) or ``vit_student2`` (2 layers), patches ``p x p``
(7: 16 tokens + [CLS]), float32, AdamW. Rows (median over ``--repeats``, after one compiling
call; every step is a compiled ``jax.jit`` function, state not donated):

* ``teacher_fwd``: the teacher's inference forward with all its taps;
* ``ce``: the student's plain train step (no teacher);
* each method's full KD step (teacher forward inside the same jit, the loss, the update).

The ratio ``KD step / (teacher_fwd + ce)`` says what the distillation terms and the fusion cost
beyond running the two networks separately. Also printed: parameter counts and throughput
(images/s) of every row.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxkd import models
from jaxkd.core import build_recipe
from jaxkd.methods import transformer_kd  # noqa: F401  (registers tinybert, minilm)
from jaxkd.train import InputPipeline, create_train_state, make_train_step

METHODS = {
    "ce": {"name": "ce"},
    "hinton_kd": {"name": "hinton_kd", "temperature": 4.0, "alpha": 0.9, "gamma": 0.1},
    "tinybert": {"name": "tinybert", "stage": "intermediate"},
    "tinybert_pred": {"name": "tinybert", "stage": "prediction"},
    "minilm": {"name": "minilm", "gamma": 1.0},
    "minilm_v2": {"name": "minilm", "version": "v2", "num_relation_heads": 8, "gamma": 1.0},
}


def _time(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--patch", type=int, default=7, help="patch size p (28 must be a multiple)")
    p.add_argument("--teacher", default="vit_teacher")
    p.add_argument("--student", default="vit_student")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    B, C = args.batch, 10
    kw = {"patch_size": (args.patch, args.patch)}
    teacher, student = models.create_model(args.teacher, C, **kw), models.create_model(args.student, C, **kw)
    sample = jnp.zeros((1, 28, 28, 1))
    t_vars = jax.jit(teacher.init)(jax.random.PRNGKey(1), sample)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (B, 28, 28, 1), dtype=np.uint8)),
             "label": jnp.asarray(rng.integers(0, C, B).astype(np.int32)),
             "index": jnp.arange(B, dtype=jnp.int32)}
    pipeline = InputPipeline(mean=(0.286,), std=(0.353,))
    tx = optax.adamw(1e-3, weight_decay=0.05)

    results, counts = {}, {}
    x = pipeline(None, batch["image"], train=False)
    t_fwd = jax.jit(lambda v, xx: teacher.apply(v, xx, train=False)[:2])
    results["teacher_fwd"] = _time(lambda: jax.block_until_ready(t_fwd(t_vars, x)), args.repeats)
    counts["teacher"] = models.count_params(t_vars["params"])
    for name in args.methods.split(","):
        recipe = build_recipe(METHODS[name])
        state = create_train_state(jax.random.PRNGKey(0), student, recipe, tx, sample,
                                   teacher=teacher if recipe.uses_teacher else None,
                                   teacher_variables=t_vars if recipe.uses_teacher else None)
        counts.setdefault("student", models.count_params(state.params["student"]))
        if state.params["aux"]:
            counts[f"aux ({name})"] = models.count_params(state.params["aux"])
        step = make_train_step(student, recipe, tx, pipeline, teacher=teacher if recipe.uses_teacher else None,
                               donate=False)

        def run(step=step, state=state):
            _, m = step(state, t_vars, batch)
            jax.block_until_ready(m)
        results[name] = _time(run, args.repeats)

    print(f"devices: {jax.devices()}  batch {B}  patch {args.patch}  {args.teacher} -> {args.student}")
    print("| params | count |\n|---|---|")
    for k, v in counts.items():
        print(f"| {k} | {v:,} |")
    print()
    base = results["teacher_fwd"] + results.get("ce", float("nan"))
    print("| row | median ms | images/s | / (teacher_fwd + ce) |\n|---|---|---|---|")
    for k, v in results.items():
        ratio = f"{v / base:.2f}" if k not in ("teacher_fwd", "ce") else ""
        print(f"| {k} | {1000 * v:.1f} | {B / v:,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
