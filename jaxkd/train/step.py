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
from jaxkd.core import LossInputs, Recipe, RecipeContext, as_loss_output, aux_variables, with_aux_state


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (and is checkpointed)."""

    step: jax.Array
    params: Any          # {"student": student params, "aux": recipes' auxiliary params}
    model_state: Any     # {"student": {"batch_stats": ...}, "aux": auxiliary modules' collections}
    opt_state: Any
    rng: jax.Array       # typed PRNG key (jax.random.key; raw uint32 data also works), folded with
                         # the step each step; checkpoints store its key data (jaxkd.train.keys)
    recipe_state: Any = flax.struct.field(default_factory=dict)  # {recipe name: its state} (Recipe.init_state)

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
        if train:
            images = self.augment(rng, images, crop_flip)
        return self.normalize(images)

    def augment(self, rng, images, crop_flip=None):
        """The data set's training augmentation (random crop with ``pad``, horizontal ``flip``) of
        raw images, or the given ``crop_flip``; unchanged when the run does not augment."""
        from jaxkd.data import augment

        if not (self.pad or self.flip):
            return images
        if crop_flip is not None:
            return augment.apply_crop_flip(images, *crop_flip, pad=self.pad, flip=self.flip)
        return augment.random_crop_flip(rng, images, pad=self.pad, flip=self.flip)

    def normalize(self, images):
        """Raw images (``uint8`` scaled to [0, 1], or float) to network inputs: ``(x - mean) / std``."""
        from jaxkd.data import augment

        return augment.normalize(images, self.mean, self.std)


def default_prepare_batch(batch, rng, pipeline: InputPipeline):
    """What the step does with a batch unless the recipe prepares it (``Recipe.prepare_batch``):
    ``image`` augmented (with the batch's stored crop and flip when it carries them, a teacher
    cache's views) and normalised."""
    given_view = (batch["aug_offsets"], batch["aug_flips"]) if "aug_offsets" in batch else None
    return {**batch, "image": pipeline(rng, batch["image"], train=True, crop_flip=given_view)}


def data_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def create_train_state(rng, student: ModelFns, recipes: Recipe | Sequence[Recipe],
                       tx: optax.GradientTransformation, sample_input, teacher: ModelFns | None = None,
                       teacher_variables=None, trainable_teacher_variables=None, num_train: int | None = None,
                       train_labels=None, num_classes: int | None = None) -> TrainState:
    """Initialises student and auxiliary params, model state, recipe state and optimizer state.

    ``recipes`` may be several (the stages of a run): the auxiliary modules of all of them
    are created up front, so the params tree is the same in every stage. A module is declared by
    name once per run: when several recipes declare the same name with the same shapes, the first
    declaration creates it and the others share it (a head trained in one stage, read or frozen in
    a later one); other shapes under one name are an error.
    ``trainable_teacher_variables`` (recipes with ``trains_teacher``) become the auxiliary
    module ``"teacher"``: ``params["aux"]["teacher"]`` and ``model_state["aux"][coll]["teacher"]``.
    Recipes with ``init_state`` get their state from a :class:`~jaxkd.core.RecipeContext` built
    from ``num_train``, ``train_labels`` (by position) and ``num_classes``.
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
    s_feats = t_feats = None
    if any(r.init_aux is not None or r.init_state is not None for r in recipes):
        # shapes are all init_aux needs: traced, not run
        s_feats = jax.eval_shape(lambda v: student.apply(v, sample_input, train=False)[1],
                                 {"params": params["student"], **variables})
        if teacher is not None and teacher_variables is not None:
            t_feats = jax.eval_shape(lambda v: teacher.apply(v, sample_input, train=False)[1], teacher_variables)
    for i, r in enumerate(r for r in recipes if r.init_aux is not None):
        aux_vars = dict(jax.jit(lambda key, r=r: r.init_aux(key, s_feats, t_feats))(jax.random.fold_in(aux_rng, i)))
        _add_aux_modules(params, model_state, aux_vars, r.name)
    recipe_state = {}
    for i, r in enumerate(r for r in recipes if r.init_state is not None):
        if r.name in recipe_state:  # one state per method name, shared by its stages
            continue
        ctx = RecipeContext(num_train=num_train, num_classes=num_classes, train_labels=train_labels,
                            student_features=s_feats, teacher_features=t_feats,
                            rng=jax.random.fold_in(aux_rng, 1_000_003 + i))
        recipe_state[r.name] = jax.tree.map(jnp.asarray, r.init_state(ctx))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                      opt_state=tx.init(params), rng=state_rng, recipe_state=recipe_state)


def _add_aux_modules(params, model_state, aux_vars, recipe_name: str) -> None:
    """Adds a recipe's auxiliary modules; a name declared before must have the same shapes (shared)."""
    aux_params = aux_vars.pop("params")
    for name, tree in aux_params.items():
        if name in params["aux"]:
            shapes = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)  # noqa: E731
            if shapes(params["aux"][name]) != shapes(tree):
                raise ValueError(f"auxiliary module {name!r} is declared again by method {recipe_name!r} with other "
                                 "shapes; a module is declared by name once per run (rename one of them)")
            continue
        params["aux"][name] = tree
        model_state["aux"] = with_aux_state(model_state["aux"], name,
                                            {coll: t[name] for coll, t in aux_vars.items() if name in t})


def state_shardings(state: TrainState, mesh: Mesh, recipes: Sequence[Recipe] = ()):
    """The sharding of every leaf of ``state`` on ``mesh``: replicated, except recipe state whose
    recipe gives a ``state_partition``."""
    rep = replicated(mesh)
    out = jax.tree.map(lambda _: rep, state)
    parts = {r.name: r.state_partition for r in recipes if r.state_partition is not None}
    if not parts or not state.recipe_state:
        return out
    recipe_state = dict(out.recipe_state)
    for name, spec in parts.items():
        if name in state.recipe_state:
            recipe_state[name] = jax.tree.map(lambda sp, sub: jax.tree.map(lambda _: NamedSharding(mesh, sp), sub),
                                              spec, state.recipe_state[name],
                                              is_leaf=lambda x: isinstance(x, P))
    return out.replace(recipe_state=recipe_state)


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
    shape = (2, *sample_input.shape[1:])
    if jnp.issubdtype(sample_input.dtype, jnp.integer):  # token ids: ids 0 and 1 exist in any vocabulary
        x = jax.random.randint(jax.random.key(0), shape, 0, 2, sample_input.dtype)
    else:
        x = jax.random.normal(jax.random.key(0), shape, jnp.float32)

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
                    skip_nonfinite: bool = False, cached_teacher: bool = False,
                    state_sharding=None) -> Callable:
    """Builds ``step(state, teacher_variables, batch) -> (state, metrics)``, jit-compiled.

    ``batch`` holds every per-example field of the data (``image``, ``label``, ``id``, ``index``,
    ...), split over the mesh's ``data`` axis; the recipe prepares it (``Recipe.prepare_batch``,
    default: augment and normalise ``image``) and its loss sees all of it (:class:`LossInputs`).
    The objective is ``mean(per_example) + sum(batch_terms)`` (:class:`~jaxkd.core.LossOutput`).

    ``metrics`` are scalars (global batch means): ``loss``, each loss component and batch term,
    ``accuracy``, ``lr`` and ``grad_norm``; ``teacher_accuracy`` when a teacher runs.
    ``stage_start`` is the global step at which the current stage began (recipes' schedules count
    from there); ``lr_schedule`` is evaluated at the stage step as well. Params the recipe does not
    train (``Recipe.trains``) keep their values and batch statistics exactly.

    With ``skip_nonfinite``, a step whose loss or gradient norm is not finite changes no
    params, batch statistics, recipe state or optimizer state (the step counter still advances,
    so the data and RNG stream go on); ``metrics["skipped"]`` is 1.0 for such a step, else 0.0.

    With ``cached_teacher``, the teacher does not run: ``batch["teacher_logits"]`` ``[B, C]``
    (looked up by example id from a teacher-output cache, :mod:`jaxkd.train.teacher_cache`)
    are the teacher's logits, and ``teacher_variables`` is ignored. Only for recipes with
    ``teacher_logits_only``. ``state_sharding`` (default: everything replicated; see
    :func:`state_shardings`) places the train state on ``mesh``.
    """
    if cached_teacher and ((recipe.uses_teacher and not recipe.teacher_logits_only) or recipe.trains_teacher):
        raise ValueError(f"method {recipe.name!r} needs the teacher network (features or teacher_apply); "
                         "it cannot train from cached teacher logits")
    if (recipe.uses_teacher or recipe.trains_teacher) and teacher is None and not cached_teacher:
        raise ValueError(f"method {recipe.name!r} needs a teacher model; none was given")
    prepare = recipe.prepare_batch or default_prepare_batch

    def step(state: TrainState, teacher_variables, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        prep_rng, dropout_rng, loss_rng = jax.random.split(rng, 3)
        batch = prepare(dict(batch), prep_rng, pipeline)
        stage_step = state.step - stage_start
        clock = {"stage_step": stage_step, "num_epochs": num_epochs,
                 "epoch": stage_step // steps_per_epoch if steps_per_epoch else jnp.zeros((), jnp.int32),
                 "stage_progress": (stage_step.astype(jnp.float32) / float(steps_per_epoch * num_epochs)
                                    if steps_per_epoch and num_epochs else None)}
        t_logits, t_feats, teacher_fn = _frozen_teacher(recipe, teacher, teacher_variables, batch, cached_teacher)
        loss_fn = _loss_function(student, teacher, recipe, state, batch, t_logits, t_feats, teacher_fn,
                                 dropout_rng, loss_rng, clock)
        (loss, (new_model_state, out, logits, teacher_logits)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if recipe.freezes_anything:
            params = _keep_frozen(trainable_mask(params, recipe.trains), params, state.params)
            new_model_state = _keep_frozen(state_mask(new_model_state, recipe.trains), new_model_state,
                                           state.model_state)
        recipe_state = state.recipe_state
        if out["recipe_state"] is not None:
            recipe_state = {**recipe_state, recipe.name: jax.lax.stop_gradient(out["recipe_state"])}
        metrics = _step_metrics(loss, grads, out, logits, t_logits if teacher_logits is None else teacher_logits,
                                batch)
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(stage_step)
        if skip_nonfinite:
            finite = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
            new_model_state, recipe_state = keep(new_model_state, state.model_state), keep(recipe_state,
                                                                                            state.recipe_state)
            metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
        new_state = state.replace(step=state.step + 1, params=params, model_state=new_model_state,
                                  opt_state=opt_state, recipe_state=recipe_state)
        return new_state, metrics

    kwargs = {"donate_argnums": (0,)} if donate else {}
    if mesh is not None:
        rep, dat = replicated(mesh), data_sharding(mesh)
        st = rep if state_sharding is None else state_sharding
        kwargs.update(in_shardings=(st, rep, dat), out_shardings=(st, rep))
    return jax.jit(step, **kwargs)


def _frozen_teacher(recipe: Recipe, teacher, teacher_variables, batch, cached: bool):
    """``(logits, features, teacher_apply)`` of the frozen teacher on the prepared batch (from the
    cache's rows when ``cached``), or ``None``s for a recipe without one."""
    if not recipe.uses_teacher:
        return None, None, None
    if cached:
        return jax.lax.stop_gradient(batch["teacher_logits"]), None, None

    def teacher_fn(inputs):
        # No stop_gradient here: the teacher's variables are constants of the step (never
        # differentiated), and methods need gradients w.r.t. the teacher's *inputs*
        # (BSS's attack, gradient-based attention).
        logits, feats, _ = teacher.apply(teacher_variables, inputs, train=False)
        return logits, feats

    t_logits, t_feats = jax.lax.stop_gradient(teacher_fn(batch["image"]))
    return t_logits, t_feats, teacher_fn


def _loss_function(student, teacher, recipe: Recipe, state: TrainState, batch, t_logits, t_feats, teacher_fn,
                   dropout_rng, loss_rng, clock):
    """``loss_fn(params) -> (objective, (new model state, {parts, batch_terms, recipe_state}, student logits,
    joint teacher logits))``."""
    x = batch["image"]

    def loss_fn(params):
        variables = {"params": params["student"], **state.model_state["student"]}
        logits, feats, new_student_state = student.apply(variables, x, train=True, rng=dropout_rng)

        def student_fn(inputs, update_state=False):
            if not update_state:
                out_logits, out_feats, _ = student.apply(variables, inputs, train=True, rng=dropout_rng)
                return out_logits, out_feats
            # continues from the main forward's batch statistics
            return student.apply({"params": params["student"], **new_student_state}, inputs, train=True,
                                 rng=dropout_rng)

        aux_state, tl, tf, t_apply = state.model_state["aux"], t_logits, t_feats, teacher_fn
        if recipe.trains_teacher:  # the jointly trained teacher: train mode, differentiated
            t_vars = joint_teacher_variables(params["aux"], aux_state)
            t_rng = jax.random.fold_in(dropout_rng, 1)
            tl, tf, new_t_state = teacher.apply(t_vars, x, train=True, rng=t_rng)
            aux_state = with_aux_state(aux_state, JOINT_TEACHER, new_t_state)

            def t_apply(inputs):
                out_logits, out_feats, _ = teacher.apply(t_vars, inputs, train=True, rng=t_rng)
                return out_logits, out_feats

        out = as_loss_output(recipe.loss(LossInputs(
            student_logits=logits, student_features=feats, teacher_logits=tl, teacher_features=tf,
            labels=batch.get("label"), step=state.step, aux_params=params["aux"], aux_state=aux_state, rng=loss_rng,
            inputs=x, student_apply=student_fn, teacher_apply=t_apply, batch=batch,
            recipe_state=state.recipe_state.get(recipe.name), student_state=new_student_state, **clock)))
        objective = jnp.mean(out.per_example)
        for term in out.batch_terms.values():
            objective = objective + term
        new_state = {"student": new_student_state if out.student_state is None else out.student_state,
                     "aux": aux_state if out.aux_state is None else out.aux_state}
        logged = {"parts": dict(out.parts), "batch_terms": dict(out.batch_terms), "recipe_state": out.recipe_state}
        return objective, (new_state, logged, logits, tl if recipe.trains_teacher else None)

    return loss_fn


def _step_metrics(loss, grads, out, logits, teacher_logits, batch) -> dict:
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
    labels = batch.get("label")
    has_labels = labels is not None and labels.shape == logits.shape[:-1]
    if has_labels:
        metrics["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == labels)
    metrics.update({k: jnp.mean(v) for k, v in out["parts"].items()})
    metrics.update({k: jnp.asarray(v) for k, v in out["batch_terms"].items()})
    if teacher_logits is not None and has_labels and teacher_logits.shape[-2] == labels.shape[-1]:
        # (several teachers, [N, B, C]: the mean over all of them)
        metrics["teacher_accuracy"] = jnp.mean(jnp.argmax(teacher_logits, -1) == labels)
    return metrics


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
