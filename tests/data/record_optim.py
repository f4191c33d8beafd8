"""Records the optimizer updates of jaxkd's sgd/adam/adamw configs BEFORE the any-optax change."""
# Run at commit 7209601 (before issue 15) with XLA_FLAGS=--xla_backend_optimization_level=0 (the suite's setting).
import json
import numpy as np
import jax
import jax.numpy as jnp
import optax
from jaxkd.train import optim as optim_lib

def tree():
    rng = np.random.default_rng(0)
    return {"student": {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
                                 "bias": rng.normal(size=(4,)).astype(np.float32)},
                        "bn": {"scale": rng.normal(size=(4,)).astype(np.float32)}},
            "aux": {"head": {"kernel": rng.normal(size=(4, 3)).astype(np.float32)}}}

def grads(i):
    rng = np.random.default_rng(100 + i)
    return jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), tree())

CONFIGS = {
  "sgd_step": dict(name="sgd", lr=0.05, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="step", milestones=(1, 2), decay=0.1, warmup_epochs=0.0),
  "sgd_nesterov_cosine_warmup": dict(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, schedule="cosine", milestones=(), decay=0.1, warmup_epochs=1.0),
  "sgd_nomomentum_nowd": dict(name="sgd", lr=0.2, momentum=0.0, nesterov=False, weight_decay=0.0, schedule="constant", milestones=(), decay=0.1, warmup_epochs=0.0),
  "adam_wd": dict(name="adam", lr=1e-3, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="step", milestones=(2,), decay=0.5, warmup_epochs=0.0),
  "adamw_cosine": dict(name="adamw", lr=3e-3, momentum=0.9, nesterov=False, weight_decay=0.05, schedule="cosine", milestones=(), decay=0.1, warmup_epochs=0.5),
}
out = {}
for name, cfg in CONFIGS.items():
    tx, sched = optim_lib.make_optimizer(cfg, steps_per_epoch=2, num_epochs=3)
    p = jax.tree.map(jnp.asarray, tree())
    s = tx.init(p)
    upd = jax.jit(tx.update)
    for i in range(6):
        u, s = upd(jax.tree.map(jnp.asarray, grads(i)), s, p)
        p = optax.apply_updates(p, u)
    leaves = jax.tree_util.tree_flatten_with_path(p)[0]
    out[name] = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
                 "params": {jax.tree_util.keystr(k): np.asarray(v).ravel().tolist() for k, v in leaves},
                 "hex": {jax.tree_util.keystr(k): np.asarray(v).tobytes().hex() for k, v in leaves}}
json.dump({"steps_per_epoch": 2, "num_epochs": 3, "num_steps": 6, "jax": jax.__version__, "optax": optax.__version__, "recorded_at": "7209601", "xla_flags": "--xla_backend_optimization_level=0", "runs": out}, open("tests/data/optim_reference.json", "w"), indent=1)
print("ok", list(out))
