"""Default XLA:CPU flags for jaxkd's runs, applied where a run starts, never at import.

``import jaxkd`` changes no global state. The runner applies :func:`apply` before it computes
anything: ``jaxkd`` on the command line (:func:`jaxkd.cli.run`) and
:func:`jaxkd.train.loop.train_and_evaluate` / :func:`jaxkd.train.setup.build_run` (which only
take effect when no JAX backend exists yet in the process). A library user who builds steps
themselves opts in with ``jaxkd.apply_cpu_defaults()`` before their first JAX computation.

With jaxlib 0.10.x, XLA:CPU hands convolutions to YNNPACK by default; on the 2-core AVX2
machines this project is measured on, XLA's own convolutions make the KD step 2.1-2.5x faster
with the same numbers (benchmarks/README.md, "XLA:CPU flags"). XLA aborts the process on an
unknown flag, so the flag is only added for jaxlib versions where it was checked. It only
touches the CPU backend. Opt out with ``JAXKD_NO_XLA_DEFAULTS=1``; flags the user already put
in ``XLA_FLAGS`` for the same setting win.

Forward-only (evaluation) computations get one more setting, per compilation rather than per
process (:func:`eval_compiler_options`): no YNNPACK library fusions at all. In an eval-mode
forward, XLA lets a YNNPACK fusion that starts at the final pooling + classifier grow upwards
and swallow the last stages' convolutions; XLA's own convolutions run them 1.4-1.7x faster for
resnet8x4 and 1.06-1.10x for the larger CIFAR models (``benchmarks/bench_eval.py``). Train
steps keep the process default: there YNNPACK's reductions (BatchNorm statistics) pay off.
"""

from __future__ import annotations

import os

CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
CHECKED_JAXLIB = ("0.10.",)


EVAL_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def _jaxlib_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("jaxlib")
    except Exception:  # noqa: BLE001 - not installed / unknown: do nothing
        return None


def backends_initialized() -> bool:
    """Whether this process already created its JAX backends (``XLA_FLAGS`` is read then, once)."""
    import sys

    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # noqa: BLE001 - private API moved: assume the worst (flags would be ignored)
        return True


def apply() -> bool:
    """Adds :data:`CPU_CONV_FLAG` to ``XLA_FLAGS`` when safe; returns whether it did.

    Changes nothing when ``JAXKD_NO_XLA_DEFAULTS`` is set, when the user's ``XLA_FLAGS`` already
    set the option, for unchecked jaxlib versions, and once the process's JAX backends exist (the
    flag could no longer take effect, so the environment is left as it is)."""
    if os.environ.get("JAXKD_NO_XLA_DEFAULTS"):
        return False
    if backends_initialized():
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return False
    version = _jaxlib_version()
    if version is None or not version.startswith(CHECKED_JAXLIB):
        return False
    os.environ["XLA_FLAGS"] = (flags + " " + CPU_CONV_FLAG).strip()
    return True


def eval_compiler_options() -> dict[str, str]:
    """Per-compilation XLA options for forward-only (eval) computations: ``jax.jit(...,
    compiler_options=eval_compiler_options())``. Empty unless the default backend is the CPU, the
    jaxlib version was checked, ``JAXKD_NO_XLA_DEFAULTS`` is unset and the user set no YNNPACK
    fusion flag of their own."""
    if os.environ.get("JAXKD_NO_XLA_DEFAULTS"):
        return {}
    if "xla_cpu_experimental_ynn_fusion_type" in os.environ.get("XLA_FLAGS", "").replace(CPU_CONV_FLAG, ""):
        return {}
    version = _jaxlib_version()
    if version is None or not version.startswith(CHECKED_JAXLIB):
        return {}
    import jax

    if jax.default_backend() != "cpu":
        return {}
    return dict(EVAL_COMPILER_OPTIONS)
