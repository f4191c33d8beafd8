"""Run configuration: defaults, loading from ``experiments/configs/*.py``, overrides, checks.

A config file defines ``get_config() -> ml_collections.ConfigDict`` (the JAX-ecosystem
convention). :func:`base_config` gives every key with its default; config files start from
it and change what they need, so an override of an unknown key fails with a clear message.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any, Iterable

import ml_collections


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(
        name="digits", data_dir=None, train_split="train", eval_split="test",
        num_train_examples=None, subset_seed=0, builder_kwargs={}, download=False,
        batch_size=64, eval_batch_size=256, augment=None,  # None: the data set's default
        # > 0: hold out this fraction of the training examples (after num_train_examples, seeded by
        # subset_seed, class-stratified) as a validation set that picks the best checkpoint; 0 picks it
        # on eval_split, as the reference code (RepDistiller) does.
        val_fraction=0.0,
    ))
    # model.init_from: a work dir whose best student initialises a fresh run (not a resume);
    # "{seed}" in it is replaced by config.seed.
    c.model = ml_collections.ConfigDict(dict(name="mlp", kwargs={}, init_from=None))
    # teacher.workdir may also be a list of work dirs: teachers of this architecture, stacked.
    # teacher.cache: a folder from `jaxkd cache-teacher` (jaxkd/train/teacher_cache.py); logit methods
    # then read the teacher's logits from it by example id and the teacher is not loaded.
    c.teacher = ml_collections.ConfigDict(dict(name="cnn", kwargs={}, workdir=None, checkpoint="best",
                                               cache=None))
    # Several teachers (multi-teacher methods): a list of {name, kwargs, workdir, checkpoint}
    # (name/kwargs default to config.teacher's); when set, it replaces config.teacher.
    c.teachers = None
    c.method = ml_collections.ConfigDict(dict(name="hinton_kd", temperature=4.0, alpha=0.9, gamma=0.1,
                                              mode="kl"))
    c.optim = ml_collections.ConfigDict(dict(
        name="sgd", lr=0.05, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="step",
        milestones=(), decay=0.1, warmup_epochs=0.0))
    c.train = ml_collections.ConfigDict(dict(
        num_epochs=10, eval_every_epochs=1, checkpoint_every_steps=0, keep_checkpoints=3,
        max_inflight_steps=2, num_devices=None, progress=True, log_every_steps=50,
        tensorboard=True,
        # a step with a non-finite loss or gradient: "stop" the run, or "skip" it (no update,
        # counted in metrics) and stop only after max_consecutive_skips skipped steps in a row
        on_nonfinite="stop", max_consecutive_skips=20))
    # Optional stages: a sequence of {"name", "num_epochs", "method": {...}, "optim": {...}};
    # None runs one stage with config.method for config.train.num_epochs.
    c.stages = None
    # Named variants for `jaxkd compare --methods a,b`: {name: {dotted.key: value, ...}}.
    c.presets = {}
    # Used by `jaxkd compare` for the teacher run (model = config.teacher).
    c.teacher_train = ml_collections.ConfigDict(dict(num_epochs=None, optim=None))
    return c


def load_config(path: str) -> ml_collections.ConfigDict:
    """Loads ``get_config()`` from a Python config file."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location("_jaxkd_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config()")
    return module.get_config()


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if text.lower() in ("none", "null"):
            return None
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Applies ``a.b.c=value`` overrides (values parsed as Python literals, else strings)."""
    config = ml_collections.ConfigDict(config.to_dict())
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        set_path(config, key.strip(), _parse_value(text.strip()))
    return config


def set_path(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    node = config
    parts = key.split(".")
    for i, part in enumerate(parts):
        keys = list(node.keys()) if hasattr(node, "keys") else []
        last = i == len(parts) - 1
        if part not in keys and not (last and isinstance(node, (dict, ml_collections.ConfigDict))
                                     and _open_dict(parts[:-1])):
            close = difflib.get_close_matches(part, keys, n=1, cutoff=0.5)
            if not close and _ALIASES.get(part) in keys:
                close = [_ALIASES[part]]
            hint = f"; did you mean {'.'.join(parts[:i] + [close[0]])!r}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        if last:
            try:
                node[part] = value
            except TypeError as e:
                raise ConfigError(f"config.{key}: cannot set {value!r}: {e}") from None
        else:
            node = node[part]


# Names users commonly reach for, mapped to ours (for "did you mean" hints).
_ALIASES = {"learning_rate": "lr", "epochs": "num_epochs", "wd": "weight_decay", "T": "temperature",
            "batch": "batch_size", "dataset": "name", "lr_schedule": "schedule", "optimizer": "name"}


def _open_dict(prefix: list[str]) -> bool:
    # Free-form dicts whose keys are not known in advance.
    # (``method`` takes the options of whichever method is chosen)
    return bool(prefix) and prefix[-1] in ("kwargs", "builder_kwargs", "augment", "method", "presets")


def _require(cond: bool, key: str, msg: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"config.{key} {msg}; got {value!r}")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Checks value ranges and names; raises :class:`ConfigError` naming the first bad key."""
    from jaxkd.models import list_models
    from jaxkd.train.optim import OPTIMIZERS, SCHEDULES
    from jaxkd.train.recipes import RECIPES

    d, o, t, m = config.data, config.optim, config.train, config.method
    _require(isinstance(d.batch_size, int) and d.batch_size > 0, "data.batch_size", "must be a positive int",
             d.batch_size)
    _require(isinstance(d.eval_batch_size, int) and d.eval_batch_size > 0, "data.eval_batch_size",
             "must be a positive int", d.eval_batch_size)
    if num_devices:
        _require(d.batch_size % num_devices == 0, "data.batch_size",
                 f"must be divisible by the number of devices ({num_devices})", d.batch_size)
        _require(d.eval_batch_size % num_devices == 0, "data.eval_batch_size",
                 f"must be divisible by the number of devices ({num_devices})", d.eval_batch_size)
    if d.num_train_examples is not None:
        _require(isinstance(d.num_train_examples, int) and d.num_train_examples >= d.batch_size,
                 "data.num_train_examples", "must be an int >= data.batch_size (or None)", d.num_train_examples)
    vf = d.get("val_fraction", 0.0)
    _require(isinstance(vf, (int, float)) and not isinstance(vf, bool) and 0.0 <= vf < 1.0, "data.val_fraction",
             "must be a number in [0, 1) (0: pick the best checkpoint on data.eval_split)", vf)
    _require(isinstance(t.num_epochs, int) and t.num_epochs > 0, "train.num_epochs", "must be a positive int",
             t.num_epochs)
    _require(isinstance(t.max_inflight_steps, int) and t.max_inflight_steps >= 1, "train.max_inflight_steps",
             "must be an int >= 1", t.max_inflight_steps)
    _require(isinstance(t.checkpoint_every_steps, int) and t.checkpoint_every_steps >= 0,
             "train.checkpoint_every_steps", "must be an int >= 0 (0: only at epoch ends)", t.checkpoint_every_steps)
    _require(t.get("on_nonfinite", "stop") in ("stop", "skip"), "train.on_nonfinite", "must be 'stop' or 'skip'",
             t.get("on_nonfinite"))
    _require(isinstance(t.get("max_consecutive_skips", 1), int) and t.get("max_consecutive_skips", 1) >= 1,
             "train.max_consecutive_skips", "must be an int >= 1", t.get("max_consecutive_skips"))
    _require(o.name in OPTIMIZERS, "optim.name", f"must be one of {OPTIMIZERS}", o.name)
    _require(o.schedule in SCHEDULES, "optim.schedule", f"must be one of {SCHEDULES}", o.schedule)
    _require(isinstance(o.lr, (int, float)) and o.lr > 0, "optim.lr", "must be a number > 0", o.lr)
    _require(isinstance(o.weight_decay, (int, float)) and o.weight_decay >= 0, "optim.weight_decay",
             "must be >= 0", o.weight_decay)
    _require(0 <= o.momentum < 1, "optim.momentum", "must be in [0, 1)", o.momentum)
    _require(m.name in RECIPES, "method.name", f"must be one of {sorted(RECIPES)}", m.name)
    if "temperature" in m:
        _require(isinstance(m.temperature, (int, float)) and m.temperature > 0, "method.temperature",
                 "must be a number > 0", m.temperature)
    for w in ("alpha", "gamma"):
        if w in m and isinstance(m[w], (int, float)):
            _require(m[w] >= 0, f"method.{w}", "must be >= 0", m[w])
    models = list_models()
    for key in ("model", "teacher"):
        name = config[key].name
        if key == "teacher" and not _uses_teacher(m.name):
            continue
        if name not in models:
            close = difflib.get_close_matches(str(name), models, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"config.{key}.name: unknown model {name!r}{hint}; available: {models}")
    _require(config.teacher.checkpoint in ("best", "last"), "teacher.checkpoint", "must be 'best' or 'last'",
             config.teacher.checkpoint)
    cache = config.teacher.get("cache")
    _require(cache is None or (isinstance(cache, str) and cache), "teacher.cache",
             "must be the folder of a teacher cache (jaxkd cache-teacher) or None", cache)
    init_from = config.model.get("init_from")
    _require(init_from is None or (isinstance(init_from, str) and init_from), "model.init_from",
             "must be a work dir (a non-empty string) or None", init_from)
    if _uses_teacher(m.name):
        teacher_specs(config)


def _uses_teacher(method_name: str) -> bool:
    return method_name != "ce"


def method_options(method: ml_collections.ConfigDict) -> dict:
    """``config.method`` as keyword options for its recipe."""
    import inspect

    from jaxkd.train.recipes import RECIPES

    method = method.to_dict() if hasattr(method, "to_dict") else dict(method)
    name = method.get("name")
    if name not in RECIPES:
        return method
    accepted = set(inspect.signature(RECIPES[name]).parameters)
    # The shared defaults of base_config().method (temperature, alpha, ...) are dropped for
    # methods that do not take them; any other key must be one the method takes.
    shared = set(base_config().method.keys())
    return {"name": name, **{k: v for k, v in method.items() if k in accepted or k not in shared}}


def teacher_specs(config: ml_collections.ConfigDict) -> list[dict]:
    """The teachers a run distils from: ``[{"name", "kwargs", "workdir", "checkpoint"}, ...]``.

    From ``config.teachers`` when set (each entry's ``name``/``kwargs``/``checkpoint`` default
    to ``config.teacher``'s, ``workdir`` is required), else from ``config.teacher``, whose
    ``workdir`` may be one work dir or a list of them (teachers of one architecture). One
    spec means the ordinary single-teacher run. Raises :class:`ConfigError` for a bad value.
    """
    from jaxkd.models import list_models

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
        if spec["name"] not in list_models():
            raise ConfigError(f"config.teachers[{i}].name: unknown model {spec['name']!r}; "
                              f"available: {list_models()}")
        specs.append(spec)
    return specs
