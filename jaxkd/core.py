"""The types every method is built from: :class:`LossInputs`, :class:`Recipe`, weight schedules,
and the registry of recipes (:func:`register_recipe`, :func:`build_recipe`).

Kept free of imports from the rest of jaxkd (but :mod:`jaxkd.errors`), so method modules
(``jaxkd.methods.*``), a user's config file and the train loop can all depend on it. jaxkd's own
methods register themselves when :mod:`jaxkd.methods` is imported (the run setup does that);
a user's method registers from its own module or config file with the same call.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any, Callable, Mapping

import chex
import jax.numpy as jnp

from jaxkd.errors import ConfigError

Array = chex.Array


@dataclasses.dataclass(frozen=True)
class LossInputs:
    """Everything a recipe loss may read; built inside the jitted step.

    ``batch`` is the whole (prepared) batch, every per-example field of the data set sharded on
    the batch axis: ``image`` (the normalised network input both networks saw, also ``inputs``),
    ``label`` (also ``labels``), ``id`` (the example's index in its split), ``index`` (its position
    in the training set actually used, ``0..N-1``: the row of a memory bank), and whatever else the
    data set carries (boxes, token ids, masks, ...) or ``Recipe.prepare_batch`` made.
    ``teacher_logits`` / ``teacher_features`` are ``None`` for recipes without a teacher.
    ``aux_params`` / ``aux_state`` hold the auxiliary modules' params and other collections
    (``{}`` if none), keyed by module name; ``recipe_state`` the recipe's own state
    (``Recipe.init_state``; ``None`` if it has none).
    ``step`` is the global step, ``stage_step`` the step within the current stage and
    ``epoch`` the (integer) epoch within the stage, ``num_epochs`` (a Python int) the stage's
    length in epochs and ``stage_progress`` the fraction of the stage done (0 to 1): weight
    schedules use ``stage_step`` or ``stage_progress``.
    ``student_apply(x, update_state=False)`` and ``teacher_apply(x)`` run the networks on other
    inputs (e.g. adversarial samples) and return ``(logits, features)``: the student in train
    mode with the params being differentiated, the teacher in inference mode and differentiable
    w.r.t. its input (its variables are constants of the step, so no gradient reaches them).
    With ``update_state=True`` the student's call continues from the batch statistics of the
    main forward and also returns its new state, ``(logits, features, state)``; a recipe that
    wants those statistics kept returns the state as ``LossOutput.student_state``. Otherwise an
    extra forward's statistics are discarded. ``student_state`` is the student's state after the
    main forward (what the step keeps unless ``LossOutput.student_state`` replaces it), so a
    recipe can keep an extra forward's statistics on some steps only (``jnp.where`` per leaf).
    """

    student_logits: Array
    student_features: Mapping[str, Array]
    teacher_logits: Array | None
    teacher_features: Mapping[str, Array] | None
    labels: Array
    step: Array
    aux_params: Any
    rng: Array
    aux_state: Any = None
    stage_step: Array | None = None
    epoch: Array | None = None
    num_epochs: int | None = None
    stage_progress: Array | None = None
    inputs: Array | None = None
    student_apply: Callable | None = None
    teacher_apply: Callable | None = None
    batch: Mapping[str, Array] | None = None
    recipe_state: Any = None
    student_state: Any = None


@dataclasses.dataclass(frozen=True)
class LossOutput:
    """What a recipe's loss returns (the tuple forms below are still accepted).

    The step minimises ``mean(per_example) + sum(batch_terms)``:

    * ``per_example``: ``[B]`` values (``B`` the prepared batch size), averaged over the global
      batch, the optax convention;
    * ``batch_terms``: ``{name: scalar}`` terms defined over the whole batch (correlations,
      contrastive losses over the batch, means over filtered rows). Inside the jitted step the
      arrays are the global batch, whatever the device count, so these terms are computed over
      all examples and 8 devices give 1 device's numbers;
    * ``parts``: ``{name: [B] or scalar}`` logged as their means (``train/<name>``);
    * ``aux_state``: the auxiliary modules' new collections (e.g. a head's batch statistics);
    * ``recipe_state``: the recipe's new state (memory banks, EMA teachers, constants), updated
      in the step, never differentiated;
    * ``student_state``: the student's batch statistics to keep instead of the main forward's
      (from an extra forward with ``update_state=True``).

    ``None`` fields keep what was there. A loss may also return ``(per_example, parts)`` or
    ``(per_example, parts, aux_state)``.
    """

    per_example: Array
    parts: Mapping[str, Array] = dataclasses.field(default_factory=dict)
    batch_terms: Mapping[str, Array] = dataclasses.field(default_factory=dict)
    aux_state: Any = None
    recipe_state: Any = None
    student_state: Any = None


def as_loss_output(out) -> LossOutput:
    """A loss's return value (a :class:`LossOutput` or one of the tuple forms) as a LossOutput."""
    if isinstance(out, LossOutput):
        return out
    if isinstance(out, tuple) and len(out) in (2, 3):
        return LossOutput(per_example=out[0], parts=out[1], aux_state=out[2] if len(out) == 3 else None)
    raise TypeError("a recipe's loss must return a LossOutput, (per_example, parts) or (per_example, parts, "
                    f"aux_state); got {type(out).__name__}")


@dataclasses.dataclass(frozen=True)
class RecipeContext:
    """What ``Recipe.init_state`` may read about the run when the train state is created.

    ``train_labels`` holds the label of every training example by its position (``index``),
    ``student_features``/``teacher_features`` the shapes (``jax.ShapeDtypeStruct``) of the taps on
    a one-example batch, ``rng`` a key of its own."""

    num_train: int
    num_classes: int
    train_labels: Any
    student_features: Mapping[str, Any]
    teacher_features: Mapping[str, Any] | None
    rng: Array


# loss(inputs) -> LossOutput, or (per-example total loss [B], {name: per-example component [B]}),
# or (..., ..., new_aux_state) when auxiliary modules keep state (e.g. a regressor's BN).
LossFn = Callable[[LossInputs], Any]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A distillation method as data: the generic loop runs it.

    Attributes:
      name: method name (``config.method.name``).
      loss: pure per-example loss, see :data:`LossFn`.
      uses_teacher: run the (frozen) teacher inside the step.
      init_aux: ``init_aux(rng, student_features, teacher_features) -> variables`` (a Flax
        variables dict ``{"params": {name: ...}, "batch_stats": {name: ...}}``, top-level
        names unique across recipes) for auxiliary trainable modules; ``None`` if none.
      trainable: ``trainable(path) -> bool`` on parameter paths such as
        ``"student/stage1/conv1/kernel"`` or ``"aux/regressor/Conv_0/kernel"``; params for
        which it is False get no update and their batch statistics stay as they are
        (bit-for-bit frozen). ``None`` trains everything.
      train_up_to: name of a student feature tap (e.g. ``"stage2"``): only the student params
        that feed that feature train, plus all auxiliary modules (FitNets' hint stage). The
        loop resolves it into ``trainable`` from the model by gradient dependence.
      multi_teacher: the loss reads ``teacher_logits`` of shape ``[N, B, C]`` (several
        teachers, see :mod:`jaxkd.models.ensemble`; one teacher arrives as ``[B, C]``). Only
        such recipes run when the config names several teachers.
      aux_optim: an optimizer config (the keys of ``config.optim``) for the auxiliary
        params (``"aux/..."``), e.g. a discriminator's own Adam at lr 1e-4; ``None``: they
        train with the student's optimizer.
      trains_teacher: the teacher (``config.teacher``) trains jointly with the student
        (Apprentice): it is the auxiliary module ``aux/teacher`` (params; batch stats in
        ``model_state["aux"]``), starts from ``config.teacher.workdir`` when that is set, else
        from scratch, runs in train mode inside the step, and its logits/features arrive as
        ``teacher_logits``/``teacher_features`` *with* gradients (the loss decides what
        reaches the teacher). Checkpointed with the run, evaluated each epoch, never exported
        as the student. Not combined with a frozen teacher (``uses_teacher``).
      teacher_logits_only: the loss reads only ``teacher_logits`` (no teacher features, no
        ``teacher_apply``), so it can train from a teacher-output cache (``teacher.cache``).
      teacher_temperature: the loss reads the teacher's logits only through
        ``softmax(teacher_logits / T)`` with this ``T`` (Hinton KD: its temperature; Label
        Refinery: 1). A top-k teacher cache, which keeps that softmax exact only at the
        temperature it was made for, serves only such recipes. ``None``: not declared.
      prepare_batch: ``prepare_batch(batch, rng, pipeline) -> batch``, run inside the jitted step
        on the raw batch (``image`` as stored) with the step's RNG, instead of the default
        augment-and-normalise (``pipeline.augment``/``pipeline.normalize`` are there to use). It
        may change the batch size (e.g. four rotated views per image); teacher and student see
        the returned ``image``, and ``label`` (if present) must match it.
      init_state: ``init_state(context: RecipeContext) -> pytree``: state that gradients do not
        train (memory banks, EMA teachers, normalising constants). It lives in the train state
        (``state.recipe_state[name]``), is checkpointed, resumed exactly and replaced by
        ``LossOutput.recipe_state`` each step. Placed replicated on the mesh unless
        ``state_partition`` says otherwise.
      state_partition: a ``jax.sharding.PartitionSpec`` (or a pytree of them, a prefix of the
        state) placing the recipe state on the mesh, e.g. ``P("data")`` to split a large bank's
        rows over the devices; ``None``: replicated.
      frozen: path prefixes (``"aux/teacher_head"``, ``"student"``) that do not train in this
        recipe's stage (params and their batch statistics stay bit for bit), on top of
        ``trainable``: an auxiliary module declared by an earlier stage is frozen this way.
    """

    name: str
    loss: LossFn
    uses_teacher: bool = False
    init_aux: Callable[..., Any] | None = None
    trainable: Callable[[str], bool] | None = None
    train_up_to: str | None = None
    multi_teacher: bool = False
    aux_optim: Mapping[str, Any] | None = None
    trains_teacher: bool = False
    teacher_logits_only: bool = False
    teacher_temperature: float | None = None
    prepare_batch: Callable[..., Any] | None = None
    init_state: Callable[[RecipeContext], Any] | None = None
    state_partition: Any = None
    frozen: tuple[str, ...] = ()

    def trains(self, path: str) -> bool:
        """Whether the parameter at ``path`` (``"student/..."``, ``"aux/..."``) trains in this stage."""
        if any(path == f or path.startswith(f.rstrip("/") + "/") for f in self.frozen):
            return False
        return self.trainable is None or bool(self.trainable(path))

    @property
    def freezes_anything(self) -> bool:
        return self.trainable is not None or bool(self.frozen)


def make_weight_schedule(spec: Any) -> Callable[..., Array]:
    """A loss weight as a function ``weight(stage_step, progress=None)``.

    ``spec`` is a number (constant) or a mapping with ``type`` in
    ``{"constant", "linear", "cosine", "piecewise"}``, measured in steps of the current stage
    when it has ``"steps"`` (or ``"unit": "steps"``), else in ``progress`` through the stage
    (0 at its start, 1 at its end):

    * ``{"type": "linear", "init": a, "end": b[, "steps": n]}``: linear from a to b.
    * ``{"type": "cosine", "init": a, "end": b[, "steps": n]}``: cosine decay from a to b.
    * ``{"type": "piecewise", "init": a, "boundaries": [t1, ...], "scales": [k1, ...]}``:
      ``a`` times the product of the ``k_i`` whose ``t_i`` has been reached.
    """
    if isinstance(spec, (int, float)):
        value = float(spec)
        return lambda step, progress=None: jnp.asarray(value, jnp.float32)
    spec = dict(spec)
    kind = spec.get("type", "constant")
    if kind == "constant":
        return make_weight_schedule(float(spec["value"]))
    unit = spec.get("unit", "steps" if "steps" in spec else "progress")
    if unit not in ("steps", "progress"):
        raise ValueError(f"weight schedule unit must be 'steps' or 'progress'; got {unit!r}")
    length = float(spec.get("steps", 1.0)) if unit == "steps" else 1.0

    def position(step, progress):
        if unit == "progress":
            if progress is None:
                raise ValueError("this weight schedule is measured in stage progress, which was not given")
            return jnp.asarray(progress, jnp.float32)
        return jnp.asarray(step, jnp.float32)

    if kind in ("linear", "cosine"):
        init, end = float(spec["init"]), float(spec["end"])

        def schedule(step, progress=None):
            frac = jnp.clip(position(step, progress) / length, 0.0, 1.0)
            if kind == "linear":
                return init + (end - init) * frac
            return end + (init - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return schedule
    if kind == "piecewise":
        init = float(spec["init"])
        pairs = list(zip(map(float, spec["boundaries"]), map(float, spec["scales"])))

        def piecewise(step, progress=None):
            t = position(step, progress)
            value = jnp.asarray(init, jnp.float32)
            for boundary, scale in pairs:
                value = value * jnp.where(t >= boundary, scale, 1.0)
            return value
        return piecewise
    raise ValueError(f"unknown weight schedule type {kind!r}; expected constant, linear, cosine or piecewise")


def aux_variables(aux_params, aux_state, name: str) -> dict:
    """The Flax variables of auxiliary module ``name``: its params and its entries of the other
    collections (``{"params": ..., "batch_stats": ...}``), as ``module.apply`` takes them."""
    return {"params": aux_params[name],
            **{coll: tree[name] for coll, tree in (aux_state or {}).items() if name in tree}}


def last_occurrence(index: Array) -> Array:
    """``[B]`` bool: True where ``index[i]`` does not occur again later in the batch.

    Rows of a table updated from a batch that holds the same example twice (a batch spanning two
    epochs) are written once, from the example's last occurrence in batch order: a defined,
    deterministic rule (a scatter with repeated indices leaves the winner unspecified)."""
    index = jnp.asarray(index)
    later = jnp.triu(index[None, :] == index[:, None], k=1)  # [i, j]: j > i holds the same index
    return ~jnp.any(later, axis=1)


def update_rows(table: Array, index: Array, rows: Array) -> Array:
    """``table`` with ``table[index[i]] = rows[i]``; a repeated index keeps its last row
    (:func:`last_occurrence`). ``index`` must lie in ``[0, len(table))``."""
    keep = last_occurrence(index)
    target = jnp.where(keep, index, table.shape[0])  # out of range: dropped
    return table.at[target].set(rows.astype(table.dtype), mode="drop")


def with_aux_state(aux_state, name: str, collections: Mapping[str, Any]) -> dict:
    """``aux_state`` with auxiliary module ``name``'s collections replaced by ``collections``
    (e.g. the batch statistics a train-mode ``apply`` returned); the other modules are untouched."""
    out = dict(aux_state or {})
    for coll, tree in collections.items():
        out[coll] = {**out.get(coll, {}), name: tree}
    return out


# --------------------------------------------------------------------------------------------
# The recipe registry
# --------------------------------------------------------------------------------------------

_RECIPES: dict[str, Callable[..., Recipe]] = {}


def _origin(factory) -> tuple:
    try:
        where = inspect.getsourcefile(factory)
    except TypeError:
        where = None
    return getattr(factory, "__qualname__", repr(factory)), where


def register_recipe(name: str, factory: Callable[..., Recipe] | None = None, *, overwrite: bool = False):
    """Makes ``config.method.name = name`` build its recipe with ``factory(**options)``.

    The factory's keyword parameters are the method's options, their defaults its defaults:
    ``config.method`` holds ``name`` plus any of them, and anything else is refused with a
    suggestion. Usable as a decorator (``@register_recipe("my_kd")``). Registering another
    factory under a taken name needs ``overwrite=True``; the same function registered again
    (a config file loaded twice) is fine. Returns the factory.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a recipe name must be a non-empty string; got {name!r}")
    if factory is None:
        return lambda f: register_recipe(name, f, overwrite=overwrite)
    if not callable(factory):
        raise TypeError(f"the factory of recipe {name!r} must be callable; got {factory!r}")
    params = inspect.signature(factory).parameters.values()
    positional = [p.name for p in params if p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY)
                  or (p.kind == p.POSITIONAL_OR_KEYWORD and p.default is p.empty)]
    if positional:
        raise TypeError(f"the factory of recipe {name!r} must take options by keyword with defaults; "
                        f"{positional} have none")
    old = _RECIPES.get(name)
    if old is not None and not overwrite and _origin(old) != _origin(factory):
        raise ValueError(f"method {name!r} is already registered (by {_origin(old)[0]}); "
                         "pass overwrite=True to replace it")
    _RECIPES[name] = factory
    return factory


def list_recipes() -> list[str]:
    """The registered method names, sorted (jaxkd's own appear once :mod:`jaxkd.methods` is imported)."""
    return sorted(_RECIPES)


def recipe_factory(name: str) -> Callable[..., Recipe]:
    """The factory registered as ``name``; :class:`~jaxkd.errors.ConfigError` with a suggestion if none."""
    if name not in _RECIPES:
        close = difflib.get_close_matches(str(name), _RECIPES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown method {name!r}{hint} Available: {', '.join(sorted(_RECIPES))}")
    return _RECIPES[name]


def recipe_options(name: str) -> dict[str, Any]:
    """The options of method ``name`` with their defaults (from its factory's signature)."""
    return {p.name: p.default for p in inspect.signature(recipe_factory(name)).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def build_recipe(method: Mapping[str, Any], where: str = "config.method") -> Recipe:
    """The recipe of ``method`` (``{"name": ..., **options}``, e.g. ``config.method``).

    An unknown name or option, or a value the factory rejects (``ValueError``/``TypeError``), is a
    one-line :class:`~jaxkd.errors.ConfigError` naming ``where``.
    """
    method = dict(method.to_dict() if hasattr(method, "to_dict") else method)
    name = method.pop("name", None)
    try:
        factory = recipe_factory(name)
    except ConfigError as e:
        raise ConfigError(f"{where}.name: {e}") from None
    options = recipe_options(name)
    for key in method:
        if key not in options:
            close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            listed = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "none"
            raise ConfigError(f"{where}: method {name!r} has no option {key!r}{hint} (its options: {listed})")
    try:
        recipe = factory(**method)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where} ({name}): {e}") from None
    if not isinstance(recipe, Recipe):
        raise ConfigError(f"{where}: the factory of method {name!r} returned {type(recipe).__name__}, not a Recipe")
    return recipe
