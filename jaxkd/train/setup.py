"""Everything a run needs, built from a config: ``build_run(config, mesh)``.

One place turns a config into data sources, the input pipeline, the student and teacher models,
the loaded (frozen) teachers or the teacher cache, the stages with their recipes and optimizers,
and the initial train state. The train loop (:mod:`jaxkd.train.loop`), ``jaxkd cache-teacher``
(:mod:`jaxkd.train.cache_build`), ``jaxkd eval`` and ``jaxkd refine`` all build from here, so a
config means the same thing to each of them.

Names are checked here, each where it is built: an unknown model, method, method option or
optimizer is a one-line :class:`~jaxkd.errors.ConfigError` with a suggestion.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

import jaxkd.methods  # noqa: F401  (registers jaxkd's methods)
from jaxkd import _xla_defaults
from jaxkd import data as data_lib
from jaxkd import models as models_lib
from jaxkd.core import Recipe, build_recipe
from jaxkd.errors import CheckpointError, ConfigError
from jaxkd.train import checkpoint as ckpt_lib
from jaxkd.train import keys as keys_lib
from jaxkd.train import param_groups
from jaxkd.train import step as step_lib
from jaxkd.train import teacher_cache as cache_lib

# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataSetup:
    """The run's data: ``info``, the ``train``/``val``/``eval`` sources (``val`` is ``None`` without
    ``data.val_fraction``) and the on-device ``pipeline`` (augmentation, normalisation)."""

    info: Any
    train: Any
    val: Any
    eval: Any
    pipeline: step_lib.InputPipeline

    @property
    def augmentation(self) -> dict:
        return {"pad": self.pipeline.pad, "flip": self.pipeline.flip}


def augmentation(config, dataset_name: str) -> dict:
    """``{"pad", "flip"}`` of ``config.data.augment``, or the data set's default when it is None."""
    aug = data_lib.default_augmentation(dataset_name) if config.data.augment is None else dict(config.data.augment)
    return {"pad": int(aug.get("pad", 0)), "flip": bool(aug.get("flip", False))}


def training_sources(config):
    """``(info, train, val, eval)``: ``config.data``'s splits, the training split cut to
    ``num_train_examples`` and then, when ``val_fraction`` > 0, split into train and a held-out
    validation set (``val`` is ``None`` otherwise). ``info.num_train`` counts what is trained on."""
    d = config.data
    info, train_src, eval_src = data_lib.load_dataset(
        d.name, data_dir=d.data_dir, train_split=d.train_split, eval_split=d.eval_split,
        num_train_examples=d.num_train_examples, subset_seed=d.subset_seed,
        builder_kwargs=dict(d.builder_kwargs), download=d.download)
    val_src = None
    if d.get("val_fraction"):
        try:
            train_src, val_src = data_lib.hold_out(train_src, d.val_fraction, seed=d.subset_seed)
        except ValueError as e:
            raise ConfigError(f"config.data.val_fraction={d.val_fraction}: {e}") from None
        info = dataclasses.replace(info, num_train=len(train_src))
    return info, train_src, val_src, eval_src


def build_data(config) -> DataSetup:
    info, train, val, evals = training_sources(config)
    aug = augmentation(config, info.name)
    if info.image_dtype == "int32" and (aug["pad"] or aug["flip"]):
        raise ConfigError(f"config.data.augment={dict(config.data.augment)}: {info.name!r} holds token ids "
                          "(integer sequences); random crops and flips apply to images only")
    return DataSetup(info, train, val, evals, step_lib.InputPipeline(mean=tuple(info.mean), std=tuple(info.std),
                                                                     **aug))


# --------------------------------------------------------------------------------------------
# Models and teachers
# --------------------------------------------------------------------------------------------


def create_model(cfg_model, key: str, num_classes: int) -> models_lib.ModelFns:
    """``config.<key>`` (``{"name", "kwargs"}``) as a model; a bad name or kwarg is a ConfigError."""
    try:
        return models_lib.create_model(cfg_model["name"], num_classes, **dict(cfg_model.get("kwargs") or {}))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.{key}: {e}") from None


def sample_input(info) -> jax.Array:
    """One zero example of the network input: float32, or int32 token ids for a sequence data set."""
    return jnp.zeros((1, *info.input_shape), jnp.int32 if info.image_dtype == "int32" else jnp.float32)


def teacher_specs(config) -> list[dict]:
    """The teachers a run distils from: ``[{"name", "kwargs", "workdir", "checkpoint"}, ...]``.

    From ``config.teachers`` when set (each entry's ``name``/``kwargs``/``checkpoint`` default
    to ``config.teacher``'s, ``workdir`` is required), else from ``config.teacher``, whose
    ``workdir`` may be one work dir or a list of them (teachers of one architecture). One
    spec means the ordinary single-teacher run. Raises :class:`ConfigError` for a bad value.
    """
    t = config.teacher
    teachers = config.get("teachers")
    if teachers is None:
        workdir = t.workdir
        if isinstance(workdir, (list, tuple)):
            _require(len(workdir) > 0 and all(isinstance(w, str) and w for w in workdir), "teacher.workdir",
                     "must be a work dir or a non-empty list of work dirs", workdir)
            return [{"name": t.name, "kwargs": dict(t.kwargs), "workdir": w, "checkpoint": t.checkpoint}
                    for w in workdir]
        _require(workdir is None or isinstance(workdir, str), "teacher.workdir",
                 "must be a work dir or a non-empty list of work dirs", workdir)
        return [{"name": t.name, "kwargs": dict(t.kwargs), "workdir": workdir, "checkpoint": t.checkpoint}]
    _require(isinstance(teachers, (list, tuple)) and len(teachers) > 0, "teachers",
             "must be None or a non-empty list of {name, kwargs, workdir, checkpoint}", teachers)
    specs = []
    for i, entry in enumerate(teachers):
        entry = entry.to_dict() if hasattr(entry, "to_dict") else entry
        _require(isinstance(entry, dict), f"teachers[{i}]", "must be a dict {name, kwargs, workdir, checkpoint}",
                 entry)
        unknown = set(entry) - {"name", "kwargs", "workdir", "checkpoint"}
        if unknown:
            raise ConfigError(f"config.teachers[{i}] has unknown key(s) {sorted(unknown)}; "
                              "allowed: name, kwargs, workdir, checkpoint")
        spec = {"name": entry.get("name", t.name), "kwargs": dict(entry.get("kwargs", t.kwargs) or {}),
                "workdir": entry.get("workdir"), "checkpoint": entry.get("checkpoint", t.checkpoint)}
        _require(isinstance(spec["workdir"], str) and spec["workdir"], f"teachers[{i}].workdir",
                 "must name the work dir of a trained teacher", spec["workdir"])
        _require(spec["checkpoint"] in ("best", "last"), f"teachers[{i}].checkpoint", "must be 'best' or 'last'",
                 spec["checkpoint"])
        if spec["name"] not in models_lib.list_models():
            raise ConfigError(f"config.teachers[{i}].name: unknown model {spec['name']!r}; "
                              f"available: {models_lib.list_models()}")
        specs.append(spec)
    return specs


def _require(cond: bool, key: str, msg: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"config.{key} {msg}; got {value!r}")


def load_frozen(model, sample, workdir, checkpoint, dtype, what):
    """A frozen teacher's ``(variables, meta)`` from ``workdir``, checked against ``model``.

    A teacher computing in a half-precision ``dtype`` (``teacher.kwargs.dtype``) is also stored in
    it: half the memory, and the values its layers would cast to anyway."""
    template = jax.jit(model.init)(jax.random.key(0), sample)  # (eager Flax init is slow)
    variables, meta = ckpt_lib.load_model_variables(workdir, template, checkpoint, what=what)
    if dtype is not None and jnp.dtype(dtype).itemsize < 4:
        variables = jax.tree.map(lambda v: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v,
                                 variables)
    return variables, meta


def load_teacher(config, teacher: models_lib.ModelFns, sample, workdir: str | None = None):
    """``(variables, meta)`` of ``config.teacher`` (from ``workdir``, default ``teacher.workdir``)."""
    workdir = workdir or config.teacher.workdir
    if not workdir:
        raise ConfigError("config.teacher.workdir must name the work dir of a trained teacher "
                          f"for method {config.method.name!r}")
    return load_frozen(teacher, sample, workdir, config.teacher.checkpoint, dict(config.teacher.kwargs).get("dtype"),
                       "teacher")


def load_teachers(config, teacher: models_lib.ModelFns, sample, recipes, num_classes: int):
    """``(teacher, variables, meta)``: :func:`load_teacher`'s one teacher, or several as one model.

    Several teachers (``config.teachers``, or a list in ``config.teacher.workdir``; see
    :func:`teacher_specs`) become an ensemble whose logits are ``[N, B, C]``
    (:mod:`jaxkd.models.ensemble`): stacked params and one vmapped forward when they share an
    architecture, else a tuple. Only multi-teacher recipes accept it.
    """
    from jaxkd.models import ensemble as ensemble_lib

    specs = teacher_specs(config)
    if config.get("teachers") is None and len(specs) == 1:
        return (teacher, *load_teacher(config, teacher, sample))
    single = sorted({r.name for r in recipes if r.uses_teacher and not r.multi_teacher})
    if len(specs) > 1 and single:
        raise ConfigError(
            f"the config names {len(specs)} teachers but method(s) {single} distil from one; use a multi-teacher "
            "method (ensemble_kd, random_teacher_kd, relabel_kd, meal_v2) or one teacher")
    models, variables, metas = [], [], []
    for i, spec in enumerate(specs):
        where = f"teachers[{i}]" if config.get("teachers") is not None else f"teacher.workdir[{i}]"
        model = create_model(spec, where, num_classes)
        v, meta = load_frozen(model, sample, spec["workdir"], spec["checkpoint"], dict(spec["kwargs"]).get("dtype"),
                              f"teacher {i} ({where})")
        models.append(model)
        variables.append(v)
        metas.append(meta)
    if len(specs) == 1:
        return models[0], variables[0], metas[0]
    accuracies = [m.get("accuracy") for m in metas]
    meta = {"accuracy": (sum(accuracies) / len(accuracies) if None not in accuracies else None),
            "accuracies": accuracies, "workdirs": [s["workdir"] for s in specs]}
    if len({(s["name"], repr(sorted(s["kwargs"].items()))) for s in specs}) == 1:
        return ensemble_lib.stacked_ensemble(models[0], len(models)), ensemble_lib.stack_variables(variables), meta
    return ensemble_lib.tuple_ensemble(models), tuple(variables), meta


def joint_teacher_init(config, teacher, sample, rng) -> tuple[dict, dict | None]:
    """The jointly trained teacher's starting variables (``Recipe.trains_teacher``) and meta: the
    finished run in ``config.teacher.workdir`` when set, else a fresh init (meta ``None``)."""
    template = jax.jit(teacher.init)(rng, sample)  # (eager Flax init is slow on CPU)
    if not config.teacher.workdir:
        return template, None
    return ckpt_lib.load_model_variables(config.teacher.workdir, template, config.teacher.checkpoint)


def init_student_from(config, state):
    """``state`` with the student's variables loaded from ``config.model.init_from`` (if set).

    The best checkpoint of that work dir (``"{seed}"`` in the path is replaced by
    ``config.seed``) must fit the student model; a mismatch is a :class:`ConfigError`.
    """
    src = config.model.get("init_from")
    if not src:
        return state
    src = src.replace("{seed}", str(config.seed))
    try:
        variables, _ = ckpt_lib.load_model_variables(src, jax.device_get(state.student_variables()), "best",
                                                     what="student")
    except CheckpointError as e:
        raise ConfigError(f"config.model.init_from={src!r}: {e}") from None
    variables = dict(variables)
    params = variables.pop("params")
    return state.replace(params={**state.params, "student": params},
                         model_state={**state.model_state, "student": variables})


def init_aux_from(config, state):
    """``state`` with auxiliary modules loaded from the runs named in ``config.aux_init_from``
    (``{module name: work dir}``): the module's params and collections from the newest run
    checkpoint of that work dir (a head trained by an earlier run, e.g. SSKD's teacher head).
    Shapes must match; a missing module or work dir is a :class:`ConfigError`."""
    wanted = dict(config.get("aux_init_from") or {})
    if not wanted:
        return state
    params, model_state = dict(state.params), dict(state.model_state)
    aux_params, aux_state = dict(params["aux"]), dict(model_state["aux"])
    for name, workdir in wanted.items():
        if name not in aux_params:
            raise ConfigError(f"config.aux_init_from: this run has no auxiliary module {name!r}; "
                              f"it has {sorted(aux_params)}")
        try:
            _, saved = ckpt_lib.load_run_state(workdir)
        except CheckpointError as e:
            raise ConfigError(f"config.aux_init_from[{name!r}]: {e}") from None
        if name not in saved["params"]["aux"]:
            raise ConfigError(f"config.aux_init_from[{name!r}]: the run in {workdir!r} has no module {name!r}")
        mine = {"params": aux_params[name], **{c: t[name] for c, t in aux_state.items() if name in t}}
        theirs = {"params": saved["params"]["aux"][name],
                  **{c: t[name] for c, t in saved["model_state"]["aux"].items() if name in t}}
        try:
            ckpt_lib.check_tree_fits(mine, theirs, f"module {name!r} in {workdir!r}")
        except CheckpointError as e:
            raise ConfigError(f"config.aux_init_from[{name!r}]: {e}") from None
        theirs = jax.tree.map(lambda t, v: jnp.asarray(v, t.dtype), mine, theirs)
        aux_params[name] = theirs.pop("params")
        for coll, tree in theirs.items():
            aux_state[coll] = {**aux_state[coll], name: tree}
    params["aux"], model_state["aux"] = aux_params, aux_state
    return state.replace(params=params, model_state=model_state)


# --------------------------------------------------------------------------------------------
# Stages and recipes
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a run: its method, optimizer and global step range ``[start, end)``."""

    index: int
    name: str
    method: dict
    optim: dict
    num_epochs: int
    start: int
    end: int
    evaluate: bool = True  # False: the stage's epochs skip the student's eval (not the final stage)


def resolve_stages(config, steps_per_epoch: int) -> list[Stage]:
    """``config.stages`` (or the single stage given by ``config.method``/``config.train``).

    Each entry of ``config.stages`` is a dict with ``num_epochs`` and optionally ``name``,
    ``method`` (replaces ``config.method``), ``optim`` (overrides keys of ``config.optim``) and
    ``evaluate`` (default True; False skips evaluating the student at the ends of the stage's epochs,
    for a stage that does not train it, e.g. SSKD's teacher-head stage; the final stage, which picks
    the best checkpoint, always evaluates); with stages, the run lasts the sum of their epochs.
    """
    specs = list(config.get("stages") or ())
    if not specs:
        specs = [{"name": "main", "num_epochs": config.train.num_epochs}]
    stages, start = [], 0
    for i, spec in enumerate(specs):
        spec = dict(spec)
        unknown = set(spec) - {"name", "num_epochs", "method", "optim", "evaluate"}
        if unknown:
            raise ConfigError(f"config.stages[{i}] has unknown key(s) {sorted(unknown)}; "
                              "allowed: name, num_epochs, method, optim, evaluate")
        evaluate = spec.get("evaluate", True)
        if not isinstance(evaluate, bool):
            raise ConfigError(f"config.stages[{i}].evaluate must be True or False; got {evaluate!r}")
        if not evaluate and i == len(specs) - 1:
            raise ConfigError(f"config.stages[{i}].evaluate=False: the final stage picks the best checkpoint, "
                              "so it must evaluate")
        n = spec.get("num_epochs")
        if not isinstance(n, int) or n <= 0:
            raise ConfigError(f"config.stages[{i}].num_epochs must be a positive int; got {n!r}")
        method = dict(spec.get("method") or config.method.to_dict())
        optim = {**config.optim.to_dict(), **dict(spec.get("optim") or {})}
        end = start + n * steps_per_epoch
        stages.append(Stage(i, str(spec.get("name", f"stage{i}")), method, optim, n, start, end, evaluate))
        start = end
    return stages


def stage_recipes(config, stages: list[Stage]) -> list[Recipe]:
    """The recipe of each stage (unknown methods and options name the stage's config key)."""
    recipes = []
    for st in stages:
        where = f"config.stages[{st.index}].method" if config.get("stages") else "config.method"
        recipes.append(build_recipe(st.method, where=where))
    return recipes


def config_recipes(config) -> list[Recipe]:
    """The recipes of the config's stages (``config.stages``, else ``config.method``)."""
    return stage_recipes(config, resolve_stages(config, 1))


# --------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunSetup:
    """What :func:`build_run` made of a config (see the module docstring).

    ``initial_state`` is the train state of a fresh start (replicated on ``mesh``; a fresh run
    then loads ``model.init_from`` into it, :func:`init_student_from`). ``recipes[i]`` and
    ``optimizers[i]`` (``(optax transformation, lr schedule)``) belong to ``stages[i]``.
    """

    config: Any
    cfg_dict: dict
    mesh: Any
    data: DataSetup
    steps_per_epoch: int
    stages: list[Stage]
    recipes: list[Recipe]
    optimizers: list
    student: models_lib.ModelFns
    teacher: models_lib.ModelFns | None
    teacher_variables: Any
    teacher_meta: dict | None
    logits_cache: Any
    trains_teacher: bool
    initial_state: step_lib.TrainState
    state_sharding: Any = None

    @property
    def total_steps(self) -> int:
        return self.stages[-1].end

    @property
    def num_epochs(self) -> int:
        return sum(st.num_epochs for st in self.stages)

    def stage_of_checkpoint(self, step: int) -> int:
        """The stage whose optimizer state a checkpoint at ``step`` holds (the one that ran step-1)."""
        for st in self.stages:
            if st.start < step <= st.end:
                return st.index
        return 0

    def state_template(self, step: int):
        """The train state a checkpoint of ``step`` restores into (its stage's optimizer state)."""
        tx = self.optimizers[self.stage_of_checkpoint(step)][0]
        state = self.initial_state
        return jax.device_put(state.replace(opt_state=jax.device_put(tx.init(state.params),
                                                                     step_lib.replicated(self.mesh))),
                              self.state_sharding)


def apply_cpu_defaults() -> bool:
    """jaxkd's XLA:CPU defaults for a run (:mod:`jaxkd._xla_defaults`): added to ``XLA_FLAGS`` only
    while the process has no JAX backend yet (``import jaxkd`` never does this)."""
    return _xla_defaults.apply()


def build_run(config: ml_collections.ConfigDict, mesh) -> RunSetup:
    """Builds everything :func:`jaxkd.train.loop.train_and_evaluate` runs (see :class:`RunSetup`).

    Applies jaxkd's XLA:CPU defaults first (:func:`apply_cpu_defaults`; they take effect only if
    no JAX backend exists yet in the process)."""
    apply_cpu_defaults()
    data = build_data(config)
    d = config.data
    copies = d.get("copies", 1)
    if copies > 1:  # every example `copies` times per epoch (the relabelled-data view of several teachers)
        if config.teacher.get("cache"):
            raise ConfigError("config.data.copies > 1 cannot train from a teacher cache (teacher.cache)")
        data = dataclasses.replace(data, train=data_lib.RepeatedSource(data.train, copies))
    steps_per_epoch = data_lib.steps_per_epoch(len(data.train), d.batch_size)
    if steps_per_epoch < 1:
        raise ConfigError(f"config.data.batch_size={d.batch_size} is larger than the training set "
                          f"({len(data.train)} examples)")
    stages = resolve_stages(config, steps_per_epoch)
    recipes = stage_recipes(config, stages)
    uses_teacher = any(r.uses_teacher for r in recipes)
    trains_teacher = any(r.trains_teacher for r in recipes)  # Apprentice: the teacher is aux/teacher
    if uses_teacher and trains_teacher:
        raise ConfigError("a run cannot mix a frozen teacher with a jointly trained one (stages)")
    num_classes = data.info.num_classes
    student = create_model(config.model, "model", num_classes)
    teacher = create_model(config.teacher, "teacher", num_classes) if uses_teacher or trains_teacher else None
    sample = sample_input(data.info)
    teacher_vars = teacher_meta = joint_init = logits_cache = None
    if uses_teacher and config.teacher.get("cache"):  # logits by example id; the teacher is not loaded
        logits_cache = cache_lib.open_for_training(config, data.info, data.augmentation, recipes, data.train)
        teacher_meta = {"accuracy": logits_cache.manifest["teacher"].get("accuracy")}
    elif uses_teacher:
        teacher, teacher_vars, teacher_meta = load_teachers(config, teacher, sample, recipes, num_classes)
        teacher_vars = jax.device_put(teacher_vars, step_lib.replicated(mesh))
    if trains_teacher:
        joint_init, teacher_meta = joint_teacher_init(config, teacher, sample,
                                                      jax.random.fold_in(jax.random.key(config.seed), 1))
    optimizers = [param_groups.make_optimizer(st.optim, r.aux_optim, steps_per_epoch, st.num_epochs)
                  for st, r in zip(stages, recipes)]
    labels = _train_labels(data.train) if any(r.init_state is not None for r in recipes) else None
    state = step_lib.create_train_state(jax.random.key(config.seed), student, recipes, optimizers[0][0], sample,
                                        teacher=teacher, teacher_variables=teacher_vars,
                                        trainable_teacher_variables=joint_init, num_train=len(data.train),
                                        train_labels=labels, num_classes=num_classes)
    recipes = [step_lib.resolve_trainable(r, student, state.student_variables(), sample) for r in recipes]
    sharding = step_lib.state_shardings(state, mesh, recipes)
    # typed keys cannot be device_put onto devices of other processes: move the raw key data, wrap again
    state = keys_lib.wrap_like(jax.device_put(keys_lib.to_key_data(state), sharding), state)
    return RunSetup(config=config, cfg_dict=json.loads(json.dumps(config.to_dict())), mesh=mesh, data=data,
                    steps_per_epoch=steps_per_epoch, stages=stages, recipes=recipes, optimizers=optimizers,
                    student=student, teacher=teacher, teacher_variables=teacher_vars, teacher_meta=teacher_meta,
                    logits_cache=logits_cache, trains_teacher=trains_teacher, initial_state=state,
                    state_sharding=sharding)


def _train_labels(source):
    """The label of every training example, by position (``index``)."""
    import numpy as np

    labels = getattr(source, "labels", None)
    if labels is None:
        labels = source.gather(np.arange(len(source)))["label"]
    return np.asarray(labels, np.int32)


def eval_data(config, split: str | None = None):
    """``(info, source)`` of ``split`` (default ``config.data.eval_split``) of the run's data set, whole."""
    d = config.data
    info, _, source = data_lib.load_dataset(d.name, data_dir=d.data_dir, train_split=d.train_split,
                                            eval_split=split or d.eval_split, builder_kwargs=dict(d.builder_kwargs),
                                            download=d.download)
    return info, source


def build_eval(config, workdir: str, which: str = "best"):
    """``(info, eval source, model, pipeline, variables, meta)`` of the student stored in ``workdir``,
    for ``jaxkd eval`` (normalised as in training, never augmented)."""
    info, eval_src = eval_data(config)
    model = create_model(config.model, "model", info.num_classes)
    template = jax.jit(model.init)(jax.random.key(0), sample_input(info))
    variables, meta = ckpt_lib.load_model_variables(workdir, template, which, what="student")
    pipeline = step_lib.InputPipeline(mean=tuple(info.mean), std=tuple(info.std))
    return info, eval_src, model, pipeline, variables, meta
