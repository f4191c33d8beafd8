"""Cost of a KD step that reads cached teacher logits, against a student-only step.

Pair: teacher resnet32x4 -> student resnet8x4, CIFAR-100 shapes (random uint8 32x32x3,
100 classes), batch 64, float32, SGD lr 0.05 momentum 0.9, Hinton KD T=4 alpha=0.9.

Rows, each one ``make_train_step`` call per step (host batch -> device -> jitted step):
  student   ``cross_entropy_recipe``: no teacher at all
  cached    ``hinton_kd_recipe`` with ``cached_teacher=True``: the batch's logits are looked up
            by example id in a :class:`~jaxkd.train.teacher_cache.TeacherCache` of 50 000 rows
            (on the host, inside the timed region) and sent with the batch
  live      ``hinton_kd_recipe`` with the teacher's forward inside the jitted step

The rows are timed round-robin (one block of steps of each, repeated), so load from other
jobs on a shared machine falls on all of them alike; the ratios use the medians of the blocks.

    python benchmarks/bench_cached_kd.py [--repeats 5 --steps 3] [--json-out F]
    python benchmarks/bench_cached_kd.py --quick    # resnet8 vs resnet20, B=16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxkd
from jaxkd import models
from jaxkd.train import recipes
from jaxkd.train import step as step_lib
from jaxkd.train.teacher_cache import TeacherCache

jaxkd.apply_cpu_defaults()  # jaxkd's XLA:CPU defaults, as its runner applies them

NUM_CLASSES, NUM_EXAMPLES = 100, 50_000
MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def build_rows(student_name: str, teacher_name: str, batch_size: int, names=("student", "cached", "live"),
               mesh=None):
    """``{name: run_one}`` for the rows in ``names``; ``run_one()`` runs one step and returns its
    metrics. With ``mesh`` the steps run data-parallel over it."""
    student = models.create_model(student_name, NUM_CLASSES)
    teacher = models.create_model(teacher_name, NUM_CLASSES)
    sample = jnp.zeros((1, 32, 32, 3), jnp.float32)
    t_vars = jax.jit(teacher.init)(jax.random.PRNGKey(1), sample)
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))
    pipeline = step_lib.InputPipeline(MEAN, STD)
    rng = np.random.default_rng(0)
    cache = TeacherCache(path="<memory>", manifest={}, ids=np.arange(NUM_EXAMPLES, dtype=np.int64),
                         logits=rng.normal(size=(NUM_EXAMPLES, 1, NUM_CLASSES)).astype(np.float32))
    images = rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32)
    ce, kd = recipes.cross_entropy_recipe(), recipes.hinton_kd_recipe(4.0, 0.9, 0.1)

    def row(recipe, *, cached: bool, live: bool):
        state = jax.jit(lambda r: step_lib.create_train_state(r, student, recipe, tx, sample))(jax.random.PRNGKey(0))
        if mesh is not None:
            state = jax.device_put(state, step_lib.replicated(mesh))
        step = step_lib.make_train_step(student, recipe, tx, pipeline, teacher=teacher if live else None,
                                        cached_teacher=cached, mesh=mesh)
        holder = {"state": state, "k": 0}

        def run_one():
            ids = rng.integers(0, NUM_EXAMPLES, batch_size)
            host = {"image": images, "label": labels}
            if cached:
                host["teacher_logits"] = cache.lookup(ids)
            holder["state"], metrics = step(holder["state"], teacher_vars if live else None,
                                            step_lib.shard_batch(host, mesh))
            return metrics

        run_one.state = lambda: holder["state"]
        return run_one

    teacher_vars = t_vars if mesh is None else jax.device_put(t_vars, step_lib.replicated(mesh))
    rows = {"student": lambda: row(ce, cached=False, live=False), "cached": lambda: row(kd, cached=True, live=False),
            "live": lambda: row(kd, cached=False, live=True)}
    result = {name: rows[name]() for name in names}
    result["teacher_variables"] = t_vars
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="steps per timed block")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json-out", default=None)
    a = p.parse_args()
    if a.quick:
        a.student, a.teacher, a.batch_size, a.repeats, a.steps = "resnet8", "resnet20", 16, 3, 3
    rows = build_rows(a.student, a.teacher, a.batch_size)
    rows.pop("teacher_variables")
    for run_one in rows.values():  # compile and warm up
        jax.block_until_ready(run_one())
        jax.block_until_ready(run_one())
    times = {name: [] for name in rows}
    load = []
    for _ in range(a.repeats):
        for name, run_one in rows.items():
            t0 = time.perf_counter()
            for _ in range(a.steps):
                m = run_one()
            jax.block_until_ready(m)
            times[name].append((time.perf_counter() - t0) / a.steps)
        load.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "pair": f"{a.teacher} -> {a.student}", "batch_size": a.batch_size, "repeats": a.repeats, "steps": a.steps,
        "step_s_median": med, "step_s_all": times,
        "ratio_cached_vs_student": med["cached"] / med["student"],
        "ratio_live_vs_student": med["live"] / med["student"],
        "ratio_live_vs_cached": med["live"] / med["cached"],
        # the same ratio block by block (neighbouring blocks share the machine's load)
        "ratio_cached_vs_student_per_block": [c / s for c, s in zip(times["cached"], times["student"])],
        "loadavg_1min": load, "cpu_count": os.cpu_count(), "jax": jax.__version__,
    }
    print(f"{result['pair']}, B={a.batch_size}, {a.repeats} blocks of {a.steps} steps, "
          f"1-min load average {min(load):.1f}-{max(load):.1f} on {os.cpu_count()} cores")
    for k in rows:
        print(f"  {k:8s} {med[k] * 1e3:9.1f} ms/step  ({a.batch_size / med[k]:7.1f} img/s)  "
              f"blocks {[round(t * 1e3) for t in times[k]]}")
    print(f"  cached / student = {result['ratio_cached_vs_student']:.3f}   live / student = "
          f"{result['ratio_live_vs_student']:.3f}   live / cached = {result['ratio_live_vs_cached']:.3f}")
    per_block = sorted(result["ratio_cached_vs_student_per_block"])
    print(f"  cached / student block by block: median {statistics.median(per_block):.3f}, "
          f"range {per_block[0]:.3f}-{per_block[-1]:.3f}")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
