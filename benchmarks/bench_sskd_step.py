"""Cost of SSKD: one SSKD student step and one teacher-head (pre-stage) step vs one plain KD step.

    python benchmarks/bench_sskd_step.py [--batch 128] [--teacher resnet20] [--student resnet8] \
        [--size 28] [--channels 1] [--repeats 5]

On random images of Fashion-MNIST's shape (28x28x1, 10 classes) by default, the pair and batch of
``experiments/configs/fashion_sskd.py``. SSKD makes 4 views of every image inside the step, so the
teacher and the student both run on 4B rows; the table also times a KD step on 4B images, which
tells the cost of the extra rows from the cost of SSKD's own work (views, heads, similarity
matrices, filtering). The cases are timed round robin (one step of each per repeat). Prints medians
(ms) and the ratios to the KD step on B images.
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
from jaxkd.train import InputPipeline, create_train_state, make_train_step


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--teacher", default="resnet20")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    b, c, hw = args.batch, args.classes, args.size
    teacher, student = models.create_model(args.teacher, c), models.create_model(args.student, c)
    sample = jnp.zeros((1, hw, hw, args.channels))
    t_vars = jax.jit(teacher.init)(jax.random.PRNGKey(1), sample)
    rng = np.random.default_rng(0)

    def batch_of(n):
        return {"image": jnp.asarray(rng.integers(0, 256, (n, hw, hw, args.channels), dtype=np.uint8)),
                "label": jnp.asarray(rng.integers(0, c, n).astype(np.int32)),
                "index": jnp.arange(n, dtype=jnp.int32)}

    pipeline = InputPipeline(mean=(0.5,) * args.channels, std=(0.25,) * args.channels)
    tx = optax.sgd(0.05, momentum=0.9)
    kd = {"name": "hinton_kd", "temperature": 4.0, "alpha": 0.9, "gamma": 0.1}
    cases = (("kd", kd, b), ("kd_4x_rows", kd, 4 * b), ("sskd", {"name": "sskd"}, b),
             ("sskd_teacher_head", {"name": "sskd_teacher_head"}, b))
    runs = {}
    for name, method, n in cases:
        recipe = build_recipe(method)
        state = create_train_state(jax.random.PRNGKey(0), student, recipe, tx, sample, teacher=teacher,
                                   teacher_variables=t_vars)
        step = make_train_step(student, recipe, tx, pipeline, teacher=teacher, steps_per_epoch=10, num_epochs=10,
                               donate=False)
        batch = batch_of(n)

        def run(step=step, state=state, batch=batch):
            jax.block_until_ready(step(state, t_vars, batch)[1])
        run()  # compile
        runs[name] = run
    # round robin: each repeat times every case once, so a change in the machine's load hits all alike
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            times[name].append(_time(run))
    results = {name: statistics.median(ts) for name, ts in times.items()}

    print(f"devices: {jax.devices()}  batch {b} images ({hw}x{hw}x{args.channels})  "
          f"teacher {args.teacher}  student {args.student}")
    print("| step | rows | median ms (min-max) | / KD step |\n|---|---|---|---|")
    for name, _, n in cases:
        rows = 4 * n if name.startswith("sskd") else n
        print(f"| {name} | {rows} | {1000 * results[name]:.1f} ({1000 * min(times[name]):.0f}-"
              f"{1000 * max(times[name]):.0f}) | {results[name] / results['kd']:.2f}x |")
    print()
    print(f"SSKD step / KD step: {results['sskd'] / results['kd']:.2f}x; "
          f"SSKD step / KD step on the same 4B rows: {results['sskd'] / results['kd_4x_rows']:.2f}x")


if __name__ == "__main__":
    main()
