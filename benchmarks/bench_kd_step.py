"""Throughput benchmark of the jaxkd KD train step, side by side with the PyTorch peer.

Pair: teacher resnet32x4 -> student resnet8x4 (RepDistiller CIFAR layout), CIFAR-100 shapes
(random uint8 images 32x32x3, 100 classes), float32, SGD lr 0.05 momentum 0.9 wd 5e-4,
Hinton KD T=4 alpha=0.9 (gamma = 1 - alpha = 0.1 on the CE term).

Rows (images/second, median and min-max over the timed repeats):
  a  student-only train step: ``make_train_step`` + ``cross_entropy_recipe``
  b  KD step: ``make_train_step`` + ``hinton_kd_recipe``, teacher forward inside the jit
  c  KD step with cached teacher logits: the same ``make_train_step`` + ``hinton_kd_recipe``,
     but the "teacher" is a lookup model whose variables are this batch's precomputed logits
     (``teacher_variables = {"logits": ...}``), so no teacher network runs
  d  teacher forward alone: ``jax.jit`` of ``teacher.apply(..., train=False)``

Every jaxkd measurement runs in a child process, so each can have its own ``XLA_FLAGS``
(they are read once, when the XLA backend starts). The parent process:

  1. runs the XLA-flag screen: the KD step (b) under each flag set, short timings plus a
     numerical check (the first step's loss / grad-norm against the default flags);
  2. runs the full jaxkd rows a-d with the default flags (and with the best screened flag set
     if that one was faster than the default by more than the noise margin);
  3. runs the PyTorch peer (``../shared/bench/torch_ref/bench_kd_step.py`` from the repo root) with its own venv;
  4. profiles the default-flag KD step per XLA op (jax.profiler, 2 steps);
  5. prints one markdown summary (and writes JSON with ``--json-out``).

Usage::

    python benchmarks/bench_kd_step.py                 # full run (~12 min on 2 cores)
    python benchmarks/bench_kd_step.py --quick         # jaxkd only, B=16, <2 min
    python benchmarks/bench_kd_step.py --skip-torch --flag-sets default,no_ynn

See benchmarks/README.md for the results and what they mean.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# The PyTorch peer lives in the shared folder next to the repository (../shared from the repo
# root); JAXKD_TORCH_REF_DIR points elsewhere.
TORCH_REF_DIR = os.environ.get("JAXKD_TORCH_REF_DIR",
                               os.path.join(os.path.dirname(REPO), "shared", "bench", "torch_ref"))
TORCH_PY = os.path.join(HERE, ".venv-torch", "bin", "python")

NUM_CLASSES = 100
TEMPERATURE, ALPHA = 4.0, 0.9
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4
# CIFAR-100 channel statistics (the usual ones); the values do not matter for speed.
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

# Analytic conv+linear FLOPs per image (2 x MACs), as the PyTorch peer's models.py computes
# them; used for GFLOP/s when the peer did not run. Train step ~ 3x forward.
FLOP_TEACHER_FWD = 2.1661e9   # resnet32x4
FLOP_STUDENT_FWD = 0.3541e9   # resnet8x4

MODE_NAMES = {
    "a": "student train step (CE)",
    "b": "KD step (teacher fwd + student train)",
    "c": "KD step, cached teacher logits",
    "d": "teacher forward (eval)",
}

# XLA:CPU flag sets screened on the KD step:
#   name -> (XLA_FLAGS additions, host devices, extra environment).
# "default" is jaxkd as users get it: since 92ea24c, importing jaxkd adds its own XLA:CPU
# defaults (jaxkd/_xla_defaults.py: XLA's own convolutions instead of YNNPACK) unless
# XLA_FLAGS already sets that option or JAXKD_NO_XLA_DEFAULTS=1. The other sets apply on top
# of that, except "xla_default" (jaxkd's defaults switched off: plain jaxlib behaviour) and the
# sets that set the YNN option themselves (jaxkd then leaves it alone). The flags in effect
# are recorded by the child after importing jaxkd.
# All flags exist in jaxlib 0.10.2 (checked against the strings of libjax_common.so); an
# unknown flag aborts the child, which the screen reports as "failed". Which library runs the
# convolutions is checked from the compiled HLO (the "library fusions" column).
# jaxlib 0.10.2 defaults: convolutions, dots and reductions go to YNNPACK ("__ynn_fusion").
_YNN = "--xla_cpu_experimental_ynn_fusion_type="
_NO_JAXKD_DEFAULTS = {"JAXKD_NO_XLA_DEFAULTS": "1"}
FLAG_SETS: dict[str, tuple[str, int, dict]] = {
    "default": ("", 1, {}),
    # plain jaxlib 0.10.2: YNNPACK convolutions, dots, reductions
    "xla_default": ("", 1, _NO_JAXKD_DEFAULTS),
    # only the convolutions to XLA's own (Eigen) ones; dots/reductions stay on YNNPACK
    # (what jaxkd applies by default since 92ea24c; explicit here)
    "no_ynn_conv": (_YNN + "-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION", 1, {}),
    # no library fusions at all: XLA's own convolutions and dots, emitted reductions
    "no_ynn": (_YNN, 1, {}),
    # convolutions through oneDNN instead of YNNPACK
    "onednn_conv": ("--xla_cpu_use_onednn=true " + _YNN + "-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
                    " --xla_cpu_experimental_onednn_fusion_type=+LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
                    1, {}),
    # YNNPACK convolutions, and YNNPACK also takes elementwise ops (BN/ReLU) into its fusions
    "ynn_eltwise": (_YNN + "+LIBRARY_FUSION_TYPE_ELTWISE,+LIBRARY_FUSION_TYPE_DOT", 1, {}),
    "concurrency_sched": ("--xla_cpu_enable_concurrency_optimized_scheduler=true", 1, {}),
    # Eigen (XLA's own convolutions) single-threaded
    "no_eigen_mt": ("--xla_cpu_multi_thread_eigen=false", 1, {}),
    # not "safe" (changes numerics); screened to show the ceiling, never picked as best
    "fast_math": ("--xla_cpu_enable_fast_math=true", 1, {}),
    # two host devices, jaxkd's data-parallel mesh (batch split in two, one half per core)
    "2dev_mesh": ("--xla_force_host_platform_device_count=2", 2, {}),
}
# onednn_conv is left out of the default screen: on this AVX2 machine it dies with SIGILL
# while compiling ("partition compile failed"), after ~40 s. concurrency_sched and fast_math
# were screened in the README's runs (slower; fast_math changes the numbers); add them with
# --flag-sets to re-check.
DEFAULT_SCREEN = "default,xla_default,no_ynn,ynn_eltwise,no_eigen_mt,2dev_mesh"
SCREEN_WARMUP = 1  # the first (compiling) call is the only warm-up in the screen


# --------------------------------------------------------------------------- load meter
def _proc_stat_busy() -> float:
    """Busy CPU seconds of the whole machine so far (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0
    # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


class Window:
    """Times a region; also how many cores this process and everything else used in it."""

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.cpu0 = time.process_time()
        self.busy0 = _proc_stat_busy()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        own = (time.process_time() - self.cpu0) / self.wall
        machine = (_proc_stat_busy() - self.busy0) / self.wall
        self.own = own
        self.others = max(0.0, machine - own)
        return False


def wait_for_quiet(threshold: float, max_wait: float) -> float:
    """Sleeps (idle) until the rest of the machine uses < ``threshold`` cores over a 1 s window,
    or ``max_wait`` seconds passed; returns the last load seen. 0 disables."""
    if max_wait <= 0:
        return 0.0
    deadline = time.perf_counter() + max_wait
    while True:
        with Window() as w:
            time.sleep(1.0)
        if w.others < threshold or time.perf_counter() >= deadline:
            return w.others
        time.sleep(1.0)


def library_fusions(hlo_text: str) -> dict[str, int]:
    """From optimized HLO text: how many library fusions of each kind (YNNPACK ``ynn``,
    XNNPACK ``xnn``, oneDNN ``onednn``) there are, how many convolutions run inside them and
    how many run as XLA's own (Eigen) convolutions (``conv_xla``)."""
    import re

    bodies: dict[str, str] = {}
    name, buf = None, []
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            name, buf = head.group(1), []
        elif line.startswith("}") and name is not None:
            bodies[name] = "\n".join(buf)
            name = None
        elif name is not None:
            buf.append(line)
    conv = re.compile(r"= \S+ convolution\(")
    counts: dict[str, int] = {}
    in_lib = 0
    for line in hlo_text.splitlines():
        kind = re.search(r'"kind":"__(\w+?)_fusion"', line)
        called = re.search(r"calls=%?([\w.\-]+)", line)
        if kind and called:
            counts[kind.group(1)] = counts.get(kind.group(1), 0) + 1
            in_lib += len(conv.findall(bodies.get(called.group(1), "")))
    counts["conv_in_library"] = in_lib
    counts["conv_xla"] = len(conv.findall(hlo_text)) - in_lib
    return counts


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    fl = line.split(":", 1)[1].split()
                    keep = [x for x in fl if x.startswith(("avx512f", "avx512_bf16", "avx512_vnni",
                                                            "avx2", "amx", "fma"))]
                    return " ".join(sorted(set(keep)))
    except OSError:
        pass
    return ""


# --------------------------------------------------------------------------- worker (child)
def worker(args) -> None:
    """Builds and times the jaxkd steps in this process; writes a JSON result."""
    import numpy as np
    import jax
    import jax.numpy as jnp

    compile_events: dict[str, float] = {}

    def _on_event(event, duration, **_kw):
        if event.startswith("/jax/core/compile/"):
            key = event.rsplit("/", 1)[-1]
            compile_events[key] = compile_events.get(key, 0.0) + duration

    jax.monitoring.register_event_duration_secs_listener(_on_event)

    import jaxkd

    jaxkd.apply_cpu_defaults()  # jaxkd's XLA:CPU defaults (no longer applied by `import jaxkd`)
    from jaxkd.models import count_params, create_model
    from jaxkd.train import optim, recipes
    from jaxkd.train import step as step_lib
    from jaxkd.models import ModelFns

    batch_size = args.batch
    modes = args.modes.split(",")
    devices = args.devices
    mesh = step_lib.make_mesh(devices) if devices > 1 else None

    student = create_model("resnet8x4", NUM_CLASSES)
    teacher = create_model("resnet32x4", NUM_CLASSES)
    # A "teacher" whose variables are the logits themselves: lets the unchanged train step
    # run KD from cached teacher logits (they travel as the step's teacher_variables).
    cached = ModelFns(name="cached_logits", init=lambda rng, x: {},
                      apply=lambda v, x, train, rng=None: (v["logits"], {"logits": v["logits"]}, {}))

    tx, _ = optim.make_optimizer({"name": "sgd", "lr": LR, "momentum": MOMENTUM,
                                  "weight_decay": WEIGHT_DECAY, "schedule": "constant"}, 1, 1)
    pipeline = step_lib.InputPipeline(mean=CIFAR100_MEAN, std=CIFAR100_STD, pad=0, flip=False)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(batch_size, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, size=(batch_size,)).astype(np.int32)
    host_batch = {"image": images, "label": labels}
    batch = step_lib.shard_batch(host_batch, mesh)
    sample = jnp.zeros((2, 32, 32, 3), jnp.float32)

    t_vars = teacher.init(jax.random.key(1), sample)
    rep = (lambda tree: jax.device_put(tree, step_lib.replicated(mesh))) if mesh else (lambda t: t)
    t_vars = rep(t_vars)

    # jaxkd may have added its own XLA defaults on import: record what is in effect
    out = {"batch": batch_size, "devices": devices, "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "jaxkd_no_xla_defaults": os.environ.get("JAXKD_NO_XLA_DEFAULTS", ""),
           "jax": jax.__version__, "backend": jax.default_backend(),
           "n_devices_visible": len(jax.devices()), "rows": {}}
    out["params_student"] = count_params(student.init(jax.random.key(0), sample)["params"])
    out["params_teacher"] = count_params(t_vars["params"])

    def fresh_state(recipe):
        s = step_lib.create_train_state(jax.random.key(0), student, recipe, tx, sample)
        return rep(s)

    def run_timed(jitted, call_args, n_warmup):
        """AOT-compiles ``jitted`` for ``call_args`` (timed), then times calls of the
        executable. ``call_args()`` returns the arguments of the next call; the result of the
        last call is returned."""
        compile_events.clear()
        t0 = time.perf_counter()
        lowered = jitted.lower(*call_args())
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        res = compiled(*call_args())
        jax.block_until_ready(res)
        first = time.perf_counter() - t0
        yield_first(res)
        hlo_text = compiled.as_text()
        hlo = library_fusions(hlo_text)
        last_exec.update(compiled=compiled, hlo_text=hlo_text, call_args=call_args)
        for _ in range(max(0, n_warmup - 1)):
            res = compiled(*call_args())
            yield_next(res)
        jax.block_until_ready(res)
        ips, ms, others, own = [], [], [], []
        for _ in range(args.repeats):
            wait_for_quiet(args.quiet_threshold, args.quiet_wait)
            with Window() as w:
                for _ in range(args.steps):
                    res = compiled(*call_args())
                    yield_next(res)
                jax.block_until_ready(res)
            ips.append(args.steps * batch_size / w.wall)
            ms.append(1e3 * w.wall / args.steps)
            others.append(w.others)
            own.append(w.own)
        return res, {"ips_median": statistics.median(ips), "ips_min": min(ips), "ips_max": max(ips),
                     "ips_all": ips, "step_ms_median": statistics.median(ms),
                     "first_call_s": first, "trace_lower_s": t1 - t0, "xla_compile_s": t2 - t1,
                     "compile_events_s": dict(compile_events), "library_fusions": hlo,
                     "others_load_max": max(others), "own_cores_median": statistics.median(own)}

    # hooks that let train steps thread the donated state through the calls
    hooks = {"first": None, "next": None}
    last_exec: dict = {}  # the last executable timed (for --profile)
    kd_exec: dict = {}

    def yield_first(res):
        if hooks["first"]:
            hooks["first"](res)

    def yield_next(res):
        if hooks["next"]:
            hooks["next"](res)

    kd_box: dict = {}

    def train_mode(recipe, teacher_fns, teacher_variables):
        step = step_lib.make_train_step(student, recipe, tx, pipeline, teacher=teacher_fns,
                                        mesh=mesh, donate=True)
        box = {"state": fresh_state(recipe)}
        first_metrics = {}

        def take(res):  # the input state was donated: continue from the returned one
            box["state"] = res[0]

        def take_first(res):
            take(res)
            first_metrics.update({k: float(v) for k, v in res[1].items()})

        hooks["first"], hooks["next"] = take_first, take
        kd_box["box"] = box
        try:
            (state, metrics), r = run_timed(step, lambda: (box["state"], teacher_variables, batch),
                                            args.warmup)
        finally:
            hooks["first"] = hooks["next"] = None
        last = {k: float(v) for k, v in metrics.items()}
        if not all(np.isfinite(v) for v in last.values()):
            raise RuntimeError(f"non-finite metrics {last}")
        r["first_step_metrics"] = first_metrics
        r["last_step_metrics"] = last
        return r

    # teacher forward (d) also provides the cached logits of (c)
    x_float = jax.jit(lambda im: pipeline(None, im, train=False))(batch["image"])
    if mesh is not None:
        fwd = jax.jit(lambda v, x: teacher.apply(v, x, train=False)[0],
                      in_shardings=(step_lib.replicated(mesh), step_lib.data_sharding(mesh)))
    else:
        fwd = jax.jit(lambda v, x: teacher.apply(v, x, train=False)[0])

    for mode in modes:
        t_start = time.perf_counter()
        try:
            if mode == "a":
                r = train_mode(recipes.cross_entropy_recipe(), None, None)
            elif mode == "b":
                r = train_mode(recipes.hinton_kd_recipe(TEMPERATURE, ALPHA, 1.0 - ALPHA), teacher, t_vars)
                kd_exec.update(last_exec, box=kd_box["box"])
            elif mode == "c":
                logits = jax.block_until_ready(fwd(t_vars, x_float))
                r = train_mode(recipes.hinton_kd_recipe(TEMPERATURE, ALPHA, 1.0 - ALPHA), cached,
                               rep({"logits": logits}))
            elif mode == "d":
                logits, r = run_timed(fwd, lambda: (t_vars, x_float), args.warmup)
                arr = np.asarray(logits)
                r["check"] = {"teacher_logits_abs_mean": float(np.abs(arr).mean()),
                              "teacher_logits_00": float(arr[0, 0])}
            else:
                raise ValueError(f"unknown mode {mode!r}")
        except Exception as e:  # report, keep going with the other modes
            r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        r["wall_s"] = time.perf_counter() - t_start
        out["rows"][mode] = r
        msg = (f"{r['ips_median']:7.1f} img/s [{r['ips_min']:.1f}-{r['ips_max']:.1f}] "
               f"{r['step_ms_median']:7.1f} ms/step first call {r['first_call_s']:.1f}s "
               f"(others' load max {r['others_load_max']:.2f})") if "error" not in r else r["error"]
        print(f"  [jaxkd {args.label}] B={batch_size} {mode} {MODE_NAMES[mode]}: {msg}", flush=True)

    if args.profile and kd_exec:
        try:
            # continue from the returned state (the input one was donated)
            out["profile"] = profile_step(
                kd_exec, hooks_take=lambda res: kd_exec["box"].__setitem__("state", res[0]))
        except Exception as e:
            out["profile"] = {"error": f"{type(e).__name__}: {e}"[:300]}

    with open(args.worker_out, "w") as f:
        json.dump(out, f, indent=1)


def _hlo_index(hlo_text: str) -> dict[str, str]:
    """Instruction name -> short description (opcode of the fused root, shape, op_name)."""
    import re

    roots: dict[str, str] = {}
    comp = None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            comp = head.group(1)
        elif comp and line.strip().startswith("ROOT "):
            m = re.search(r"= (\S+) (\w[\w\-]*)\(", line)
            if m:
                roots[comp] = f"{m.group(2)} {m.group(1).split('{')[0]}"
    index = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) (\w[\w\-]*)\(", line)
        if not m:
            continue
        name, shape, opcode = m.group(1), m.group(2).split("{")[0], m.group(3)
        called = re.search(r"calls=%?([\w.\-]+)", line)
        desc = roots.get(called.group(1), f"{opcode} {shape}") if (called and opcode == "fusion") \
            else f"{opcode} {shape}"
        meta = re.search(r'op_name="([^"]*)"', line)
        kind = re.search(r'"kind":"__(\w+?)_fusion"', line)
        index[name] = {"lib": kind.group(1) if kind else "xla", "op": desc,
                       "op_name": meta.group(1) if meta else ""}
    return index


def _op_class(entry) -> str:
    """teacher fwd / student fwd / student bwd x conv / dot / other, from the op_name."""
    name = entry["op_name"]
    if "transpose(jvp(" in name:
        part = "student bwd"
    elif "jvp(" in name:
        part = "student fwd"
    elif "CifarResNet" in name:
        part = "teacher fwd"
    else:
        part = "other"
    opcode = entry["op"].split(" ")[0]
    op = {"convolution": "conv", "dot": "dot"}.get(opcode, "elementwise/reduce/copy")
    if opcode == "convolution" and part == "other":
        # XLA drops the op_name of the transposed (weight-gradient) convolutions
        part, op = "student bwd", "conv weight-grad"
    elif opcode == "convolution" and part == "student bwd":
        op = "conv input-grad"
    return f"{part}: {op} ({entry['lib']})"


def profile_step(kd_exec, hooks_take, n_steps: int = 2, top: int = 12):
    """Profiles ``n_steps`` KD steps with jax.profiler and sums the time of each XLA op over
    the intra-op threads; returns the top ops and totals per op kind."""
    import glob
    import shutil

    import jax

    compiled, call_args = kd_exec["compiled"], kd_exec["call_args"]
    index = _hlo_index(kd_exec["hlo_text"])
    tmp = tempfile.mkdtemp(prefix="jaxkd_prof_")
    try:
        t0 = time.perf_counter()
        with jax.profiler.trace(tmp):
            for _ in range(n_steps):
                res = compiled(*call_args())
                hooks_take(res)
            jax.block_until_ready(res)
        wall_ms = 1e3 * (time.perf_counter() - t0) / n_steps
        files = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        data = jax.profiler.ProfileData.from_file(files[0])
        per_op: dict[str, float] = {}
        skip = ("ThunkExecutor", "SlinkyThreadPool", "Await")
        for plane in data.planes:
            for line in plane.lines:
                if "XLAEigen" not in line.name and "XLA" not in line.name:
                    continue
                for ev in line.events:
                    if ev.name.startswith(skip) or ev.name not in index:
                        continue
                    per_op[ev.name] = per_op.get(ev.name, 0.0) + ev.duration_ns / 1e6 / n_steps
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = sum(per_op.values())
    kinds: dict[str, float] = {}
    for name, ms in per_op.items():
        key = _op_class(index[name])
        kinds[key] = kinds.get(key, 0.0) + ms
    tops = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
    return {"wall_ms_per_step": wall_ms, "op_ms_per_step_all_threads": total,
            "by_kind_ms": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top_ops": [{"name": n, "ms": ms, "share": ms / total if total else 0.0,
                         **index[n]} for n, ms in tops]}


# --------------------------------------------------------------------------- parent
def run_jaxkd(label, flag_set, modes, batch, warmup, steps, repeats, timeout, quiet=(0.25, 0.0),
              profile=False, extra_flags=""):
    flags, devices, extra_env = FLAG_SETS[flag_set]
    env = dict(os.environ)
    env.update(extra_env)
    env["XLA_FLAGS"] = " ".join(x for x in (env.get("XLA_FLAGS", ""), flags, extra_flags) if x).strip()
    env.setdefault("PYTHONPATH", "")
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env["PYTHONPATH"] else "")
    env["TF_CPP_MIN_LOG_LEVEL"] = env.get("TF_CPP_MIN_LOG_LEVEL", "1")
    fd, out_path = tempfile.mkstemp(prefix=f"jaxkd_bench_{label}_", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--worker-out", out_path,
           "--label", label, "--modes", modes, "--batch", str(batch), "--warmup", str(warmup),
           "--steps", str(steps), "--repeats", str(repeats), "--devices", str(devices),
           "--quiet-threshold", str(quiet[0]), "--quiet-wait", str(quiet[1])]
    if not profile:
        cmd.append("--no-profile")
    print(f"[jaxkd {label}] XLA_FLAGS='{env['XLA_FLAGS']}' modes={modes} B={batch}", flush=True)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, cwd=REPO, timeout=timeout, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        sys.stdout.write(p.stdout)
        rc, tail = p.returncode, p.stdout[-1500:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", (e.stdout or b"")[-1500:] if isinstance(e.stdout, bytes) else str(e.stdout)[-1500:]
    wall = time.perf_counter() - t0
    # "xla_flags" is replaced by the child's record of the flags in effect (after jaxkd's own)
    res = {"label": label, "flag_set": flag_set, "xla_flags": env["XLA_FLAGS"],
           "xla_flags_passed": env["XLA_FLAGS"], "devices": devices, "wall_s": wall}
    try:
        with open(out_path) as f:
            res.update(json.load(f))
    except (OSError, json.JSONDecodeError):
        pass
    finally:
        try:
            os.unlink(out_path)
        except OSError:
            pass
    if rc != 0 or "rows" not in res:
        res["error"] = f"child exit {rc}: " + " | ".join(
            ln for ln in str(tail).splitlines()[-4:] if ln.strip())[:500]
        print(f"[jaxkd {label}] FAILED: {res['error']}", flush=True)
    return res


def run_torch(args):
    """Runs the peer once per variant (so one slow or failing variant costs only its own
    rows) and merges the JSON it writes (``--json``)."""
    if not os.path.exists(TORCH_PY):
        return {"error": f"no torch venv at {TORCH_PY} (see benchmarks/README.md)"}
    script = os.path.join(TORCH_REF_DIR, "bench_kd_step.py")
    env = dict(os.environ)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # leave the shared directory untouched
    for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[v] = str(args.threads)
    merged = {"steps": [], "wall_s": 0.0}
    variants = [v for v in args.torch_variants.split(",") if v]
    for i, variant in enumerate(variants):
        fd, out_path = tempfile.mkstemp(prefix="torch_ref_", suffix=".json")
        os.close(fd)
        modes = "a,b" if variant.startswith("compile") else "a,b,c,d"
        cmd = [TORCH_PY, script, "--batch-sizes", str(args.batch), "--modes", modes,
               "--variants", variant, "--compile-modes", "a,b",
               "--warmup", str(args.torch_warmup), "--steps", str(args.torch_steps),
               "--repeats", str(args.torch_repeats), "--threads", str(args.threads),
               "--quiet-wait", str(args.quiet_wait), "--quiet-threshold", str(args.quiet_threshold),
               "--json", out_path]
        if i == 0:
            cmd += ["--peak-n", "2048"]   # float32 matmul peak, once, as a machine reference
        else:
            cmd += ["--skip-peak"]
        print(f"[torch {variant}] {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc, tail = None, ""
        try:
            p = subprocess.run(cmd, cwd=TORCH_REF_DIR, env=env, timeout=args.torch_timeout,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            sys.stdout.write(p.stdout)
            rc, tail = p.returncode, p.stdout[-600:]
        except subprocess.TimeoutExpired:
            rc = f"timeout after {args.torch_timeout:.0f} s"
        merged["wall_s"] += time.perf_counter() - t0
        try:
            with open(out_path) as f:
                res = json.load(f)
            for k, v in res.items():
                if k == "steps":
                    merged["steps"].extend(v)
                elif k == "peak":
                    merged.setdefault("peak", {}).update(v)
                elif v is not None:
                    merged[k] = v
                else:
                    merged.setdefault(k, v)
        except (OSError, json.JSONDecodeError):
            err = f"torch peer {variant}: exit {rc} {tail.strip().splitlines()[-1] if tail.strip() else ''}"
            print(f"[torch {variant}] FAILED: {err}", flush=True)
            merged.setdefault("errors", []).append(err)
            for m in modes.split(","):
                merged["steps"].append({"batch": args.batch, "mode": m, "variant": variant,
                                        "error": err[:200]})
        finally:
            try:
                os.unlink(out_path)
            except OSError:
                pass
    return merged


def fmt_ips(r):
    if not r or "error" in r:
        return "failed: " + (r or {}).get("error", "not run")[:80]
    return f"{r['ips_median']:.1f} [{r['ips_min']:.1f}-{r['ips_max']:.1f}]"


def flags_text(run) -> str:
    """The XLA flags in effect in a child (markdown)."""
    text = f"`{run['xla_flags']}`" if run.get("xla_flags") else "(none)"
    if run.get("jaxkd_no_xla_defaults"):
        text += " with `JAXKD_NO_XLA_DEFAULTS=1`"
    return text


def rel_diff(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def screen_check(base, other, which="first_step_metrics"):
    """Largest relative difference of the KD step's loss / grad-norm / loss parts, after the
    first step (``first_step_metrics``) or the last one (``last_step_metrics``; every screen
    run takes the same number of steps)."""
    try:
        m0 = base["rows"]["b"][which]
        m1 = other["rows"]["b"][which]
    except KeyError:
        return None
    keys = [k for k in ("loss", "grad_norm", "kd", "ce") if k in m0 and k in m1]
    return max(rel_diff(m0[k], m1[k]) for k in keys) if keys else None


def build_summary(args, meta, screen, jax_main, jax_best, torch_res):
    B = args.batch
    lines = []
    lines.append(f"### jaxkd vs PyTorch peer: resnet32x4 -> resnet8x4, B={B}, float32, "
                 f"{meta['date']}, {meta['cpu']} ({meta['nproc']} cores)")
    f_t = (torch_res or {}).get("flop_teacher_fwd", FLOP_TEACHER_FWD)
    f_s = (torch_res or {}).get("flop_student_fwd", FLOP_STUDENT_FWD)
    flop = {"a": 3 * f_s, "b": f_t + 3 * f_s, "c": 3 * f_s, "d": f_t}

    def add(mode, impl, r):
        if not r or "error" in r:
            lines.append(f"| {mode} | {MODE_NAMES[mode]} | {impl} | {fmt_ips(r)} | | | | |")
            return
        lines.append(f"| {mode} | {MODE_NAMES[mode]} | {impl} | {fmt_ips(r)} | "
                     f"{r['step_ms_median']:.0f} | {r['ips_median'] * flop[mode] / 1e9:.0f} | "
                     f"{r.get('own_cores_median', 0):.2f} | "
                     f"{r.get('others_load_max', r.get('foreign_load_max', 0)):.2f} |")

    lines.append("")
    lines.append(f"jaxkd (default): XLA_FLAGS in effect {flags_text(jax_main)}"
                 + (f"; jaxkd ({jax_best['flag_set']}): {flags_text(jax_best)}" if jax_best else ""))
    lines.append("")
    lines.append("| row | step | implementation | img/s median [min-max] | ms/step | GFLOP/s | own cores | others' load max |")
    lines.append("|---|---|---|---|---|---|---|---|")
    torch_rows = {}
    for row in (torch_res or {}).get("steps", []):
        torch_rows.setdefault(row["mode"], {})[row["variant"]] = row
    runs = [("jaxkd (default)", jax_main)]
    if jax_best is not None:
        runs.append((f"jaxkd ({jax_best['flag_set']})", jax_best))
    for mode in "abcd":
        for impl, run in runs:
            if run is not None and mode in run.get("rows", {}):
                add(mode, impl, run["rows"][mode])
        for variant, row in torch_rows.get(mode, {}).items():
            add(mode, f"torch {variant}", row if "error" not in row else {"error": row["error"]})

    # ratios
    def ips(run, mode):
        r = (run or {}).get("rows", {}).get(mode, {})
        return r.get("ips_median") if "error" not in r else None

    def torch_best(mode):
        cands = [(row["ips_median"], v) for v, row in torch_rows.get(mode, {}).items()
                 if "error" not in row]
        return max(cands) if cands else (None, None)

    ratios = {}
    lines.append("")
    lines.append("| ratio | value | from |")
    lines.append("|---|---|---|")
    for impl, run in runs:
        jb, ja, jd = ips(run, "b"), ips(run, "a"), ips(run, "d")
        tb, tbv = torch_best("b")
        ta, tav = torch_best("a")
        if jb and tb:
            ratios[f"{impl}: KD step / torch best KD"] = jb / tb
            lines.append(f"| {impl}: KD step (b) img/s / torch best KD | {jb / tb:.2f} | "
                         f"{jb:.1f} / {tb:.1f} (torch {tbv}) |")
        if ja and ta:
            ratios[f"{impl}: student step / torch best student"] = ja / ta
            lines.append(f"| {impl}: student step (a) img/s / torch best student | {ja / ta:.2f} | "
                         f"{ja:.1f} / {ta:.1f} (torch {tav}) |")
        if jb and ja and jd:
            # time per image: KD vs the sum of its parts measured alone
            r = (1 / jb) / (1 / jd + 1 / ja)
            ratios[f"{impl}: KD time / (teacher fwd + student step)"] = r
            lines.append(f"| {impl}: KD step time / (teacher fwd time + student step time) | "
                         f"{r:.2f} | {1e3 * B / jb:.0f} ms vs {1e3 * B / jd:.0f} + {1e3 * B / ja:.0f} ms |")
        jc = ips(run, "c")
        if jc and ja:
            ratios[f"{impl}: cached-logits KD time / student step time"] = ja / jc
            lines.append(f"| {impl}: cached-logits KD step time / student step time | {ja / jc:.2f} | "
                         f"{1e3 * B / jc:.0f} ms vs {1e3 * B / ja:.0f} ms |")
    for variant in sorted({v for m in torch_rows.values() for v in m}):
        r = {m: torch_rows.get(m, {}).get(variant, {}) for m in "abd"}
        if all("ips_median" in r[m] and "error" not in r[m] for m in "abd"):
            v = (1 / r["b"]["ips_median"]) / (1 / r["d"]["ips_median"] + 1 / r["a"]["ips_median"])
            ratios[f"torch {variant}: KD time / (teacher fwd + student step)"] = v
            lines.append(f"| torch {variant}: KD step time / (teacher fwd time + student step time) | "
                         f"{v:.2f} | {r['b']['step_ms_median']:.0f} ms vs {r['d']['step_ms_median']:.0f} + "
                         f"{r['a']['step_ms_median']:.0f} ms |")
    for impl, run in runs:
        b = (run or {}).get("rows", {}).get("b", {})
        if "first_call_s" in b:
            lines.append(f"| {impl}: KD step compile (first call) | {b['first_call_s']:.1f} s | "
                         f"trace+lower {b['trace_lower_s']:.1f} s, XLA compile "
                         f"{b['xla_compile_s']:.1f} s, first run {b['first_call_s'] - b['trace_lower_s'] - b['xla_compile_s']:.1f} s |")
    pk = (torch_res or {}).get("peak", {})
    for key in ("torch_2048", "numpy_2048"):
        if key in pk:
            g = pk[key]["gflops"]
            lines.append(f"| float32 2048^3 matmul, {key.split('_')[0]} | "
                         f"{statistics.median(g):.0f} GFLOP/s | machine reference |")

    if screen:
        base = next((s for s in screen if s["flag_set"] == "default" and "error" not in s), None)
        lines.append("")
        n_steps = SCREEN_WARMUP + args.screen_repeats * args.screen_steps
        lines.append(f"XLA flag screen (KD step b, B={args.screen_batch}, "
                     f"{args.screen_repeats}x{args.screen_steps} timed steps; 'numbers' = max rel. diff "
                     f"of loss/grad-norm vs the default flags after step 1 / after step {n_steps}):")
        lines.append("")
        lines.append("| flag set | XLA_FLAGS | KD img/s median [min-max] | vs default | XLA compile s | numbers | library fusions in KD step HLO | others' load |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for s in screen:
            b = s.get("rows", {}).get("b", {"error": s.get("error", "not run")})
            if "error" in b or "error" in s:
                err = b.get("error") or s.get("error")
                lines.append(f"| {s['flag_set']} | {flags_text(s)} | failed: {err[:120]} | | | | | |")
                continue
            rel = ""
            if base is not None and "ips_median" in base["rows"].get("b", {}):
                rel = f"{b['ips_median'] / base['rows']['b']['ips_median']:.2f}x"
            chk = screen_check(base, s) if base is not None else None
            chk_n = screen_check(base, s, "last_step_metrics") if base is not None else None
            chk_s = " / ".join("-" if c is None else f"{c:.0e}" for c in (chk, chk_n))
            fus = ", ".join(f"{k} {v}" for k, v in sorted(b.get("library_fusions", {}).items()))
            lines.append(f"| {s['flag_set']} | {flags_text(s)} | {fmt_ips(b)} | {rel} | "
                         f"{b['xla_compile_s']:.1f} | {chk_s} | {fus} | {b['others_load_max']:.2f} |")
    return "\n".join(lines), ratios


def git_describe() -> str:
    """Commit of the measured jaxkd, plus '+dirty' if jaxkd/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "jaxkd"], cwd=REPO, text=True,
                               capture_output=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def profile_tables(args, jax_main) -> str:
    table = ""
    prof = jax_main.get("profile") or {}
    if "by_kind_ms" in prof:
        total = prof["op_ms_per_step_all_threads"]
        cores = os.cpu_count() or 1
        covered = total / (prof["wall_ms_per_step"] * cores)
        table += (f"\n\nWhere the jaxkd KD step's time goes (jax.profiler, B={args.batch}, default flags; op time "
                  f"summed over the intra-op threads: {total:.0f} ms/step, wall {prof['wall_ms_per_step']:.0f} "
                  f"ms/step, so {100 * covered:.0f}% of wall x {cores} cores is attributed. Ops without "
                  "trace events, e.g. XLA's own (Eigen) convolutions, are missing; an op's time can include "
                  "waits on the shared thread pool):\n\n"
                  "| part | ms/step | share |\n|---|---|---|\n")
        table += "\n".join(f"| {k} | {v:.0f} | {100 * v / total:.0f}% |"
                            for k, v in prof["by_kind_ms"].items() if v >= 0.01 * total)
        table += "\n\nTop ops:\n\n| op | library | output | ms/step | share |\n|---|---|---|---|---|\n"
        table += "\n".join(f"| {o['op_name'][-60:] or ('(weight-grad conv, no op_name)' if o['op'].startswith('convolution') else '(no op_name)')} | {o['lib']} | "
                            f"`{o['op']}` | {o['ms']:.0f} | {100 * o['share']:.0f}% |"
                            for o in prof["top_ops"][:8])
    elif "error" in prof:
        table += f"\n\nprofile failed: {prof['error']}"
    return table


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--modes", default="a,b,c,d", help="jaxkd rows for the main run")
    ap.add_argument("--warmup", type=int, default=2, help="steps before timing (first = compile)")
    ap.add_argument("--steps", type=int, default=5, help="steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (jaxkd uses all cores)")
    ap.add_argument("--flag-sets", default=DEFAULT_SCREEN,
                    help=f"XLA flag sets to screen on the KD step; '' to skip. Known: {', '.join(FLAG_SETS)}")
    ap.add_argument("--screen-batch", type=int, default=None, help="default: --batch")
    ap.add_argument("--screen-steps", type=int, default=2)
    ap.add_argument("--screen-repeats", type=int, default=3)
    ap.add_argument("--best-margin", type=float, default=1.10,
                    help="rerun rows a-d with the best screened flag set if it beat the default "
                         "by this factor")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--torch-variants", default="eager,eager_cl,compile,compile_cl")
    ap.add_argument("--torch-steps", type=int, default=5)
    ap.add_argument("--torch-warmup", type=int, default=2)
    ap.add_argument("--torch-repeats", type=int, default=3)
    ap.add_argument("--torch-timeout", type=float, default=420, help="per torch variant")
    ap.add_argument("--quiet-wait", type=float, default=20.0,
                    help="before each timed repeat (jaxkd and torch) wait up to this long for "
                         "other processes to go idle (0: don't wait)")
    ap.add_argument("--quiet-threshold", type=float, default=0.3,
                    help="'idle' = other processes use fewer cores than this")
    ap.add_argument("--child-timeout", type=float, default=600)
    ap.add_argument("--no-profile", dest="profile", action="store_false",
                    help="skip the per-op profile of the KD step (jax.profiler, 2 steps)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke check: jaxkd only, B=16, default flags, few repeats (<2 min)")
    ap.add_argument("--json-out", default="")
    ap.add_argument("--table-from", default="", help="only reprint the tables of a --json-out file")
    # child-process options
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--label", default="main", help=argparse.SUPPRESS)
    ap.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        worker(args)
        return
    if args.table_from:
        with open(args.table_from) as f:
            saved = json.load(f)
        saved_args = argparse.Namespace(**saved["args"])
        table, _ = build_summary(saved_args, saved["meta"], saved["screen"], saved["jaxkd"],
                                 saved["jaxkd_best"], saved["torch"])
        print(table + profile_tables(saved_args, saved["jaxkd"]))
        return

    if args.quick:
        args.batch, args.repeats, args.steps, args.warmup = 16, 3, 2, 2
        args.quiet_wait = 0.0
        args.flag_sets, args.skip_torch, args.profile = "", True, False
    if args.screen_batch is None:
        args.screen_batch = args.batch

    t_start = time.perf_counter()
    meta = {"date": datetime.date.today().isoformat(), "cpu": cpu_model(), "cpu_flags": cpu_flags(),
            "nproc": os.cpu_count(), "python": platform.python_version(), "argv": sys.argv[1:],
            "git": git_describe()}
    print(f"{meta['date']}  cpu='{meta['cpu']}' ({meta['nproc']} cores; {meta['cpu_flags']})", flush=True)

    quiet = (args.quiet_threshold, args.quiet_wait)
    # 1. XLA flag screen on the KD step
    screen = []
    for name in [s for s in args.flag_sets.split(",") if s]:
        if name not in FLAG_SETS:
            raise SystemExit(f"unknown flag set {name!r}; known: {', '.join(FLAG_SETS)}")
        screen.append(run_jaxkd(f"screen-{name}", name, "b", args.screen_batch, SCREEN_WARMUP,
                                args.screen_steps, args.screen_repeats, args.child_timeout, quiet))

    best = None
    base = next((s for s in screen if s["flag_set"] == "default" and "error" not in s), None)
    if base is not None and "ips_median" in base["rows"].get("b", {}):
        ok = []
        for s in screen:
            b = s.get("rows", {}).get("b", {})
            chk = screen_check(base, s)
            # "safe": same numbers to float32 round-off level (fast-math is never picked)
            if "ips_median" in b and chk is not None and chk < 1e-4 and s["flag_set"] != "fast_math":
                ok.append((b["ips_median"], s["flag_set"]))
        if ok:
            top_ips, top = max(ok)
            if top != "default" and top_ips > args.best_margin * base["rows"]["b"]["ips_median"]:
                best = top
        print(f"[screen] best safe flag set: {best or 'default'}", flush=True)

    # 2. full jaxkd rows
    jax_main = run_jaxkd("main", "default", args.modes, args.batch, args.warmup, args.steps,
                         args.repeats, args.child_timeout, quiet, profile=args.profile)
    jax_best = None
    if best is not None:
        jax_best = run_jaxkd(f"best-{best}", best, args.modes, args.batch, args.warmup, args.steps,
                             args.repeats, args.child_timeout, quiet)

    # 3. PyTorch peer
    torch_res = None if args.skip_torch else run_torch(args)
    if torch_res is not None:
        meta["torch"] = torch_res.get("torch")
        for err in torch_res.get("errors", []) + ([torch_res["error"]] if "error" in torch_res else []):
            print(f"[torch] FAILED: {err}", flush=True)
    meta["jax"] = jax_main.get("jax")
    try:
        import importlib.metadata as md
        meta["jaxlib"], meta["flax"], meta["optax"] = (md.version(p) for p in ("jaxlib", "flax", "optax"))
    except Exception:
        pass
    meta["total_wall_s"] = time.perf_counter() - t_start

    table, ratios = build_summary(args, meta, screen, jax_main, jax_best, torch_res)
    table += profile_tables(args, jax_main)
    versions = (f"jaxkd {meta['git']}; jax {meta.get('jax')} / jaxlib {meta.get('jaxlib')} / flax {meta.get('flax')} / "
                f"optax {meta.get('optax')}; torch {meta.get('torch')}; total run {meta['total_wall_s'] / 60:.1f} min")
    print("\n" + table + "\n\n" + versions, flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"meta": meta, "args": vars(args), "screen": screen, "jaxkd": jax_main,
                       "jaxkd_best": jax_best, "torch": torch_res, "ratios": ratios,
                       "table_markdown": table}, f, indent=1)
        print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
