"""Run configuration: defaults, loading from ``experiments/configs/*.py``, overrides, checks.

A config file defines ``get_config() -> ml_collections.ConfigDict`` (the JAX-ecosystem
convention). :func:`base_config` gives every key with its default; config files start from
it and change what they need, so an override of an unknown key fails with a clear message.

This module knows the keys every run has. What a method, a model or an optimizer accepts is
checked where they are built (:mod:`jaxkd.train.setup`): ``config.method`` holds only ``name`` by
default and takes the options of whichever method it names (its factory's signature). It
imports nothing of jaxkd but :mod:`jaxkd.errors`.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any, Iterable

import ml_collections

from jaxkd.errors import ConfigError

__all__ = ["ConfigError", "apply_overrides", "base_config", "load_config", "set_path", "upgrade_config", "validate"]


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
        # > 1: each training epoch holds every example this many times (data.RepeatedSource; batches
        # carry "copy"), e.g. once per teacher's soft labels for the relabel_data_kd method
        copies=1,
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
    # the method and its options: {"name": ..., **options of that method} (see jaxkd.core.build_recipe)
    c.method = ml_collections.ConfigDict(dict(name="hinton_kd"))
    # optim.name: "sgd" (PyTorch-style: weight decay added to the gradient before momentum), "adam",
    # "adamw", or any other optax optimizer, called with learning_rate=<schedule> and optim.kwargs;
    # clip_grad_norm: clip the gradient's global norm first; weight_decay_mask: None decays every
    # parameter (RepDistiller), or regexes of parameter paths ("student/fc/kernel") that decay.
    c.optim = ml_collections.ConfigDict(dict(
        name="sgd", lr=0.05, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="step",
        milestones=(), decay=0.1, warmup_epochs=0.0, kwargs={}, clip_grad_norm=None, weight_decay_mask=None,
        # zero SGD's momentum at each milestone, as a PyTorch script that re-creates its optimizer there
        reset_momentum_at_milestones=False))
    c.train = ml_collections.ConfigDict(dict(
        num_epochs=10, eval_every_epochs=1, checkpoint_every_steps=0, keep_checkpoints=3,
        max_inflight_steps=2, num_devices=None, progress=True, log_every_steps=50,
        tensorboard=True,
        # optional Weights & Biases run (jaxkd/train/wandb_writer.py; pip install 'jaxkd[wandb]')
        wandb=False, wandb_project=None, wandb_name=None,
        # a step with a non-finite loss or gradient: "stop" the run, or "skip" it (no update,
        # counted in metrics) and stop only after max_consecutive_skips skipped steps in a row
        on_nonfinite="stop", max_consecutive_skips=20))
    # Optional stages: a sequence of {"name", "num_epochs", "method": {...}, "optim": {...}};
    # None runs one stage with config.method for config.train.num_epochs.
    c.stages = None
    # Auxiliary modules (heads) loaded from earlier runs: {module name: work dir} (its newest run checkpoint).
    c.aux_init_from = {}
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
    """Applies ``a.b.c=value`` overrides (values parsed as Python literals, else strings).

    ``method.name``, ``model.name`` and ``teacher.name`` are applied first; when one changes the
    name, the options set for the old one are dropped (``method`` keeps only its ``name``, the
    model's ``kwargs`` become ``{}``), so ``method.name=ce`` on a KD config trains plain CE and
    ``model.name=cnn`` on an mlp config builds the default cnn. Options given in the same
    overrides are applied after it.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        pairs.append((key.strip(), _parse_value(text.strip())))
    for key, value in names_first(pairs):
        set_path(config, key, value)
    return config


_NAMED = {"method.name": ("method", None), "model.name": ("model", "kwargs"), "teacher.name": ("teacher", "kwargs")}


def names_first(items):
    """``(dotted key, value)`` pairs with the ``*.name`` keys of :data:`_NAMED` first (stable)."""
    items = list(items)
    return [kv for kv in items if kv[0] in _NAMED] + [kv for kv in items if kv[0] not in _NAMED]


def set_path(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Sets the dotted ``key`` (which must exist, except inside free-form dicts) to ``value``.

    A changed ``method.name``/``model.name``/``teacher.name`` drops the options of the old
    name (see :func:`apply_overrides`)."""
    if key in _NAMED and key.split(".")[0] in config and config[key.split(".")[0]].get("name") != value:
        section, kwargs = _NAMED[key]
        if kwargs is None:
            config[section] = ml_collections.ConfigDict({"name": value})
            return
        config[section][kwargs] = {}
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
_ALIASES = {"learning_rate": "lr", "epochs": "num_epochs", "wd": "weight_decay",
            "batch": "batch_size", "dataset": "name", "lr_schedule": "schedule", "optimizer": "name"}


def _open_dict(prefix: list[str]) -> bool:
    # Free-form dicts whose keys are not known in advance.
    # (``method`` takes the options of whichever method is chosen)
    return bool(prefix) and prefix[-1] in ("kwargs", "builder_kwargs", "augment", "method", "presets",
                                           "aux_init_from")


def _require(cond: bool, key: str, msg: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"config.{key} {msg}; got {value!r}")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Checks the value ranges of the keys every run has; raises :class:`ConfigError` naming the
    first bad key. Names (models, methods and their options, optimizers) are checked where they
    are built, by :func:`jaxkd.train.setup.build_run`."""
    d, o, t = config.data, config.optim, config.train
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
    copies = d.get("copies", 1)
    _require(isinstance(copies, int) and not isinstance(copies, bool) and copies >= 1, "data.copies",
             "must be an int >= 1", copies)
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
    _require(isinstance(o.lr, (int, float)) and not isinstance(o.lr, bool) and o.lr > 0, "optim.lr",
             "must be a number > 0", o.lr)
    _require(isinstance(o.weight_decay, (int, float)) and o.weight_decay >= 0, "optim.weight_decay",
             "must be >= 0", o.weight_decay)
    _require(isinstance(config.method.get("name"), str) and config.method.name, "method.name",
             "must name a method", config.method.get("name"))
    _require(config.teacher.checkpoint in ("best", "last"), "teacher.checkpoint", "must be 'best' or 'last'",
             config.teacher.checkpoint)
    cache = config.teacher.get("cache")
    _require(cache is None or (isinstance(cache, str) and cache), "teacher.cache",
             "must be the folder of a teacher cache (jaxkd cache-teacher) or None", cache)
    init_from = config.model.get("init_from")
    _require(init_from is None or (isinstance(init_from, str) and init_from), "model.init_from",
             "must be a work dir (a non-empty string) or None", init_from)


# What config.method held by default before methods took their options from their factories
# (jaxkd <= 0.1): Hinton KD's keys, present in every stored config whatever the method.
_LEGACY_METHOD_DEFAULTS = {"temperature": 4.0, "alpha": 0.9, "gamma": 0.1, "mode": "kl"}


def upgrade_config(stored: dict, accepted_options=None) -> dict:
    """A config stored by an older jaxkd (a checkpoint's ``meta["config"]``), as this one reads it.

    * ``method`` (and each stage's ``method``): the Hinton KD keys the old base config put in
      every method are dropped where they still hold those defaults and the method does not take
      them (``accepted_options(name) -> set``, default: keep everything); Apprentice's
      ``kd_temperature`` is its ``temperature``.
    * ``optim`` gains ``kwargs``, ``clip_grad_norm``, ``weight_decay_mask`` and
      ``reset_momentum_at_milestones`` (none of them set); ``data`` gains ``copies`` (1).

    Returns a new dict; the input is not changed.
    """
    import copy

    cfg = copy.deepcopy(stored)

    def method(m):
        if not isinstance(m, dict):
            return m
        m = dict(m)
        if m.get("name") == "apprentice" and "kd_temperature" in m:
            m["temperature"] = m.pop("kd_temperature")
        accepted = accepted_options(m.get("name")) if accepted_options else None
        if accepted is not None:
            for key, default in _LEGACY_METHOD_DEFAULTS.items():
                if key in m and key not in accepted and m[key] == default:
                    del m[key]
        return m

    if "method" in cfg:
        cfg["method"] = method(cfg["method"])
    for stage in cfg.get("stages") or ():
        if isinstance(stage, dict) and "method" in stage:
            stage["method"] = method(stage["method"])
    if isinstance(cfg.get("data"), dict):
        cfg["data"].setdefault("copies", 1)
    optim = cfg.setdefault("optim", {})
    for key, default in (("kwargs", {}), ("clip_grad_norm", None), ("weight_decay_mask", None),
                         ("reset_momentum_at_milestones", False)):
        optim.setdefault(key, default)
    return cfg
