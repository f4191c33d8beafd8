"""The recipe interface: whole batches, batch preparation in the step, batch-level terms, recipe
state, heads declared once and shared across stages, batch statistics from extra forwards."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxkd import losses, models
from jaxkd.core import LossOutput, Recipe, aux_variables, last_occurrence, register_recipe, update_rows
from jaxkd.train import checkpoint as ckpt_lib
from jaxkd.train import step as step_lib
from jaxkd.train.loop import train_and_evaluate

import _datasets
from _configs import tiny_digits_config

# ---------------------------------------------------------------------------------------------
# 1. whole batches: every per-example field reaches the recipe, through the data set and loop
# ---------------------------------------------------------------------------------------------


def fields_recipe():
    """CE weighted by the data set's own per-example ``weight``; logs what it saw."""
    def init_state(ctx):
        return {"labels": jnp.asarray(ctx.train_labels)}

    def loss(inp):
        b = inp.batch
        ce = losses.cross_entropy(inp.student_logits, inp.labels)
        index_ok = (inp.recipe_state["labels"][b["index"]] == b["label"]).astype(jnp.float32)
        parts = {"ce": ce, "weight": b["weight"], "box0": b["box"][:, 0].astype(jnp.float32),
                 "box_diff": (b["box"][:, 3] - b["box"][:, 0]).astype(jnp.float32), "index_ok": index_ok,
                 "id": b["id"].astype(jnp.float32)}
        return LossOutput(per_example=b["weight"] * ce, parts=parts)
    return Recipe(name="fields", loss=loss, init_state=init_state)


register_recipe("fields", fields_recipe)


def test_every_field_of_the_data_set_reaches_the_recipe(tmp_path, data_dir):
    name = _datasets.prepare(data_dir)
    cfg = tiny_digits_config(**{"data.name": name, "data.num_train_examples": None, "method": {"name": "fields"},
                                "train.num_epochs": 2})
    train_and_evaluate(cfg, str(tmp_path / "run"))
    _, _, weights, boxes = _datasets.weighted_examples(_datasets.NUM_TRAIN)
    for rec in (json.loads(ln) for ln in open(tmp_path / "run" / "metrics.jsonl")):
        # an epoch is a permutation of the 128 examples: its means are the data set's
        assert rec["train/weight"] == pytest.approx(weights.mean(), rel=1e-6)
        assert rec["train/box0"] == pytest.approx(boxes[:, 0].mean(), rel=1e-6)
        assert rec["train/box_diff"] == 3.0 and rec["train/index_ok"] == 1.0
        assert rec["train/id"] == pytest.approx((_datasets.NUM_TRAIN - 1) / 2)
        assert rec["train/loss"] == pytest.approx(rec["train/loss"])  # (finite)


# ---------------------------------------------------------------------------------------------
# 2. batch preparation inside the step, changing the batch size
# ---------------------------------------------------------------------------------------------


class Linear(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        logits = nn.Dense(3, use_bias=False)(x.reshape((x.shape[0], -1)))
        return logits, {"logits": logits, "embedding": x.reshape((x.shape[0], -1))}


def flip_twice_recipe():
    """Each image and its horizontal mirror (the batch doubles), normalised by the pipeline."""
    def prepare(batch, rng, pipeline):
        images = jnp.concatenate([batch["image"], batch["image"][:, :, ::-1]], axis=0)
        return {**batch, "image": pipeline.normalize(images), "label": jnp.tile(batch["label"], 2)}

    def loss(inp):
        ce = losses.cross_entropy(inp.student_logits, inp.labels)
        kd = losses.hinton_kd(inp.student_logits, inp.teacher_logits, 2.0)
        return ce + kd, {"ce": ce, "kd": kd, "rows": jnp.full(ce.shape, float(ce.shape[0]))}
    return Recipe(name="flip_twice", loss=loss, uses_teacher=True, prepare_batch=prepare)


def test_prepare_batch_doubles_the_batch_for_student_and_teacher():
    student, teacher = models.from_linen(Linear(), "s"), models.from_linen(Linear(), "t")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 2, 3, 1), dtype=np.uint8)
    labels = np.array([0, 1, 2, 1], np.int32)
    pipeline = step_lib.InputPipeline((0.5,), (0.25,))
    sample = jnp.zeros((1, 2, 3, 1))
    t_vars = teacher.init(jax.random.PRNGKey(1), sample)
    recipe = flip_twice_recipe()
    state = step_lib.create_train_state(jax.random.PRNGKey(0), student, recipe, optax.sgd(0.0), sample)
    step = step_lib.make_train_step(student, recipe, optax.sgd(0.0), pipeline, teacher=teacher, donate=False)
    _, m = step(state, t_vars, {"image": jnp.asarray(images), "label": jnp.asarray(labels)})
    x = (np.concatenate([images, images[:, :, ::-1]]).astype(np.float64) / 255 - 0.5) / 0.25
    x = x.reshape(8, -1)
    ws = np.asarray(state.params["student"]["Dense_0"]["kernel"], np.float64)
    wt = np.asarray(t_vars["params"]["Dense_0"]["kernel"], np.float64)
    ls, lt = x @ ws, x @ wt
    log_p = ls - np.log(np.exp(ls).sum(1, keepdims=True))
    y = np.tile(labels, 2)
    ce = -log_p[np.arange(8), y]
    pt = np.exp(lt / 2) / np.exp(lt / 2).sum(1, keepdims=True)
    log_ps2 = ls / 2 - np.log(np.exp(ls / 2).sum(1, keepdims=True))
    kd = 4 * np.sum(pt * (np.log(pt) - log_ps2), 1)
    assert float(m["rows"]) == 8.0
    assert float(m["loss"]) == pytest.approx(np.mean(ce + kd), rel=1e-5)
    assert float(m["accuracy"]) == pytest.approx(np.mean(ls.argmax(1) == y))
    assert float(m["teacher_accuracy"]) == pytest.approx(np.mean(lt.argmax(1) == y))


# ---------------------------------------------------------------------------------------------
# 3. batch-level terms on the global batch: 8 devices equal 1
# ---------------------------------------------------------------------------------------------


def batch_term_recipe():
    """CE + DIST's intra-class term, defined over the whole batch (not per example)."""
    def loss(inp):
        ce = losses.cross_entropy(inp.student_logits, inp.labels)
        intra = losses.dist_intra(inp.student_logits, inp.teacher_logits, 4.0)
        return LossOutput(per_example=ce, parts={"ce": ce}, batch_terms={"intra": 2.0 * intra})
    return Recipe(name="batch_term", loss=loss, uses_teacher=True)


def _batch_term_run(mesh, steps=4):
    student, teacher = models.create_model("mlp", 10, hidden=(8,)), models.create_model("mlp", 10, hidden=(12,))
    sample = jnp.zeros((1, 8, 8, 1))
    t_vars = jax.jit(teacher.init)(jax.random.PRNGKey(1), sample)
    recipe, tx = batch_term_recipe(), optax.sgd(0.1, momentum=0.9)
    state = jax.device_put(step_lib.create_train_state(jax.random.PRNGKey(0), student, recipe, tx, sample),
                           step_lib.replicated(mesh))
    step = step_lib.make_train_step(student, recipe, tx, step_lib.InputPipeline((0.5,), (0.25,)), teacher=teacher,
                                    mesh=mesh)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        batch = {"image": rng.integers(0, 255, (32, 8, 8, 1), dtype=np.uint8),
                 "label": rng.integers(0, 10, 32).astype(np.int32)}
        state, m = step(state, t_vars, step_lib.shard_batch(batch, mesh))
        out.append({k: float(v) for k, v in m.items()})  # (blocks every step)
    return out, state


def eight_devices_batch_term(ctx):
    """(In the 8-device child, tests/_eight_devices.py) four steps with a batch-level term."""
    out = {}
    for n in (1, 8):
        metrics, state = _batch_term_run(step_lib.make_mesh(n))
        out[n] = {"metrics": metrics, "params": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state.params)]}
    return out


def test_batch_level_term_is_global_8_devices_equal_1(eight_devices):
    out = eight_devices("test_interface:eight_devices_batch_term")
    for a, b in zip(out["1"]["metrics"], out["8"]["metrics"]):
        for key in ("loss", "intra", "ce"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for a, b in zip(out["1"]["params"], out["8"]["params"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_batch_level_term_is_minimised_with_the_mean():
    """objective = mean(per_example) + sum(batch_terms), the batch term logged under its name."""
    metrics, _ = _batch_term_run(step_lib.make_mesh(1), steps=1)
    m = metrics[0]
    assert m["intra"] > 0 and m["loss"] == pytest.approx(m["ce"] + m["intra"], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# 4. recipe state: the update order of a repeated example, checkpoint and exact resume
# ---------------------------------------------------------------------------------------------


def test_update_rows_keeps_the_last_occurrence_of_a_repeated_index():
    index = jnp.array([3, 1, 3, 0, 1, 3])
    np.testing.assert_array_equal(last_occurrence(index), [False, False, False, True, True, True])
    table = jnp.zeros((5, 2))
    rows = jnp.arange(12.0).reshape(6, 2)
    out = np.asarray(jax.jit(update_rows)(table, index, rows))
    np.testing.assert_array_equal(out, [[6, 7], [8, 9], [0, 0], [10, 11], [0, 0]])  # by hand


def counting_recipe():
    """Counts how often each training example was seen and keeps the running mean of the loss:
    state a gradient never touches."""
    def init_state(ctx):
        return {"seen": jnp.zeros((ctx.num_train,), jnp.int32), "loss_sum": jnp.zeros(())}

    def loss(inp):
        ce = losses.cross_entropy(inp.student_logits, inp.labels)
        st = inp.recipe_state
        seen = st["seen"].at[inp.batch["index"]].add(1)
        return LossOutput(per_example=ce, parts={"ce": ce},
                          recipe_state={"seen": seen, "loss_sum": st["loss_sum"] + jnp.sum(ce)})
    return Recipe(name="counting", loss=loss, init_state=init_state)


register_recipe("counting", counting_recipe)


def test_recipe_state_is_checkpointed_updated_and_resumed_exactly(tmp_path, data_dir):
    cfg = tiny_digits_config(**{"method": {"name": "counting"}, "train.num_epochs": 3,
                                "train.checkpoint_every_steps": 1})
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train_and_evaluate(cfg, a)
    train_and_evaluate(cfg, b, stop_after_steps=3)
    step3 = ckpt_lib.load_run_state(b)[1]["recipe_state"]["counting"]
    assert step3["seen"].sum() == 3 * 64  # 3 steps of 64 after 1.5 epochs of 128
    train_and_evaluate(cfg, b)
    sa, sb = ckpt_lib.load_run_state(a)[1], ckpt_lib.load_run_state(b)[1]
    jax.tree.map(np.testing.assert_array_equal, sa, sb)
    np.testing.assert_array_equal(sa["recipe_state"]["counting"]["seen"], 3)  # every example once an epoch
    hist = [json.loads(ln) for ln in open(os.path.join(a, "metrics.jsonl"))]
    total = sum(r["train/ce"] * 2 * 64 for r in hist)  # 2 steps of 64 an epoch
    assert float(sa["recipe_state"]["counting"]["loss_sum"]) == pytest.approx(total, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# 5. heads declared once per run, trained in one stage, frozen in the next, loaded by a later run
# ---------------------------------------------------------------------------------------------


class Probe(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(x)


def probe_recipe(freeze_probe: bool = False, freeze_student: bool = False):
    """CE of the student plus CE of a linear probe on the student's embedding (one head, ``probe``,
    declared by both stages)."""
    probe = Probe()

    def init_aux(rng, s_feats, t_feats):
        return {"params": {"probe": probe.init(rng, jnp.zeros((1, s_feats["embedding"].shape[-1])))["params"]}}

    def loss(inp):
        ce = losses.cross_entropy(inp.student_logits, inp.labels)
        probe_logits = probe.apply(aux_variables(inp.aux_params, inp.aux_state, "probe"),
                                   jax.lax.stop_gradient(inp.student_features["embedding"]))
        probe_ce = losses.cross_entropy(probe_logits, inp.labels)
        return ce + probe_ce, {"ce": ce, "probe_ce": probe_ce}
    frozen = (("aux/probe",) if freeze_probe else ()) + (("student",) if freeze_student else ())
    return Recipe(name="probe", loss=loss, init_aux=init_aux, frozen=frozen)


register_recipe("probe", probe_recipe)

TWO_STAGES = [{"name": "train_probe", "num_epochs": 1, "method": {"name": "probe", "freeze_student": True}},
              {"name": "use_probe", "num_epochs": 1, "method": {"name": "probe", "freeze_probe": True}}]


def test_a_head_is_declared_once_trained_then_frozen_and_loaded_by_a_later_run(tmp_path, data_dir):
    cfg = tiny_digits_config(**{"stages": TWO_STAGES, "train.checkpoint_every_steps": 1})
    wd = str(tmp_path / "two")
    train_and_evaluate(cfg, wd, stop_after_steps=1)
    s1 = ckpt_lib.load_run_state(wd)[1]
    train_and_evaluate(cfg, wd, stop_after_steps=2)
    s2 = ckpt_lib.load_run_state(wd)[1]
    train_and_evaluate(cfg, wd)
    s4 = ckpt_lib.load_run_state(wd)[1]
    # stage 1 trains the probe only, stage 2 the student only
    jax.tree.map(np.testing.assert_array_equal, s1["params"]["student"], s2["params"]["student"])
    assert not np.array_equal(s1["params"]["aux"]["probe"]["Dense_0"]["kernel"],
                              s2["params"]["aux"]["probe"]["Dense_0"]["kernel"])
    jax.tree.map(np.testing.assert_array_equal, s2["params"]["aux"]["probe"], s4["params"]["aux"]["probe"])
    assert not np.array_equal(s2["params"]["student"]["fc"]["kernel"], s4["params"]["student"]["fc"]["kernel"])
    assert s1["params"]["aux"].keys() == {"probe"}  # one module for both stages
    # a later run loads the trained probe from that work dir (its newest run checkpoint)
    later = tiny_digits_config(**{"method": {"name": "probe", "freeze_probe": True}, "aux_init_from": {"probe": wd},
                                  "train.checkpoint_every_steps": 1})
    wd2 = str(tmp_path / "later")
    train_and_evaluate(later, wd2, stop_after_steps=1)
    jax.tree.map(np.testing.assert_array_equal, s4["params"]["aux"]["probe"],
                 ckpt_lib.load_run_state(wd2)[1]["params"]["aux"]["probe"])
    from jaxkd.errors import ConfigError
    with pytest.raises(ConfigError, match="no auxiliary module 'prob'"):
        train_and_evaluate(tiny_digits_config(**{"method": {"name": "probe"}, "aux_init_from": {"prob": wd}}),
                           str(tmp_path / "bad"))


def test_a_module_declared_twice_with_other_shapes_is_refused():
    def head(width):
        def init_aux(rng, s_feats, t_feats):
            return {"params": {"head": nn.Dense(width).init(rng, jnp.zeros((1, 4)))["params"]}}
        return Recipe(name=f"w{width}", loss=None, init_aux=init_aux)
    student = models.create_model("mlp", 10, hidden=(4,))
    with pytest.raises(ValueError, match="'head' is declared again by method 'w3' with other shapes"):
        step_lib.create_train_state(jax.random.PRNGKey(0), student, [head(2), head(3)], optax.sgd(0.1),
                                    jnp.zeros((1, 8, 8, 1)))
    state = step_lib.create_train_state(jax.random.PRNGKey(0), student, [head(2), head(2)], optax.sgd(0.1),
                                        jnp.zeros((1, 8, 8, 1)))
    assert list(state.params["aux"]) == ["head"]


# ---------------------------------------------------------------------------------------------
# 6. batch statistics from extra student forwards
# ---------------------------------------------------------------------------------------------


def extra_forward_recipe(keep_stats: bool):
    """CE on the batch plus CE on the mirrored batch, a second student forward."""
    def loss(inp):
        ce = losses.cross_entropy(inp.student_logits, inp.labels)
        out = inp.student_apply(inp.inputs[:, :, ::-1], update_state=keep_stats)
        ce2 = losses.cross_entropy(out[0], inp.labels)
        return LossOutput(per_example=ce + ce2, parts={"ce": ce}, student_state=out[2] if keep_stats else None)
    return Recipe(name="extra", loss=loss)


def test_extra_forward_updates_batch_statistics_when_the_recipe_keeps_them():
    student = models.create_model("cnn", 10, width=4, hidden=8)
    sample = jnp.zeros((1, 8, 8, 1))
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 255, (16, 8, 8, 1), dtype=np.uint8)),
             "label": jnp.asarray(rng.integers(0, 10, 16).astype(np.int32))}
    pipeline = step_lib.InputPipeline((0.5,), (0.25,))
    x = pipeline.normalize(batch["image"])
    results = {}
    for keep in (False, True):
        recipe = extra_forward_recipe(keep)
        state = step_lib.create_train_state(jax.random.PRNGKey(0), student, recipe, optax.sgd(0.0), sample)
        step = step_lib.make_train_step(student, recipe, optax.sgd(0.0), pipeline, donate=False)
        results[keep] = step(state, None, batch)[0].model_state["student"]
    v0 = state.student_variables()
    _, _, once = student.apply(v0, x, train=True)
    _, _, twice = student.apply({"params": v0["params"], **once}, x[:, :, ::-1], train=True)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), results[False], once)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), results[True], twice)
    assert not np.allclose(once["batch_stats"]["bn1"]["mean"], twice["batch_stats"]["bn1"]["mean"])
