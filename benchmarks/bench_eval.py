"""Eval-step throughput: jaxkd's eval compilation options against the process defaults.

jaxkd compiles forward-only computations (the eval step, the teacher-cache forward) with
``jaxkd._xla_defaults.eval_compiler_options()``: on the CPU with a checked jaxlib, no YNNPACK
library fusions. This script times ``make_eval_step(model, ...)`` as jaxkd builds it against the
same function compiled with the process defaults (``jax.jit(eval_step.__wrapped__)``), for a few
CIFAR models, on random uint8 32x32x3 batches, 100 classes. Both are timed round-robin (blocks of
calls alternating), so load from other jobs falls on both alike. It also checks that the two give
the same numbers (loss sum to rtol 1e-5, identical correct counts).

    python benchmarks/bench_eval.py [--repeats 6 --calls 3] [--json-out F]
    python benchmarks/bench_eval.py --quick     # resnet8x4 only, B=64, 3 repeats
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

import jaxkd

jaxkd.apply_cpu_defaults()  # jaxkd's XLA defaults, before the backend starts (import alone changes nothing)
from jaxkd._xla_defaults import eval_compiler_options
from jaxkd.models import create_model
from jaxkd.train import step as step_lib

CASES = (("resnet8x4", 64), ("resnet8x4", 256), ("resnet32x4", 64), ("resnet20", 256), ("wrn_16_2", 256))


def time_blocks(fns, args, repeats: int, calls: int) -> dict[str, list[float]]:
    """Seconds per call of each function, one block of ``calls`` calls per repeat, round-robin."""
    out = {name: [] for name in fns}
    for r in range(repeats):
        order = list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]
        for name, fn in order:
            t0 = time.perf_counter()
            for _ in range(calls):
                res = fn(*args)
            jax.block_until_ready(res)
            out[name].append((time.perf_counter() - t0) / calls)
    return out


def run_case(name: str, batch_size: int, repeats: int, calls: int) -> dict:
    model = create_model(name, 100)
    pipeline = step_lib.InputPipeline(mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762))
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8)),
             "label": jnp.asarray(rng.integers(0, 100, batch_size).astype(np.int32))}
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    jaxkd_eval = step_lib.make_eval_step(model, pipeline)
    default_eval = jax.jit(jaxkd_eval.__wrapped__)
    compiled, hlo_fusions = {}, {}
    for label, fn in (("jaxkd", jaxkd_eval), ("process default", default_eval)):
        c = fn.lower(variables, batch).compile()
        compiled[label] = c
        hlo_fusions[label] = c.as_text().count("__ynn_fusion")
    got = {k: c(variables, batch) for k, c in compiled.items()}
    a, b = got["jaxkd"], got["process default"]
    same = (abs(float(a["loss_sum"]) - float(b["loss_sum"])) <= 1e-5 * abs(float(b["loss_sum"]))
            and float(a["correct"]) == float(b["correct"]))
    secs = time_blocks(compiled, (variables, batch), repeats, calls)
    med = {k: statistics.median(v) for k, v in secs.items()}
    ratios = [d / j for j, d in zip(secs["jaxkd"], secs["process default"])]
    return {"model": name, "batch": batch_size,
            "img_s": {k: batch_size / v for k, v in med.items()},
            "speedup_median": med["process default"] / med["jaxkd"],
            "speedup_blocks": [min(ratios), max(ratios)], "ynn_fusions": hlo_fusions,
            "same_numbers": same}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--calls", type=int, default=3, help="calls per timed block")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    cases = CASES[:1] if args.quick else CASES
    repeats = 3 if args.quick else args.repeats
    opts = eval_compiler_options()
    print(f"jax {jax.__version__} backend {jax.default_backend()}; eval compiler options: {opts or 'none'}",
          flush=True)
    rows = []
    for name, bs in cases:
        r = run_case(name, bs, repeats, args.calls)
        rows.append(r)
        print(f"  {name} B={bs}: jaxkd {r['img_s']['jaxkd']:.1f} img/s, process default "
              f"{r['img_s']['process default']:.1f} img/s, speedup {r['speedup_median']:.2f}x", flush=True)
    lines = ["| model | batch | jaxkd eval img/s | process-default eval img/s | speedup (median) "
             "[min-max over blocks] | YNNPACK fusions (jaxkd / default) | same numbers |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['img_s']['jaxkd']:.1f} | {r['img_s']['process default']:.1f} | "
            f"{r['speedup_median']:.2f}x [{r['speedup_blocks'][0]:.2f}-{r['speedup_blocks'][1]:.2f}] | "
            f"{r['ynn_fusions']['jaxkd']} / {r['ynn_fusions']['process default']} | "
            f"{'yes' if r['same_numbers'] else 'NO'} |")
    print("\n".join(lines))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                       "eval_compiler_options": opts, "rows": rows, "table": lines}, f, indent=1)


if __name__ == "__main__":
    main()
