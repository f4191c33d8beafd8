"""Records a tiny teacher run and a KD run from it BEFORE the refactor (issue 15)."""
# Run at commit 7209601 (before issue 15) with XLA_FLAGS=--xla_backend_optimization_level=0 (the suite's setting).
import json
import os
import sys
import tempfile
import numpy as np
import jax
sys.path.insert(0, "tests")
from _configs import tiny_digits_config
from jaxkd.experiment import teacher_config
from jaxkd.train.loop import train_and_evaluate
from jaxkd.train import checkpoint as ckpt_lib
os.environ["JAXKD_DATA_DIR"] = tempfile.mkdtemp()
root = tempfile.mkdtemp()
out = {}
t_cfg = teacher_config(tiny_digits_config())
t_cfg.data.num_train_examples = 128
train_and_evaluate(t_cfg, f"{root}/teacher")
for name, cfg in {"teacher_ce_sgd": t_cfg,
                  "student_kd_sgd": tiny_digits_config(**{"teacher.workdir": f"{root}/teacher"}),
                  "student_ce_adam": tiny_digits_config(**{"method": {"name": "ce"}, "optim.name": "adam", "optim.lr": 1e-3}),
                  "student_ce_adamw": tiny_digits_config(**{"method": {"name": "ce"}, "optim.name": "adamw", "optim.lr": 1e-3, "optim.weight_decay": 0.01})}.items():
    wd = f"{root}/{name}"
    if name != "teacher_ce_sgd":
        train_and_evaluate(cfg, wd)
    else:
        wd = f"{root}/teacher"
    step, state = ckpt_lib.load_run_state(wd)
    leaves = jax.tree_util.tree_flatten_with_path({"params": state["params"], "model_state": state["model_state"]})[0]
    out[name] = {"step": int(step), "config": json.loads(json.dumps(cfg.to_dict())),
                 "leaves": {jax.tree_util.keystr(k): np.asarray(v).ravel().tolist() for k, v in leaves}}
json.dump({"recorded_at": "7209601", "xla_flags": "--xla_backend_optimization_level=0", "jax": jax.__version__, "runs": out}, open("tests/data/run_reference.json", "w"))
print("ok", {k: v["step"] for k, v in out.items()}, os.path.getsize("tests/data/run_reference.json"))
