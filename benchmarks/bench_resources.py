"""Compile time, peak memory, input-pipeline headroom and per-device throughput of the KD step.

Pair: teacher resnet32x4 -> student resnet8x4, CIFAR-100 shapes, batch 64, float32 (the
setup of ``bench_kd_step.py``; steps built by ``bench_cached_kd.build_rows``). Each
measurement runs in its own child process, so peak memory (``ru_maxrss``) belongs to one
step kind and ``XLA_FLAGS`` (forced device count) take effect.

    python benchmarks/bench_resources.py [--steps 6] [--json-out F]

Prints, for the KD step and the student-only step on 1 device: first call (compile) time,
steady img/s, peak host memory of the process, and the bytes of the trained state (params +
optimizer state + batch stats) vs the teacher's variables (the teacher has no optimizer state
and no gradient buffers); the KD step on 8 forced CPU devices (img/s total and per device);
the input pipeline alone (``train_batches`` over 50,000 CIFAR-shaped uint8 images) and its
ratio to the KD step's img/s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _tree_bytes(tree) -> int:
    import jax
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def child(kind: str, devices: int, batch: int, steps: int) -> dict:
    import jax

    import jaxkd

    jaxkd.apply_cpu_defaults()  # jaxkd's XLA:CPU defaults, as its runner applies them

    sys.path.insert(0, HERE)
    from bench_cached_kd import build_rows

    from jaxkd.train import step as step_lib

    mesh = step_lib.make_mesh(devices) if devices > 1 else None
    rows = build_rows("resnet8x4", "resnet32x4", batch, names=(kind,), mesh=mesh)
    run_one, t_vars = rows[kind], rows["teacher_variables"]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    jax.block_until_ready(run_one())
    first = time.perf_counter() - t0
    jax.block_until_ready(run_one())
    t0 = time.perf_counter()
    for _ in range(steps):
        m = run_one()
        jax.block_until_ready(m)  # one step in flight (multi-device CPU collectives need it)
    per_step = (time.perf_counter() - t0) / steps
    state = run_one.state()
    return {"kind": kind, "devices": jax.device_count(), "batch": batch, "first_call_s": first,
            "img_per_s": batch / per_step, "img_per_s_per_device": batch / per_step / jax.device_count(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_first_step_mb": rss_before / 1024,
            "state_mb": _tree_bytes((state.params, state.opt_state, state.model_state)) / 2**20,
            "teacher_variables_mb": _tree_bytes(t_vars) / 2**20 if kind == "live" else 0.0}


def pipeline_rate(batch: int) -> float:
    import numpy as np

    from jaxkd.data.bench import measure
    from jaxkd.data.pipeline import ArraySource

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(50_000, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, size=50_000)
    return measure(ArraySource(images, labels), batch, 300)


def run_child(kind: str, devices: int, batch: int, steps: int) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--devices", str(devices), "--batch",
                          str(batch), "--steps", str(steps)], env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.devices, a.batch, a.steps)))
        return
    rows = [run_child("live", 1, a.batch, a.steps), run_child("student", 1, a.batch, a.steps),
            run_child("live", 8, a.batch, a.steps)]
    pipe = pipeline_rate(a.batch)
    kd = rows[0]["img_per_s"]
    print(f"resnet32x4 -> resnet8x4, batch {a.batch}, float32, {os.cpu_count()} CPU cores, "
          f"1-min load {os.getloadavg()[0]:.1f}\n")
    print("| step | devices | first call (compile) s | img/s | img/s per device | peak host RSS MB "
          "| trained state MB | teacher variables MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'KD' if r['kind'] == 'live' else 'student only'} | {r['devices']} | {r['first_call_s']:.1f} "
              f"| {r['img_per_s']:.1f} | {r['img_per_s_per_device']:.1f} | {r['peak_rss_mb']:.0f} "
              f"| {r['state_mb']:.1f} | {r['teacher_variables_mb']:.1f} |")
    print(f"\ninput pipeline alone: {pipe:,.0f} img/s = {pipe / kd:.0f}x the KD step (target >= 5x)")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"rows": rows, "pipeline_img_per_s": pipe, "pipeline_vs_kd": pipe / kd}, f, indent=2)


if __name__ == "__main__":
    main()
