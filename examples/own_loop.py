"""Distillation in your own training loop: your Flax model, your optax loop, jaxkd's losses and taps.

    python examples/own_loop.py [--teacher-steps 300] [--student-steps 300] [--train-examples 200]

No jaxkd trainer: a Linen CNN teacher and a narrower CNN student, both sowing feature taps;
`jaxkd.models.from_linen` turns each into `apply(variables, x, train) -> (logits, features,
new_state)` where `features` holds every sown tap, and the student's loss is
CE + Hinton KD + attention transfer from `jaxkd.losses`. Data: scikit-learn's digits.
"""
import argparse
import json
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
import jaxkd
from jaxkd import losses
from jaxkd.models import from_linen

class CNN(nn.Module):
    width: int
    @nn.compact
    def __call__(self, x, train: bool):
        for i, w in enumerate((self.width, 2 * self.width)):
            x = nn.relu(nn.Conv(w, (3, 3))(x))
            self.sow("intermediates", f"block{i + 1}", x)       # a feature tap: features["block1"]
        return nn.Dense(10)(x.mean((1, 2)))

def train(fns, variables, loss_fn, xs, ys, steps, seed):
    tx = optax.adam(3e-3)
    params, opt = variables["params"], tx.init(variables["params"])
    @jax.jit
    def step(params, opt, x, y):
        (loss, parts), g = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss
    rng, first = np.random.default_rng(seed), None
    for _ in range(steps):
        idx = rng.choice(len(xs), 64)
        params, opt, loss = step(params, opt, xs[idx], ys[idx])
        first = float(loss) if first is None else first
    return {"params": params}, first, float(loss)

def accuracy(fns, variables, xs, ys):
    return float(jnp.mean(jnp.argmax(fns.apply(variables, xs, train=False)[0], -1) == ys))

def main(argv=None):
    a = argparse.ArgumentParser()
    a.add_argument("--teacher-steps", type=int, default=300)
    a.add_argument("--student-steps", type=int, default=300)
    a.add_argument("--train-examples", type=int, default=200)   # the student's labelled data
    args = a.parse_args(argv)
    jaxkd.apply_cpu_defaults()                                 # opt in to jaxkd's XLA:CPU flags
    d = load_digits()
    x, y = jnp.asarray(d.images[..., None] / 16.0, jnp.float32), jnp.asarray(d.target)
    (xtr, ytr), (xte, yte) = (x[:1500], y[:1500]), (x[1500:], y[1500:])
    teacher, student = from_linen(CNN(32), "teacher"), from_linen(CNN(4), "student")
    t_vars = teacher.init(jax.random.key(0), xtr[:1])
    def ce_loss(params, x, y):
        return losses.cross_entropy(teacher.apply({"params": params}, x, train=True)[0], y).mean(), {}
    t_vars, _, _ = train(teacher, t_vars, ce_loss, xtr, ytr, args.teacher_steps, seed=0)
    def kd_loss(params, x, y):
        s_logits, s_feats, _ = student.apply({"params": params}, x, train=True)
        t_logits, t_feats, _ = teacher.apply(t_vars, x, train=False)   # frozen: no gradient flows
        taps = ["block1", "block2"]
        at = losses.attention_transfer([s_feats[k] for k in taps], [t_feats[k] for k in taps])
        kd = losses.hinton_kd(s_logits, jax.lax.stop_gradient(t_logits), temperature=4.0)
        return jnp.mean(0.1 * losses.cross_entropy(s_logits, y) + 0.9 * kd + at), {}
    n = args.train_examples
    s_vars, first, last = train(student, student.init(jax.random.key(1), xtr[:1]), kd_loss, xtr[:n], ytr[:n],
                                args.student_steps, seed=1)
    print(json.dumps({"teacher_accuracy": accuracy(teacher, t_vars, xte, yte), "student_accuracy":
                      accuracy(student, s_vars, xte, yte), "first_loss": first, "last_loss": last}))

if __name__ == "__main__":
    main()
