"""The default XLA:CPU flag is applied only where it was checked, never overrides the user, and
only where a run starts (the CLI, the runner, ``jaxkd.apply_cpu_defaults()``), never at import."""

import os
import subprocess
import sys

import pytest

from jaxkd import _xla_defaults


def test_apply_respects_user_and_opt_out(monkeypatch):
    monkeypatch.setattr(_xla_defaults, "_jaxlib_version", lambda: "0.10.2")
    monkeypatch.setattr(_xla_defaults, "backends_initialized", lambda: False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.delenv("JAXKD_NO_XLA_DEFAULTS", raising=False)
    assert _xla_defaults.apply()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 " + _xla_defaults.CPU_CONV_FLAG
    assert not _xla_defaults.apply()  # already there: not added twice
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    assert not _xla_defaults.apply() and os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("JAXKD_NO_XLA_DEFAULTS", "1")
    assert not _xla_defaults.apply()
    monkeypatch.delenv("JAXKD_NO_XLA_DEFAULTS")
    monkeypatch.setattr(_xla_defaults, "_jaxlib_version", lambda: "0.11.0")  # unchecked: no flag
    assert not _xla_defaults.apply() and os.environ["XLA_FLAGS"] == ""


def test_apply_does_nothing_once_the_backend_exists(monkeypatch):
    """XLA reads XLA_FLAGS once: after the backend exists the flag cannot act, so it is not added."""
    monkeypatch.setattr(_xla_defaults, "_jaxlib_version", lambda: "0.10.2")
    monkeypatch.setattr(_xla_defaults, "backends_initialized", lambda: True)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.delenv("JAXKD_NO_XLA_DEFAULTS", raising=False)
    assert not _xla_defaults.apply()
    import jaxkd
    with pytest.warns(RuntimeWarning, match="before the first JAX computation"):
        assert not jaxkd.apply_cpu_defaults()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"


IMPORTS = ("import jaxkd; import jaxkd.losses; import jaxkd.methods; import jaxkd.models; import jaxkd.train; "
           "import jaxkd.core; import jaxkd.config; import jaxkd.experiment; import jax.numpy as jnp; "
           "float(jnp.ones(2).sum())")


@pytest.mark.parametrize("flags", [None, "--xla_backend_optimization_level=0"])
def test_import_leaves_xla_flags_untouched(flags):
    """``import jaxkd`` (and its public modules, and a first computation) changes no XLA_FLAGS."""
    code = f"import os, sys; {IMPORTS}; print(repr(os.environ.get('XLA_FLAGS')))"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXKD_NO_XLA_DEFAULTS")}
    if flags is not None:
        env["XLA_FLAGS"] = flags
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == repr(flags)


def test_flag_is_accepted_by_the_installed_jaxlib():
    """XLA aborts on unknown flags: a fresh process that opts in must compute normally."""
    code = ("import jaxkd, os; jaxkd.apply_cpu_defaults(); import jax.numpy as jnp; "
            "print(float(jnp.ones(3).sum())); print(os.environ.get('XLA_FLAGS'))")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXKD_NO_XLA_DEFAULTS")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "3.0"
    if _xla_defaults._jaxlib_version().startswith(_xla_defaults.CHECKED_JAXLIB):
        assert lines[1] == _xla_defaults.CPU_CONV_FLAG  # the flag was really passed to XLA
    else:
        assert lines[1] == "None"


def test_eval_compiler_options_respect_user_and_opt_out(monkeypatch):
    monkeypatch.setattr(_xla_defaults, "_jaxlib_version", lambda: "0.10.2")
    monkeypatch.delenv("JAXKD_NO_XLA_DEFAULTS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", _xla_defaults.CPU_CONV_FLAG)  # jaxkd's own flag: options apply
    assert _xla_defaults.eval_compiler_options() == {"xla_cpu_experimental_ynn_fusion_type": ""}
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=+LIBRARY_FUSION_TYPE_ELTWISE")
    assert _xla_defaults.eval_compiler_options() == {}  # the user's own YNNPACK setting wins
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("JAXKD_NO_XLA_DEFAULTS", "1")
    assert _xla_defaults.eval_compiler_options() == {}
    monkeypatch.delenv("JAXKD_NO_XLA_DEFAULTS")
    monkeypatch.setattr(_xla_defaults, "_jaxlib_version", lambda: "0.11.0")
    assert _xla_defaults.eval_compiler_options() == {}


def test_eval_step_compiles_without_library_fusions_and_same_numbers():
    """The eval step is compiled with the eval options (no YNNPACK fusions in its HLO) and gives
    the numbers of the default compilation of the same function."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxkd.models import create_model
    from jaxkd.train import step as step_lib

    if not _xla_defaults.eval_compiler_options():
        pytest.skip("eval options apply only to checked jaxlib versions on the CPU")
    model = create_model("resnet8x4", 10)
    pipeline = step_lib.InputPipeline(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)),
             "label": jnp.asarray(rng.integers(0, 10, 8).astype(np.int32))}
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    fast = step_lib.make_eval_step(model, pipeline)
    assert "__ynn_fusion" not in fast.lower(variables, batch).compile().as_text()
    # the same function compiled with the process defaults (which do use YNNPACK fusions)
    default = jax.jit(fast.__wrapped__)
    assert "__ynn_fusion" in default.lower(variables, batch).compile().as_text()
    got, want = fast(variables, batch), default(variables, batch)
    assert float(got["count"]) == 8.0
    np.testing.assert_allclose(float(got["loss_sum"]), float(want["loss_sum"]), rtol=1e-5)
    assert float(got["correct"]) == float(want["correct"])
