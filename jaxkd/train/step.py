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

from jaxkd._xla_defaults import eval_compiler_options
from jaxkd.models import ModelFns
from jaxkd.core import LossInputs, Recipe, aux_variables, with_aux_state


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (and is checkpointed)."""

    step: jax.Array
    params: Any          # {"student": student params, "aux": recipes' auxiliary params}
    model_state: Any     # {"student": {"batch_stats": ...}, "aux": auxiliary modules' collections}
    opt_state: Any
    rng: jax.Array       # raw uint32 PRNG key, folded with the step each step

    def student_variables(self) -> dict:
        """The student's Flax variables ``{"params": ..., "batch_stats": ...}``."""
        return {"params": self.params["student"], **self.model_state["student"]}


@dataclasses.dataclass(frozen=True)
class InputPipeline:
    """On-device preprocessing applied inside the step: augment (train only), normalise."""

    mean: Sequence[float]
    std: Sequence[float]
    pad: int = 0
    flip: bool = False

    def __call__(self, rng, images, train: bool, crop_flip=None):
        """``crop_flip``: optional ``(offsets (B, 2), flips (B,))`` to use instead of random
        choices drawn from ``rng`` (a stored view, see :mod:`jaxkd.train.teacher_cache`)."""
        from jaxkd.data import augment

        if train and (self.pad or self.flip):
            if crop_flip is not None:
                images = augment.apply_crop_flip(images, *crop_flip, pad=self.pad, flip=self.flip)
            else:
                images = augment.random_crop_flip(rng, images, pad=self.pad, flip=self.flip)
        return augment.normalize(images, self.mean, self.std)


def data_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def create_train_state(rng, student: ModelFns, recipes: Recipe | Sequence[Recipe],
                       tx: optax.GradientTransformation, sample_input, teacher: ModelFns | None = None,
                       teacher_variables=None, trainable_teacher_variables=None) -> TrainState:
    """Initialises student and auxiliary params, model state and optimizer state.

    ``recipes`` may be several (the stages of a run): the auxiliary modules of all of them
    are created up front, so the params tree is the same in every stage.
    ``trainable_teacher_variables`` (recipes with ``trains_teacher``) become the auxiliary
    module ``"teacher"``: ``params["aux"]["teacher"]`` and ``model_state["aux"][coll]["teacher"]``.
    """
    recipes = [recipes] if isinstance(recipes, Recipe) else list(recipes)
    init_rng, aux_rng, state_rng = jax.random.split(rng, 3)
    variables = dict(jax.jit(student.init)(init_rng, sample_input))  # (eager Flax init is slow on CPU)
    params = {"student": variables.pop("params"), "aux": {}}
    model_state = {"student": variables, "aux": {}}
    if trainable_teacher_variables is not None:
        t_vars = dict(trainable_teacher_variables)
        params["aux"][JOINT_TEACHER] = t_vars.pop("params")
        model_state["aux"] = with_aux_state(model_state["aux"], JOINT_TEACHER, t_vars)
    with_aux = [r for r in recipes if r.init_aux is not None]
    if with_aux:
        # shapes are all init_aux needs: traced, not run
        s_feats = jax.eval_shape(lambda v: student.apply(v, sample_input, train=False)[1],
                                 {"params": params["student"], **variables})
        t_feats = None
        if teacher is not None and teacher_variables is not None:
            t_feats = jax.eval_shape(lambda v: teacher.apply(v, sample_input, train=False)[1], teacher_variables)
        for i, r in enumerate(with_aux):
            aux_vars = dict(jax.jit(lambda key, r=r: r.init_aux(key, s_feats, t_feats))(jax.random.fold_in(aux_rng, i)))
            aux_params = aux_vars.pop("params")
            clash = set(aux_params) & set(params["aux"])
            if clash:
                raise ValueError(f"auxiliary modules {sorted(clash)} are created by two recipes")
            params["aux"].update(aux_params)
            for coll, tree in aux_vars.items():
                model_state["aux"].setdefault(coll, {}).update(tree)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                      opt_state=tx.init(params), rng=state_rng)


JOINT_TEACHER = "teacher"  # name of a jointly trained teacher among the auxiliary modules


def joint_teacher_variables(aux_params, aux_state) -> dict:
    """The Flax variables of the jointly trained teacher (``aux/teacher``)."""
    return aux_variables(aux_params, aux_state, JOINT_TEACHER)


def param_path(path) -> str:
    """``"student/stage1/conv1/kernel"``-style name of a pytree path."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def trainable_mask(params, predicate: Callable[[str], bool] | None):
    """Bool pytree over ``{"student": ..., "aux": ...}``: ``predicate("student/conv1/kernel")``."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: True if predicate is None else bool(predicate(param_path(path))), params)


def state_mask(model_state, predicate: Callable[[str], bool] | None):
    """Bool pytree over ``{"student": {collection: ...}, "aux": {...}}``; the collection name is
    dropped from the path, so a module's statistics follow its params."""
    def leaf(path, _):
        if predicate is None:
            return True
        return bool(predicate(param_path(path[:1] + path[2:])))
    return jax.tree_util.tree_map_with_path(leaf, model_state)


def params_feeding(student: ModelFns, variables, sample_input, tap: str) -> frozenset[str]:
    """Paths (``"student/..."``) of the student params on which feature ``tap`` depends.

    Found by gradient dependence on a random input: a param whose gradient of
    ``sum(feature**2)`` is identically zero lies after the tap (or is unused).
    """
    import numpy as np

    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    x = jax.random.normal(jax.random.PRNGKey(0), (2, *sample_input.shape[1:]), jnp.float32)

    def f(p):
        _, feats, _ = student.apply({"params": p, **rest}, x, train=False)
        if tap not in feats:
            raise ValueError(f"model {student.name!r} has no feature {tap!r}; it has {sorted(feats)}")
        return jnp.sum(jnp.square(feats[tap].astype(jnp.float32)))

    grads = jax.jit(jax.grad(f))(params)
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    return frozenset("student/" + param_path(p) for p, g in flat if np.any(np.asarray(g) != 0))


def resolve_trainable(recipe: Recipe, student: ModelFns, variables, sample_input) -> Recipe:
    """Turns ``recipe.train_up_to`` into a ``trainable`` predicate (see :class:`Recipe`)."""
    if recipe.train_up_to is None:
        return recipe
    feeding = params_feeding(student, variables, sample_input, recipe.train_up_to)
    return dataclasses.replace(recipe, trainable=lambda path: path.startswith("aux/") or path in feeding)


def _keep_frozen(mask, new, old):
    return jax.tree.map(lambda m, n, o: n if m else o, mask, new, old)


def make_train_step(student: ModelFns, recipe: Recipe, tx: optax.GradientTransformation,
                    pipeline: InputPipeline, *, teacher: ModelFns | None = None,
                    mesh: Mesh | None = None, lr_schedule: Callable | None = None,
                    steps_per_epoch: int | None = None, stage_start: int = 0,
                    num_epochs: int | None = None, donate: bool = True,
                    skip_nonfinite: bool = False, cached_teacher: bool = False) -> Callable:
    """Builds ``step(state, teacher_variables, batch) -> (state, metrics)``, jit-compiled.

    ``metrics`` are scalars (global batch means): ``loss``, each loss component, ``accuracy``,
    ``lr`` and ``grad_norm``; ``teacher_accuracy`` when a teacher runs. ``stage_start`` is the
    global step at which the current stage began (recipes' schedules count from there);
    ``lr_schedule`` is evaluated at the stage step as well. Params outside
    ``recipe.trainable`` keep their values and batch statistics exactly.

    With ``skip_nonfinite``, a step whose loss or gradient norm is not finite changes no
    params, batch statistics or optimizer state (the step counter still advances, so the
    data and RNG stream go on); ``metrics["skipped"]`` is 1.0 for such a step, else 0.0.

    With ``cached_teacher``, the teacher does not run: ``batch["teacher_logits"]`` ``[B, C]``
    (looked up by example id from a teacher-output cache, :mod:`jaxkd.train.teacher_cache`)
    are the teacher's logits, and ``teacher_variables`` is ignored. Only for recipes with
    ``teacher_logits_only``.
    """
    if cached_teacher and ((recipe.uses_teacher and not recipe.teacher_logits_only) or recipe.trains_teacher):
        raise ValueError(f"method {recipe.name!r} needs the teacher network (features or teacher_apply); "
                         "it cannot train from cached teacher logits")
    if (recipe.uses_teacher or recipe.trains_teacher) and teacher is None and not cached_teacher:
        raise ValueError(f"method {recipe.name!r} needs a teacher model; none was given")

    def step(state: TrainState, teacher_variables, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        aug_rng, dropout_rng, loss_rng = jax.random.split(rng, 3)
        # a batch may carry its augmentation (a cached teacher's stored views); else it is random
        given_view = (batch["aug_offsets"], batch["aug_flips"]) if "aug_offsets" in batch else None
        x = pipeline(aug_rng, batch["image"], train=True, crop_flip=given_view)
        labels = batch["label"]
        stage_step = state.step - stage_start
        epoch = stage_step // steps_per_epoch if steps_per_epoch else jnp.zeros((), jnp.int32)
        progress = (stage_step.astype(jnp.float32) / float(steps_per_epoch * num_epochs)
                    if steps_per_epoch and num_epochs else None)
        t_logits = t_feats = teacher_fn = None
        if recipe.uses_teacher and cached_teacher:
            t_logits = jax.lax.stop_gradient(batch["teacher_logits"])
        elif recipe.uses_teacher:
            def teacher_fn(inputs):
                # No stop_gradient here: the teacher's variables are constants of the step (never
                # differentiated), and methods need gradients w.r.t. the teacher's *inputs*
                # (BSS's attack, gradient-based attention).
                logits, feats, _ = teacher.apply(teacher_variables, inputs, train=False)
                return logits, feats
            t_logits, t_feats = jax.lax.stop_gradient(teacher_fn(x))

        def loss_fn(params):
            variables = {"params": params["student"], **state.model_state["student"]}
            logits, feats, new_student_state = student.apply(variables, x, train=True, rng=dropout_rng)

            def student_fn(inputs):
                out_logits, out_feats, _ = student.apply(variables, inputs, train=True, rng=dropout_rng)
                return out_logits, out_feats

            aux_state, tl, tf, t_apply = state.model_state["aux"], t_logits, t_feats, teacher_fn
            if recipe.trains_teacher:  # the jointly trained teacher: train mode, differentiated
                t_vars = joint_teacher_variables(params["aux"], aux_state)
                t_rng = jax.random.fold_in(dropout_rng, 1)
                tl, tf, new_t_state = teacher.apply(t_vars, x, train=True, rng=t_rng)
                aux_state = with_aux_state(aux_state, JOINT_TEACHER, new_t_state)

                def t_apply(inputs):
                    out_logits, out_feats, _ = teacher.apply(t_vars, inputs, train=True, rng=t_rng)
                    return out_logits, out_feats

            out = recipe.loss(LossInputs(
                student_logits=logits, student_features=feats, teacher_logits=tl,
                teacher_features=tf, labels=labels, step=state.step, aux_params=params["aux"],
                aux_state=aux_state, rng=loss_rng, stage_step=stage_step, epoch=epoch,
                num_epochs=num_epochs, stage_progress=progress, inputs=x, student_apply=student_fn,
                teacher_apply=t_apply))
            per_example, parts = out[0], out[1]
            new_aux_state = out[2] if len(out) > 2 else aux_state
            joint_logits = tl if recipe.trains_teacher else None
            return jnp.mean(per_example), ({"student": new_student_state, "aux": new_aux_state}, parts, logits,
                                           joint_logits)

        (loss, (new_model_state, parts, logits, joint_logits)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if recipe.trainable is not None:
            params = _keep_frozen(trainable_mask(params, recipe.trainable), params, state.params)
            new_model_state = _keep_frozen(state_mask(new_model_state, recipe.trainable), new_model_state,
                                           state.model_state)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
                   "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
        metrics.update({k: jnp.mean(v) for k, v in parts.items()})
        if t_logits is not None or joint_logits is not None:
            tl = t_logits if t_logits is not None else joint_logits
            metrics["teacher_accuracy"] = jnp.mean(jnp.argmax(tl, -1) == labels)
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(stage_step)
        if skip_nonfinite:
            finite = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
            new_model_state = keep(new_model_state, state.model_state)
            metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
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

    kwargs = {"compiler_options": eval_compiler_options()}
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
