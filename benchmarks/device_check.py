"""GPU check of issue #6 ("Accelerator"): the jaxkd KD step vs the PyTorch peer on one GPU.

Pair: teacher resnet32x4 -> student resnet8x4, CIFAR-100 shapes (random uint8 32x32x3
images, 100 classes), SGD lr 0.05 momentum 0.9 weight decay 5e-4, Hinton KD T=4, alpha 0.9,
CE weight 0.1. For batch 64, 256, 1024 and float32 / bfloat16 it measures:

- jaxkd: ``make_train_step`` + ``hinton_kd_recipe`` with the teacher forward inside the jitted
  step; bfloat16 = ``create_model(..., dtype="bfloat16")``: bf16 compute, float32 params,
  optimizer state and loss. float32 = JAX's default precision (on NVIDIA GPUs XLA may use
  TF32 tensor cores for float32 convolutions).
- torch: the peer's KD step (``../shared/bench/torch_ref/bench_kd_step.py``, mode b): loss
  function (teacher forward under no_grad + student forward + KD loss) under
  ``torch.compile``, backward, eager ``torch.optim.SGD`` step, channels_last; bfloat16 =
  ``torch.autocast(device, dtype=torch.bfloat16)`` around the compiled loss. cudnn.benchmark
  on, TF32 allowed (``set_float32_matmul_precision("high")``, like JAX's default). The models
  are ``benchmarks/torch_peer_models.py`` (the peer's architecture; ../shared does not travel
  to the device machine). Both sides take the uint8 NHWC batch and normalise it inside the
  step.

Per (impl, dtype, batch): images/s (median over repeats after warm-up, synchronised with
``block_until_ready`` / ``torch.cuda.synchronize``), achieved TFLOP/s, first-step time
(compilation + first step), and the ratio jaxkd / torch. TFLOP/s use an *analytic* FLOP count:
conv + linear multiply-accumulates of one forward, 2 FLOP per MAC (BN, ReLU, pooling, loss,
optimizer not counted), KD step = teacher forward + 3 x student forward per image. XLA's
``cost_analysis()`` FLOPs of the compiled jaxkd step are recorded beside it for comparison.
Target (issue #6): jaxkd >= 1.2x torch at batch 256 in bfloat16 (PASS / FAIL line).

Each implementation runs in a child process (one crash loses only that section; every finished
configuration is appended to a results file at once). Configurations run in priority order
(the target one first) and are skipped, not overrun, when ``--budget-s`` would be exceeded.

Usage::

    python benchmarks/device_check.py                        # on the GPU machine (< 8 min)
    bash benchmarks/device_check.sh                          # same, output files to $OUT
    python benchmarks/device_check.py --smoke --skip-torch       # CPU check
    benchmarks/.venv-torch/bin/python benchmarks/device_check.py --smoke --only torch
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

NUM_CLASSES = 100
TEMPERATURE, ALPHA = 4.0, 0.9
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
X4_WIDTHS = (32, 64, 128, 256)
TARGET = {"batch": 256, "dtype": "bfloat16", "ratio": 1.2}
# run order: the target configuration first, then the others by how much they tell
PRIORITY = [(256, "bfloat16"), (256, "float32"), (1024, "bfloat16"), (64, "bfloat16"),
            (1024, "float32"), (64, "float32")]


# --------------------------------------------------------------------------- FLOPs
def forward_macs(depth: int, widths=X4_WIDTHS, num_classes: int = NUM_CLASSES, hw: int = 32) -> int:
    """Conv + linear multiply-accumulates of one image's forward through a CIFAR ResNet."""
    n = (depth - 2) // 6
    size, cin = hw, widths[0]
    macs = size * size * 3 * cin * 9                      # stem 3x3
    for cout, stride in zip(widths[1:], (1, 2, 2)):
        for i in range(n):
            s = stride if i == 0 else 1
            size //= s
            macs += size * size * cout * (cin * 9 + cout * 9)  # conv_a, conv_b (3x3)
            if s != 1 or cin != cout:
                macs += size * size * cout * cin               # 1x1 shortcut
            cin = cout
    return macs + cin * num_classes                       # fc


FLOP_TEACHER_FWD = 2 * forward_macs(32)   # resnet32x4: ~2.166 GFLOP / image
FLOP_STUDENT_FWD = 2 * forward_macs(8)    # resnet8x4:  ~0.354 GFLOP / image
FLOP_KD_STEP = FLOP_TEACHER_FWD + 3 * FLOP_STUDENT_FWD


# --------------------------------------------------------------------------- timing
def time_steps(run_step, sync, batch: int, args) -> dict:
    """``run_step()`` is one (asynchronous) step; ``sync()`` waits for the last one.
    Returns first-step time, then images/s over ``args.repeats`` repeats after warm-up."""
    t0 = time.perf_counter()
    run_step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(args.warmup):
        run_step()
    sync()
    # steps per repeat: enough for ~args.min_time seconds
    t0 = time.perf_counter()
    run_step()
    sync()
    one = max(time.perf_counter() - t0, 1e-6)
    steps = max(args.min_steps, min(args.max_steps, int(args.min_time / one) + 1))
    ips = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            run_step()
        sync()
        ips.append(steps * batch / (time.perf_counter() - t0))
    med = statistics.median(ips)
    return {"first_step_s": first, "steps_per_repeat": steps, "ips_all": ips, "ips_median": med,
            "ips_min": min(ips), "ips_max": max(ips), "step_ms": 1e3 * batch / med,
            "tflops": med * FLOP_KD_STEP / 1e12}


def _err(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


class Budget:
    """Skips a configuration when its estimated cost would pass the deadline."""

    def __init__(self, deadline: float, impl: str = "", results_file: str = ""):
        self.deadline = deadline
        self.results_file = results_file
        self.costs: dict[str, float] = {}  # dtype -> wall seconds of the last config
        try:  # seed with this implementation's configurations of an earlier pass
            with open(results_file) as f:
                for line in f:
                    rec = json.loads(line)
                    if rec.get("impl") == impl and rec.get("wall_s"):
                        self.costs[rec["dtype"]] = rec["wall_s"]
        except (OSError, ValueError):
            pass

    def skip(self, rec: dict) -> bool:
        """Records ``rec`` as skipped (results file + log line) when its configuration does not fit."""
        ok, left = self.allows(rec["dtype"], rec["batch"])
        if ok:
            return False
        rec["skipped"] = f"budget ({left:.0f}s left)"
        _append(self.results_file, rec)
        print(f"[{rec['impl']}] B={rec['batch']} {rec['dtype']}: skipped, {left:.0f}s left", flush=True)
        return True

    def allows(self, dtype: str, batch: int) -> tuple[bool, float]:
        left = self.deadline - time.time()
        known = self.costs.get(dtype) or (max(self.costs.values()) if self.costs else None)
        est = (known * (1.5 if batch >= 1024 else 1.0)) if known is not None else 20.0
        return left > est, left


def _append(path: str, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------- jaxkd
def worker_jax(args, configs) -> None:
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    import numpy as np
    import jax
    import jax.numpy as jnp

    import jaxkd

    jaxkd.apply_cpu_defaults()  # as jaxkd's runner does (CPU only; nothing changes on a GPU)
    from jaxkd.models import count_params, create_model
    from jaxkd.train import optim, recipes
    from jaxkd.train import step as step_lib

    dev = jax.devices()[0]
    info = {"impl": "jaxkd", "kind": "info", "jax": jax.__version__, "backend": jax.default_backend(),
            "device": getattr(dev, "device_kind", str(dev)), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    try:
        import flax, optax  # noqa: E401
        info.update(flax=flax.__version__, optax=optax.__version__)
    except Exception:  # noqa: BLE001
        pass
    _append(args.results_file, info)
    print(f"[jaxkd] jax {info['jax']} backend {info['backend']} device {info['device']}", flush=True)

    budget = Budget(args.deadline, "jaxkd", args.results_file)
    tx, _ = optim.make_optimizer({"name": "sgd", "lr": LR, "momentum": MOMENTUM,
                                  "weight_decay": WEIGHT_DECAY, "schedule": "constant"}, 1, 1)
    pipeline = step_lib.InputPipeline(mean=CIFAR100_MEAN, std=CIFAR100_STD, pad=0, flip=False)
    recipe = recipes.hinton_kd_recipe(TEMPERATURE, ALPHA, 1.0 - ALPHA)
    sample = jnp.zeros((2, 32, 32, 3), jnp.float32)
    for batch, dtype in configs:
        rec = {"impl": "jaxkd", "kind": "row", "batch": batch, "dtype": dtype}
        if budget.skip(rec):
            continue
        t_cfg = time.perf_counter()
        try:
            student = create_model("resnet8x4", NUM_CLASSES, dtype=dtype)
            teacher = create_model("resnet32x4", NUM_CLASSES, dtype=dtype)
            t_vars = teacher.init(jax.random.key(1), sample)
            state = step_lib.create_train_state(jax.random.key(0), student, recipe, tx, sample)
            rec["params_student"] = count_params(state.params["student"])
            rec["params_teacher"] = count_params(t_vars["params"])
            rng = np.random.default_rng(0)
            data = {"image": jnp.asarray(rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)),
                    "label": jnp.asarray(rng.integers(0, NUM_CLASSES, (batch,)).astype(np.int32))}
            step = step_lib.make_train_step(student, recipe, tx, pipeline, teacher=teacher, donate=True)
            t0 = time.perf_counter()
            compiled = step.lower(state, t_vars, data).compile()
            rec["compile_s"] = time.perf_counter() - t0
            try:
                ca = compiled.cost_analysis()
                ca = ca[0] if isinstance(ca, (list, tuple)) else ca
                flops = float(ca.get("flops", 0.0)) if ca else 0.0
                rec["xla_flop_per_img"] = flops / batch if flops > 0 else None
            except Exception as e:  # noqa: BLE001 - informational only
                rec["xla_flop_per_img"] = None
                rec["cost_analysis_error"] = _err(e)
            box = {"state": state, "metrics": None}

            def run_step():
                box["state"], box["metrics"] = compiled(box["state"], t_vars, data)

            def sync():
                jax.block_until_ready((box["state"], box["metrics"]))

            r = time_steps(run_step, sync, batch, args)
            r["first_step_s"] += rec["compile_s"]  # compile + first call
            rec.update(r)
            metrics = {k: float(v) for k, v in box["metrics"].items()}
            rec["loss"] = metrics.get("loss")
            if not all(np.isfinite(v) for v in metrics.values()):
                raise RuntimeError(f"non-finite metrics {metrics}")
        except Exception as e:  # noqa: BLE001 - keep going with the other configurations
            rec["error"] = _err(e)
        rec["wall_s"] = time.perf_counter() - t_cfg
        budget.costs[dtype] = rec["wall_s"]
        _append(args.results_file, rec)
        print(f"[jaxkd] B={batch} {dtype}: " + (rec["error"] if "error" in rec else
              f"{rec['ips_median']:.0f} img/s, {rec['tflops']:.2f} TFLOP/s, first step "
              f"{rec['first_step_s']:.1f}s (compile {rec['compile_s']:.1f}s), loss {rec['loss']:.3f}"),
              flush=True)
        box = compiled = state = t_vars = data = None  # noqa: F841 - free device memory


# --------------------------------------------------------------------------- torch
def worker_torch(args, configs) -> None:
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import numpy as np
    import torch
    import torch.nn.functional as F

    from torch_peer_models import n_params, resnet8x4, resnet32x4

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    info = {"impl": "torch", "kind": "info", "torch": torch.__version__, "backend": device.type,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "compile": not args.torch_no_compile, "compile_mode": args.torch_compile_mode}
    _append(args.results_file, info)
    print(f"[torch] torch {info['torch']} device {info['device']}", flush=True)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    mean = torch.tensor(CIFAR100_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR100_STD, device=device).view(1, 3, 1, 1)
    budget = Budget(args.deadline, "torch", args.results_file)
    for batch, dtype in configs:
        rec = {"impl": "torch", "kind": "row", "batch": batch, "dtype": dtype,
               "variant": ("compile" if not args.torch_no_compile else "eager") + "+channels_last"
                          + ("+bf16 autocast" if dtype == "bfloat16" else "")}
        if budget.skip(rec):
            continue
        t_cfg = time.perf_counter()
        try:
            torch._dynamo.reset()
            torch.manual_seed(0)
            cl = torch.channels_last
            teacher = resnet32x4(NUM_CLASSES).to(device).eval().to(memory_format=cl)
            student = resnet8x4(NUM_CLASSES).to(device).train().to(memory_format=cl)
            for p in teacher.parameters():
                p.requires_grad_(False)
            rec["params_student"], rec["params_teacher"] = n_params(student), n_params(teacher)
            opt = torch.optim.SGD(student.parameters(), lr=LR, momentum=MOMENTUM,
                                  weight_decay=WEIGHT_DECAY)
            rng = np.random.default_rng(0)
            images = torch.from_numpy(rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)).to(device)
            labels = torch.from_numpy(rng.integers(0, NUM_CLASSES, (batch,)).astype(np.int64)).to(device)

            def loss_fn(img, y):
                # NHWC uint8 -> NCHW view with channels_last strides, normalised
                x = (img.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
                with torch.no_grad():
                    t = teacher(x).float()
                s = student(x).float()
                kl = F.kl_div(F.log_softmax(s / TEMPERATURE, dim=1),
                              F.softmax(t / TEMPERATURE, dim=1), reduction="batchmean")
                return ALPHA * TEMPERATURE ** 2 * kl + (1.0 - ALPHA) * F.cross_entropy(s, y)

            fn = loss_fn if args.torch_no_compile else torch.compile(
                loss_fn, dynamic=False, mode=args.torch_compile_mode or None)
            amp = dtype == "bfloat16"
            box = {}

            def run_step():
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    loss = fn(images, labels)
                loss.backward()
                opt.step()
                box["loss"] = loss

            try:
                r = time_steps(run_step, sync, batch, args)
            except Exception as e:  # noqa: BLE001 - e.g. no C compiler/triton for inductor
                if fn is loss_fn:
                    raise
                # keep a (weaker) comparison rather than none: the peer in eager mode, marked
                rec["compile_error"] = _err(e)
                rec["variant"] = rec["variant"].replace("compile", "eager (torch.compile failed)", 1)
                print(f"[torch] B={batch} {dtype}: torch.compile failed ({rec['compile_error']}); "
                      "timing eager instead", flush=True)
                torch._dynamo.reset()
                fn = loss_fn
                r = time_steps(run_step, sync, batch, args)
            rec.update(r)
            rec["compile_s"] = None  # torch compiles inside the first step: see first_step_s
            rec["loss"] = float(box["loss"].detach())
            if not np.isfinite(rec["loss"]):
                raise RuntimeError(f"non-finite loss {rec['loss']}")
        except Exception as e:  # noqa: BLE001
            rec["error"] = _err(e)
        rec["wall_s"] = time.perf_counter() - t_cfg
        budget.costs[dtype] = rec["wall_s"]
        _append(args.results_file, rec)
        print(f"[torch] B={batch} {dtype}: " + (rec["error"] if "error" in rec else
              f"{rec['ips_median']:.0f} img/s, {rec['tflops']:.2f} TFLOP/s, first step "
              f"{rec['first_step_s']:.1f}s, loss {rec['loss']:.3f}"), flush=True)
        teacher = student = opt = fn = box = images = labels = None  # noqa: F841
        if cuda:
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- parent
def run_child(impl: str, configs, deadline: float, args, results_file: str) -> dict:
    """Runs one implementation's configurations in a child process until ``deadline``."""
    python = args.torch_python if impl == "torch" else args.jax_python
    cmd = [python, os.path.abspath(__file__), "--worker", impl, "--deadline", f"{deadline:.3f}",
           "--results-file", results_file, "--configs",
           ",".join(f"{b}:{d}" for b, d in configs)] + args.passthrough
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # the child stops starting configurations at the deadline; give it a grace period for
    # the one in flight, then kill it (its finished rows are already in the results file)
    timeout = max(5.0, deadline - time.time() + args.grace_s)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, timeout=timeout, cwd=REPO)
        status = "ok" if p.returncode == 0 else f"exit code {p.returncode}"
    except subprocess.TimeoutExpired:
        status = f"killed after {timeout:.0f}s (budget)"
    except OSError as e:
        status = f"could not start: {_err(e)}"
    return {"impl": impl, "configs": [f"{b}:{d}" for b, d in configs], "status": status,
            "wall_s": time.perf_counter() - t0}


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def build_report(rows: dict, infos: dict, children: list, args, wall: float) -> tuple[str, dict]:
    lines = []
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    ji, ti = infos.get("jaxkd", {}), infos.get("torch", {})
    lines.append(f"device_check ({'smoke run' if args.smoke else 'full run'}) {stamp}; "
                 + (f"jaxkd: jax {ji['jax']} on {ji['device']} ({ji['backend']}); " if ji else "jaxkd: not run; ")
                 + (f"torch: {ti['torch']} on {ti['device']}; " if ti else "torch: not run; ")
                 + f"total {wall:.0f}s")
    if not args.smoke and any(i.get("backend") not in ("gpu", "cuda") for i in (ji, ti) if i):
        lines.append("WARNING: not on a GPU (backend " + ", ".join(
            f"{k}={v.get('backend')}" for k, v in infos.items()) + "): these are not GPU numbers")
    lines.append(f"KD step FLOP/img (analytic, conv+linear, 2/MAC): teacher fwd "
                 f"{FLOP_TEACHER_FWD / 1e9:.4f} G + 3 x student fwd {FLOP_STUDENT_FWD / 1e9:.4f} G = "
                 f"{FLOP_KD_STEP / 1e9:.4f} GFLOP")
    lines.append("")
    lines.append("| batch | dtype | jaxkd img/s | jaxkd TFLOP/s | jaxkd first step s (compile) "
                 "| torch img/s | torch TFLOP/s | torch first step s | jaxkd / torch |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    ratios = {}
    order = [c for c in PRIORITY if c in set(args.configs)] + \
            [c for c in args.configs if c not in PRIORITY]
    for batch, dtype in sorted(order, key=lambda c: (c[1] != "float32", c[0])):
        j, t = rows.get(("jaxkd", batch, dtype), {}), rows.get(("torch", batch, dtype), {})

        def cells(r, compile_col):
            if not r:
                return ["not run"] * 3
            if "skipped" in r:
                return [f"skipped: {r['skipped']}", "-", "-"]
            if "error" in r:
                return [f"failed: {r['error'][:80]}", "-", "-"]
            first = f"{r['first_step_s']:.1f}"
            if compile_col and r.get("compile_s") is not None:
                first += f" ({r['compile_s']:.1f})"
            return [f"{r['ips_median']:.0f} [{r['ips_min']:.0f}-{r['ips_max']:.0f}]",
                    f"{r['tflops']:.2f}", first]

        ratio = None
        if "ips_median" in j and "ips_median" in t:
            ratio = j["ips_median"] / t["ips_median"]
            ratios[f"{batch}:{dtype}"] = ratio
        lines.append(f"| {batch} | {dtype} | " + " | ".join(cells(j, True)) + " | "
                     + " | ".join(cells(t, False)) + f" | {_fmt(ratio, '.2f')} |")
    key = f"{TARGET['batch']}:{TARGET['dtype']}"
    r = ratios.get(key)
    verdict = "NOT MEASURED" if r is None else ("PASS" if r >= TARGET["ratio"] else "FAIL")
    lines.append("")
    lines.append(f"Target (issue #6): jaxkd >= {TARGET['ratio']}x torch at batch {TARGET['batch']} "
                 f"{TARGET['dtype']}: {verdict}" + ("" if r is None else f" ({r:.2f}x)")
                 + (" [smoke run: not the target shape/device]" if args.smoke else ""))
    xla = [(b, d, rows[("jaxkd", b, d)]["xla_flop_per_img"]) for (i, b, d) in rows
           if i == "jaxkd" and rows[(i, b, d)].get("xla_flop_per_img")]
    if xla:
        lines.append("XLA cost_analysis FLOP/img of the compiled jaxkd step (all ops, informational): "
                     + ", ".join(f"B={b} {d}: {f / 1e9:.3f} G ({f / FLOP_KD_STEP:.2f}x analytic)"
                                 for b, d, f in sorted(xla)))
    tv = "torch.compile" if ti.get("compile", True) else "eager (--torch-no-compile)"
    lines.append("img/s: median [min-max] of the timed repeats; TFLOP/s from the analytic count; "
                 f"torch = {tv} + channels_last (+ bf16 autocast), eager SGD.")
    for (impl, b, d), r in sorted(rows.items()):
        if impl == "torch" and r.get("compile_error"):
            lines.append(f"note: torch B={b} {d}: torch.compile failed ({r['compile_error'][:120]}); "
                         "that row is torch eager (channels_last)")
    for c in children:
        if c["status"] != "ok":
            lines.append(f"note: {c['impl']} child ({','.join(c['configs'])}): {c['status']}")
    summary = {"verdict": verdict, "ratios": ratios, "target": TARGET}
    return "\n".join(lines), summary


def parse_configs(args) -> list:
    batches = [int(b) for b in args.batches.split(",") if b]
    dtypes = [d for d in args.dtypes.split(",") if d]
    for d in dtypes:
        if d not in ("float32", "bfloat16"):
            raise SystemExit(f"unknown dtype {d!r} (float32, bfloat16)")
    wanted = [(b, d) for b in batches for d in dtypes]
    return [c for c in PRIORITY if c in wanted] + [c for c in wanted if c not in PRIORITY]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-s", type=float, default=None,
                    help="time budget for all measurements (default 420; 900 with --smoke); "
                         "configurations that would pass it are skipped")
    ap.add_argument("--batches", default=None, help="default 64,256,1024 (8 with --smoke)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--only", choices=("jax", "torch", "both"), default="both")
    ap.add_argument("--skip-torch", action="store_true", help="same as --only jax")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check of the script: batch 8, 1 repeat, no warm-up steps")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; 1 smoke)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps after the first (default 5; 0 smoke)")
    ap.add_argument("--min-time", type=float, default=None, help="seconds per repeat (default 0.5)")
    ap.add_argument("--min-steps", type=int, default=None, help="steps per repeat at least (default 5; 1 smoke)")
    ap.add_argument("--max-steps", type=int, default=500)
    ap.add_argument("--torch-no-compile", action="store_true", help="eager torch (debugging)")
    ap.add_argument("--torch-compile-mode", default="", help="torch.compile mode (default: default)")
    ap.add_argument("--jax-python", default=sys.executable)
    ap.add_argument("--torch-python", default=sys.executable)
    ap.add_argument("--grace-s", type=float, default=30.0,
                    help="a child may overrun the budget by this much (the configuration in flight)")
    ap.add_argument("--json-out", default="")
    ap.add_argument("--md-out", default="", help="write the summary table (markdown) here")
    # internal: child processes
    ap.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--results-file", help=argparse.SUPPRESS)
    ap.add_argument("--configs", dest="configs_arg", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    s = args.smoke
    args.repeats = args.repeats or (1 if s else 5)
    args.warmup = args.warmup if args.warmup is not None else (0 if s else 5)
    args.min_time = args.min_time if args.min_time is not None else (0.0 if s else 0.5)
    args.min_steps = args.min_steps or (1 if s else 5)
    if s:
        args.max_steps = 1
    args.budget_s = args.budget_s or (900.0 if s else 420.0)
    args.batches = args.batches or ("8" if s else "64,256,1024")

    if args.worker:
        configs = [(int(c.split(":")[0]), c.split(":")[1]) for c in args.configs_arg.split(",") if c]
        (worker_jax if args.worker == "jax" else worker_torch)(args, configs)
        return 0

    # options handed to the children unchanged
    args.passthrough = ["--repeats", str(args.repeats), "--warmup", str(args.warmup),
                        "--min-time", str(args.min_time), "--min-steps", str(args.min_steps),
                        "--max-steps", str(args.max_steps), "--budget-s", str(args.budget_s)]
    if s:
        args.passthrough.append("--smoke")
    if args.torch_no_compile:
        args.passthrough.append("--torch-no-compile")
    if args.torch_compile_mode:
        args.passthrough += ["--torch-compile-mode", args.torch_compile_mode]

    impls = ["jax"] if args.skip_torch or args.only == "jax" else \
        ["torch"] if args.only == "torch" else ["jax", "torch"]
    args.configs = parse_configs(args)
    t_start = time.time()
    end = t_start + args.budget_s
    import tempfile
    fd, results_file = tempfile.mkstemp(prefix="device_check_", suffix=".jsonl")
    os.close(fd)
    print(f"device_check: {len(args.configs)} configurations x {impls}, budget {args.budget_s:.0f}s; "
          f"analytic KD step {FLOP_KD_STEP / 1e9:.4f} GFLOP/img", flush=True)

    # pass 1: the target configuration on both sides (so the verdict comes first);
    # pass 2: the rest, the time left split evenly over the implementations
    target = (TARGET["batch"], TARGET["dtype"])
    first = [target] if target in args.configs and len(args.configs) > 1 else []
    rest = [c for c in args.configs if c not in first]
    children = []
    for phase, cfgs in (("target", first), ("rest", rest)):
        if not cfgs:
            continue
        for k, impl in enumerate(impls):
            left = end - time.time()
            if left <= 0:
                children.append({"impl": impl, "configs": [f"{b}:{d}" for b, d in cfgs],
                                 "status": "not started: budget spent", "wall_s": 0.0})
                continue
            # pass 1 (one configuration per child) may use all that is left; in pass 2 the
            # time left is split evenly over the implementations still to run
            share = left if phase == "target" else left / (len(impls) - k)
            children.append(run_child(impl, cfgs, time.time() + share, args, results_file))

    rows, infos = {}, {}
    try:
        with open(results_file) as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("kind") == "info":
                    infos[rec["impl"]] = rec
                else:
                    rows[(rec["impl"], rec["batch"], rec["dtype"])] = rec
        os.unlink(results_file)
    except OSError:
        pass
    wall = time.time() - t_start
    table, summary = build_report(rows, infos, children, args, wall)
    print("\n" + table, flush=True)
    if args.md_out:
        with open(args.md_out, "w") as f:
            f.write(table + "\n")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"summary": summary, "infos": infos, "children": children,
                       "rows": [rows[k] for k in sorted(rows, key=str)],
                       "flop_per_img": {"teacher_fwd": FLOP_TEACHER_FWD,
                                        "student_fwd": FLOP_STUDENT_FWD, "kd_step": FLOP_KD_STEP},
                       "smoke": args.smoke, "budget_s": args.budget_s, "wall_s": wall}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
