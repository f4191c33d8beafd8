"""Cost of BSS: one BSS train step vs one plain KD step, and the generator per iteration.

    python benchmarks/bench_bss.py [--batch 64] [--teacher resnet20] [--student resnet8] [--repeats 5]

On random CIFAR-shaped data (32x32x3, 100 classes). Prints medians (ms) and the ratios:
BSS step / KD step, and generator time per loop iteration / one teacher forward+backward
(gradient w.r.t. the input) on the same rows. The generator's iteration count depends on
the data (it stops when every row crossed the boundary), so the per-iteration cost divides
by the measured number of loop passes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxkd
from jaxkd import models
from jaxkd.methods import bss
from jaxkd.train import InputPipeline, create_train_state, make_train_step, recipes

jaxkd.apply_cpu_defaults()  # jaxkd's XLA:CPU defaults, as its runner applies them


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
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--teacher", default="resnet20")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    B, C = args.batch, 100
    teacher, student = models.create_model(args.teacher, C), models.create_model(args.student, C)
    sample = jnp.zeros((1, 32, 32, 3))
    t_vars = teacher.init(jax.random.PRNGKey(1), sample)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (B, 32, 32, 3), dtype=np.uint8)),
             "label": jnp.asarray(rng.integers(0, C, B).astype(np.int32))}
    pipeline = InputPipeline(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    tx = optax.sgd(0.05, momentum=0.9)

    results = {}
    for name, recipe in (("kd", recipes.hinton_kd_recipe()), ("bss", recipes.build_recipe({"name": "bss"}))):
        state = create_train_state(jax.random.PRNGKey(0), student, recipe, tx, sample)
        step = make_train_step(student, recipe, tx, pipeline, teacher=teacher, steps_per_epoch=10, num_epochs=80,
                               donate=False)
        holder = {"state": state}

        def run(step=step, holder=holder):
            new_state, m = step(holder["state"], t_vars, batch)
            jax.block_until_ready(m)
        results[name] = _time(run, args.repeats)

    # teacher forward + backward w.r.t. the input on B rows
    x = pipeline(None, batch["image"], train=False)
    grad_x = jax.jit(jax.grad(lambda xx: jnp.sum(teacher.apply(t_vars, xx, train=False)[0])))
    results["teacher_fwd_bwd"] = _time(lambda: jax.block_until_ready(grad_x(x)), args.repeats)

    # the generator alone, with a trained-looking student: use the teacher's logits plus noise
    t_logits = teacher.apply(t_vars, x, train=False)[0]
    s_logits = t_logits + 0.1 * jax.random.normal(jax.random.PRNGKey(3), t_logits.shape)
    labels = jnp.argmax(t_logits, -1)  # make every row a candidate base sample

    def teacher_logits(v, xx):
        return teacher.apply(v, xx, train=False)[0]

    def gen():
        return bss.boundary_supporting_samples(teacher_logits, t_vars, x, labels, s_logits, jax.random.PRNGKey(4))
    result = gen()
    stats = bss.bss_statistics(result)
    passes = int(np.max(np.asarray(result.iterations))) + 1  # loop passes incl. the final check
    results["generator"] = _time(lambda: jax.block_until_ready(gen().x_adv), args.repeats)

    print(f"devices: {jax.devices()}  batch {B}  teacher {args.teacher}  student {args.student}")
    print("| what | median ms |\n|---|---|")
    for k, v in results.items():
        print(f"| {k} | {1000 * v:.1f} |")
    print()
    print(f"BSS step / KD step: {results['bss'] / results['kd']:.2f}x")
    print(f"generator: {passes} loop passes, mean iterations {stats['mean_iterations']:.2f}, "
          f"stop reasons {stats['stop_reasons']}")
    per_iter = results["generator"] / passes
    print(f"generator per loop pass / teacher fwd+bwd on {B} rows: {per_iter / results['teacher_fwd_bwd']:.2f}x")


if __name__ == "__main__":
    main()
