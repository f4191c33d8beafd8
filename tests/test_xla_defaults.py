"""The default XLA:CPU flag is applied only where it was checked, and never overrides the user."""

import os
import subprocess
import sys

from jaxkd import _xla_defaults


def test_apply_respects_user_and_opt_out(monkeypatch):
    monkeypatch.setattr(_xla_defaults, "_jaxlib_version", lambda: "0.10.2")
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


def test_flag_is_accepted_by_the_installed_jaxlib():
    """XLA aborts on unknown flags: a fresh process importing jaxkd must compute normally."""
    code = "import jaxkd, jax.numpy as jnp, os; print(float(jnp.ones(3).sum())); print(os.environ.get('XLA_FLAGS'))"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXKD_NO_XLA_DEFAULTS")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0] == "3.0"
