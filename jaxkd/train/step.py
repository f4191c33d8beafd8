"""The one train-step builder and the eval step.

A train step is a single ``jax.jit`` function

    step(state, teacher_variables, batch) -> (state, metrics)

where ``state`` holds the trainable params (``{"student": ..., "aux": ...}``), the
student's model state (batch stats), the optimizer state, the step counter and the RNG.
The frozen teacher runs inside the same jit in inference mode under ``stop_gradient``; the
same augmented view goes to teacher and student. ``state`` is donated, so its buffers are
reused in place. Under a ``Mesh`` the batch is split over the ``data`` axis and everything
else is replicated; means are global, so the numbers do not depend on the device count.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxkd.models import ModelFns
from jaxkd.train.recipes import LossInputs, Recipe


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (and is checkpointed)."""

    step: jax.Array
    params: Any          # {"student": student params, "aux": recipe's auxiliary params}
    model_state: Any     # student's non-param collections, e.g. {"batch_stats": ...}
    opt_state: Any
    rng: jax.Array       # raw uint32 PRNG key, folded with the step each step


@dataclasses.dataclass(frozen=True)
class InputPipeline:
    """On-device preprocessing applied inside the step: augment (train only), normalise."""

    mean: Sequence[float]
    std: Sequence[float]
    pad: int = 0
    flip: bool = False

    def __call__(self, rng, images, train: bool):
        from jaxkd.data import augment

        if train and (self.pad or self.flip):
            images = augment.random_crop_flip(rng, images, pad=self.pad, flip=self.flip)
        return augment.normalize(images, self.mean, self.std)


def data_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def create_train_state(rng, student: ModelFns, recipe: Recipe, tx: optax.GradientTransformation,
                       sample_input, teacher: ModelFns | None = None, teacher_variables=None
                       ) -> TrainState:
    """Initialises student (and auxiliary) params, model state and optimizer state."""
    init_rng, aux_rng, state_rng = jax.random.split(rng, 3)
    variables = dict(student.init(init_rng, sample_input))
    params = {"student": variables.pop("params"), "aux": {}}
    if recipe.init_aux is not None:
        _, s_feats, _ = student.apply({"params": params["student"], **variables}, sample_input, train=False)
        t_feats = None
        if recipe.uses_teacher and teacher is not None:
            _, t_feats, _ = teacher.apply(teacher_variables, sample_input, train=False)
        params["aux"] = recipe.init_aux(aux_rng, s_feats, t_feats)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                      opt_state=tx.init(params), rng=state_rng)


def _masked_mean(x, mask):
    if mask is None:
        return jnp.mean(x)
    mask = mask.astype(x.dtype)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_train_step(student: ModelFns, recipe: Recipe, tx: optax.GradientTransformation,
                    pipeline: InputPipeline, *, teacher: ModelFns | None = None,
                    mesh: Mesh | None = None, lr_schedule: Callable | None = None,
                    donate: bool = True) -> Callable:
    """Builds ``step(state, teacher_variables, batch) -> (state, metrics)``, jit-compiled.

    ``metrics`` are scalars (global batch means): ``loss``, each loss component, ``accuracy``,
    ``lr`` and ``grad_norm``; ``teacher_accuracy`` when a teacher runs.
    """
    if recipe.uses_teacher and teacher is None:
        raise ValueError(f"method {recipe.name!r} needs a teacher model; none was given")

    def step(state: TrainState, teacher_variables, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        aug_rng, dropout_rng, loss_rng = jax.random.split(rng, 3)
        x = pipeline(aug_rng, batch["image"], train=True)
        labels = batch["label"]
        t_logits = t_feats = None
        if recipe.uses_teacher:
            t_logits, t_feats, _ = teacher.apply(teacher_variables, x, train=False)
            t_logits, t_feats = jax.lax.stop_gradient((t_logits, t_feats))

        def loss_fn(params):
            variables = {"params": params["student"], **state.model_state}
            logits, feats, new_model_state = student.apply(variables, x, train=True, rng=dropout_rng)
            per_example, parts = recipe.loss(LossInputs(
                student_logits=logits, student_features=feats, teacher_logits=t_logits,
                teacher_features=t_feats, labels=labels, step=state.step,
                aux_params=params["aux"], rng=loss_rng))
            return jnp.mean(per_example), (new_model_state, parts, logits)

        (loss, (new_model_state, parts, logits)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
                   "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
        metrics.update({k: jnp.mean(v) for k, v in parts.items()})
        if t_logits is not None:
            metrics["teacher_accuracy"] = jnp.mean(jnp.argmax(t_logits, -1) == labels)
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(state.step)
        new_state = state.replace(step=state.step + 1, params=params, model_state=new_model_state,
                                  opt_state=opt_state)
        return new_state, metrics

    kwargs = {"donate_argnums": (0,)} if donate else {}
    if mesh is not None:
        rep, dat = replicated(mesh), data_sharding(mesh)
        kwargs.update(in_shardings=(rep, rep, dat), out_shardings=(rep, rep))
    return jax.jit(step, **kwargs)


def make_eval_step(model: ModelFns, pipeline: InputPipeline, *, mesh: Mesh | None = None) -> Callable:
    """Builds ``eval_step(variables, batch) -> {"correct", "loss_sum", "count"}`` (sums).

    ``batch["mask"]`` (optional) marks real examples in a padded final batch.
    """
    from jaxkd import losses

    def eval_step(variables, batch):
        x = pipeline(None, batch["image"], train=False)
        logits, _, _ = model.apply(variables, x, train=False)
        mask = batch.get("mask")
        mask = jnp.ones(logits.shape[0], jnp.float32) if mask is None else mask.astype(jnp.float32)
        ce = losses.cross_entropy(logits, batch["label"])
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        return {"correct": jnp.sum(correct * mask), "loss_sum": jnp.sum(ce * mask),
                "count": jnp.sum(mask)}

    kwargs = {}
    if mesh is not None:
        kwargs.update(in_shardings=(replicated(mesh), data_sharding(mesh)), out_shardings=replicated(mesh))
    return jax.jit(eval_step, **kwargs)


def shard_batch(batch, mesh: Mesh | None):
    """Places a host batch (this process's share) on the mesh, split over ``data``."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, batch)
    sharding = data_sharding(mesh)
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), batch)


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D ``data`` mesh over the first ``num_devices`` devices (all by default)."""
    import numpy as np

    devices = jax.devices()
    if num_devices is not None:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices but only {len(devices)} are visible")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), ("data",))
