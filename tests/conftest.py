"""Suite-wide settings and the session fixtures shared by many test files.

The default run uses two pytest-xdist workers (``-n 2`` in pyproject.toml's addopts). Session
fixtures that cost seconds (the prepared data, the trained digits teacher, the 8-device child
process) are computed once for the whole run, by whichever worker asks first, under a file lock
in the run's shared temporary folder; the other worker reads the result.
"""

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import tempfile

import pytest

# Tests check numbers, not speed (speed lives in benchmarks/): XLA's backend (LLVM) optimisation is
# switched off, which makes compiling the suite's many small programs 2-3x cheaper. Processes the
# tests start inherit it through XLA_FLAGS (use ``child_xla_flags()`` when building their env).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if os.environ.get("JAXKD_TEST_FULL_XLA_OPT") is None and TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS).strip()

# jaxkd's runner adds its XLA:CPU defaults when it starts, if no computation ran before in the process
# (`import jaxkd` changes nothing). The suite adds them once, up front, so that every test and every
# process a test starts (through XLA_FLAGS) computes with the same flags, whatever ran first.
import jaxkd  # noqa: E402

jaxkd.apply_cpu_defaults()


def child_xla_flags() -> str:
    """``XLA_FLAGS`` for a child process of a test: the suite's settings without any device count."""
    return " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                    if not f.startswith("--xla_force_host_platform_device_count"))


# A persistent XLA compilation cache for the whole suite (and the processes it starts, through the
# environment): many tests compile the same small programs (a digits teacher, a tiny student's step),
# and a cache hit costs a file read instead of seconds of compilation. Set JAXKD_TEST_COMPILATION_CACHE
# to another folder, or to "" to compile everything afresh.
_CACHE = os.environ.get("JAXKD_TEST_COMPILATION_CACHE",
                        os.path.join(tempfile.gettempdir(), f"jaxkd-test-xla-cache-{os.getuid()}"))
if _CACHE:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _run_root(tmp_path_factory):
    """The folder all workers of this run share (xdist gives each worker a subfolder of it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def _exclusive(path):
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _once(tmp_path_factory, name, make):
    """``make(folder)`` run once per test run (across workers); its JSON result is kept in
    ``folder/result.json`` and returned to every caller."""
    folder = _run_root(tmp_path_factory) / f"shared_{name}"
    with _exclusive(str(folder) + ".lock"):
        done = folder / "result.json"
        if not done.exists():
            folder.mkdir(exist_ok=True)
            result = make(folder)
            with open(folder / "result.tmp", "w") as f:
                json.dump(result, f)
            os.replace(folder / "result.tmp", done)
        with open(done) as f:
            return json.load(f)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One prepared-data folder for the whole run (built-in builders prepare into it)."""
    path = str(_run_root(tmp_path_factory) / "tfds_data")

    def prepare(folder):
        os.environ["JAXKD_DATA_DIR"] = path
        from jaxkd import data as data_lib
        data_lib.load_dataset("digits")  # prepared under the lock: no two workers write it at once
        return path

    old = os.environ.get("JAXKD_DATA_DIR")
    os.environ["JAXKD_DATA_DIR"] = _once(tmp_path_factory, "data_dir", prepare)
    yield path
    if old is None:
        os.environ.pop("JAXKD_DATA_DIR", None)
    else:
        os.environ["JAXKD_DATA_DIR"] = old


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory, data_dir):
    """One trained digits teacher for the whole run: the cnn of experiments/configs/digits.py
    (width 32), cross-entropy, ``_configs.TEACHER_EPOCHS`` epochs on all 1,500 training digits.
    Returns ``(work dir, summary)``."""

    def train(folder):
        from _configs import TEACHER_EPOCHS, digits_config
        from jaxkd.experiment import teacher_config
        from jaxkd.train.loop import train_and_evaluate

        wd = str(folder / "teacher")
        return [wd, train_and_evaluate(teacher_config(digits_config(**{"train.num_epochs": TEACHER_EPOCHS})), wd)]

    wd, summary = _once(tmp_path_factory, "digits_teacher", train)
    return wd, summary


@pytest.fixture(scope="session")
def eight_devices(tmp_path_factory, data_dir, digits_teacher):
    """Results of every check in ``_eight_devices.CHECKS``, run once in one child process with 8
    forced CPU devices: ``eight_devices("module:function")`` returns that check's result (or fails
    the calling test with the check's traceback)."""
    import _eight_devices

    def run(folder):
        ctx = {"data_dir": data_dir, "teacher": digits_teacher[0], "tmp": str(folder)}
        with open(folder / "ctx.json", "w") as f:
            json.dump(ctx, f)
        env = dict(os.environ, JAXKD_DATA_DIR=data_dir)
        env["XLA_FLAGS"] = child_xla_flags()
        here = os.path.dirname(os.path.abspath(__file__))
        # the child imports the jaxkd of this checkout (a worktree), not whichever one is installed
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(here), env.get("PYTHONPATH")) if p)
        proc = subprocess.run([sys.executable, os.path.join(here, "_eight_devices.py"), str(folder / "ctx.json"),
                               str(folder / "out.json"), *_eight_devices.CHECKS], capture_output=True, text=True,
                              timeout=900, env=env, cwd=os.path.dirname(here))
        results = json.load(open(folder / "out.json")) if os.path.exists(folder / "out.json") else {}
        return {"results": results, "returncode": proc.returncode, "stderr": proc.stderr[-3000:]}

    out = _once(tmp_path_factory, "eight_devices", run)

    def get(name):
        results = out["results"]
        if name not in results:
            pytest.fail(f"8-device check {name} produced no result (child exit {out['returncode']}):\n"
                        f"{out['stderr']}")
        if "error" in results[name]:
            pytest.fail(f"8-device check {name} raised:\n{results[name]['error']}")
        return results[name]["result"]
    return get
