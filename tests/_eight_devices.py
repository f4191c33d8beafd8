"""One child process with 8 forced CPU devices runs every "8 devices equal 1" check of the suite.

Starting a process, importing JAX and compiling costs seconds each time, so the checks share one
child: ``python tests/_eight_devices.py CONTEXT_JSON OUT_JSON module:function ...``. Each check is a
function ``eight_devices_*(ctx) -> JSON-able result`` defined in its own test file, next to the
test that asserts on its result (through the session fixture ``eight_devices`` in conftest.py).
A check that raises records its traceback instead of a result; the others still run. Steps are
blocked on one at a time inside the checks (XLA:CPU aborts with many multi-device steps queued).
"""

import importlib
import json
import os
import sys
import traceback

#: every check of the suite, ``module:function`` (the fixture runs them all in one child)
CHECKS = (
    "test_train:eight_devices_kd_step",
    "test_train:eight_devices_loop",
    "test_bss:eight_devices_bss",
    "test_feature_losses:eight_devices_batch_means",
    "test_teacher_cache:eight_devices_cache",
    "test_interface:eight_devices_batch_term",
    "test_crd:eight_devices_crd",
    "test_transformer_kd:eight_devices_transformer_kd",
    "test_sskd:eight_devices_sskd",
    "test_fidelity:eight_devices_fidelity",
)


def main(argv):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import jax

    assert jax.device_count() == 8, jax.devices()
    with open(argv[0]) as f:
        ctx = json.load(f)
    out = {}
    for name in argv[2:]:
        module, function = name.split(":")
        try:
            out[name] = {"result": getattr(importlib.import_module(module), function)(ctx)}
        except Exception:  # noqa: BLE001 - reported to the test that owns the check
            out[name] = {"error": traceback.format_exc()}
        with open(argv[1], "w") as f:  # after every check: a crash still leaves the earlier results
            json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1:])
