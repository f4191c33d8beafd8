"""The ``tinybert`` and ``minilm`` recipes (jaxkd.methods.transformer_kd).

Each recipe's loss on the taps of real tiny transformers (token models with padding) is checked
against numpy formulas written out here, with the official code's list indexing for the layer
map; then a two-stage TinyBERT run on digits read as 8 row tokens (its projection frozen in the
prediction stage, exact resume in the middle of each stage) and 8 devices against 1.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _configs import tiny_digits_config

from jaxkd import models
from jaxkd.core import LossInputs, build_recipe
from jaxkd.errors import ConfigError
from jaxkd.methods.transformer_kd import FIT_MODULE, tinybert_stages
from jaxkd.train import checkpoint as ckpt_lib
from jaxkd.train import step as step_lib
from jaxkd.train.loop import train_and_evaluate

VOCAB, PAD = 20, 0


def token_model(layers, dim, heads, pool="cls"):
    return models.create_model("transformer", 5, num_layers=layers, dim=dim, num_heads=heads, vocab_size=VOCAB,
                               max_len=12, pool=pool)


def padded_ids():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, (3, 7)).astype(np.int32)
    ids[0, 5:] = PAD
    ids[1, 2:] = PAD
    return jnp.asarray(ids)


def random_variables(fns, x, seed):
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(fns.init, jax.random.key(0), x)
    return jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype), shapes)


@functools.cache
def tap_pair(s_shape=(2, 8, 2), t_shape=(4, 16, 2), pool="cls"):
    """Taps (float64 numpy and jnp) of a student and a teacher token model on padded ids."""
    ids = padded_ids()
    out = []
    for seed, shape in ((1, s_shape), (2, t_shape)):
        fns = token_model(*shape, pool=pool)
        logits, feats = jax.jit(lambda v, x, f=fns: f.apply(v, x, False)[:2])(random_variables(fns, ids, seed), ids)
        out.append((logits, feats))
    return out


def loss_inputs(student, teacher, aux_params=None, labels=(1, 2, 3)):
    return LossInputs(student_logits=student[0], student_features=student[1], teacher_logits=teacher[0],
                      teacher_features=teacher[1], labels=jnp.asarray(labels), step=jnp.int32(0),
                      aux_params=aux_params or {}, rng=jax.random.key(0), stage_step=jnp.int32(0),
                      stage_progress=jnp.float32(0.0))


def f64(tree):
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- TinyBERT

def np_intermediate(s, t, w, b, teacher_atts_idx, teacher_reps_idx, mode):
    """The official ``att_loss + rep_loss`` per example: ``student_atts[i]`` against
    ``teacher_atts[teacher_atts_idx[i]]``, ``student_reps[i]`` (``[embeddings, hidden_0, ...]``,
    projected by ``h @ w + b``) against ``teacher_reps[teacher_reps_idx[i]]``."""
    m = s["token_mask"]
    n_s = sum(1 for k in s if k.endswith("/attn_scores"))
    n_t = sum(1 for k in t if k.endswith("/attn_scores"))
    s_atts = [s[f"layer{i}/attn_scores"] for i in range(n_s)]
    t_atts = [t[f"layer{i}/attn_scores"] for i in range(n_t)]
    s_reps = [s["embeddings"]] + [s[f"layer{i}/hidden"] for i in range(n_s)]
    t_reps = [t["embeddings"]] + [t[f"layer{i}/hidden"] for i in range(n_t)]
    att = np.zeros(m.shape[0])
    rep = np.zeros(m.shape[0])
    for i in range(n_s):
        a_s, a_t = s_atts[i], t_atts[teacher_atts_idx[i]]
        if mode == "reference":  # torch.where(att <= -1e2, 0, att), then MSELoss over all entries
            a_s, a_t = np.where(a_s <= -100, 0, a_s), np.where(a_t <= -100, 0, a_t)
            att += ((a_s - a_t) ** 2).mean(axis=(1, 2, 3))
        else:
            for e in range(m.shape[0]):
                real = m[e] > 0
                d = (a_s[e] - a_t[e])[:, real][:, :, real]
                att[e] += (d ** 2).mean()
    for i in range(n_s + 1):
        h_s, h_t = s_reps[i] @ w + b, t_reps[teacher_reps_idx[i]]
        if mode == "reference":
            rep += ((h_s - h_t) ** 2).mean(axis=(1, 2))
        else:
            for e in range(m.shape[0]):
                real = m[e] > 0
                rep[e] += ((h_s[e, real] - h_t[e, real]) ** 2).mean()
    return att, rep


@pytest.mark.parametrize("mode", ["masked", "reference"])
def test_tinybert_intermediate_matches_the_official_indexing_in_numpy(mode):
    student, teacher = tap_pair()
    recipe = build_recipe({"name": "tinybert", "mode": mode})
    aux = recipe.init_aux(jax.random.key(3), student[1], teacher[1])
    assert list(aux["params"]) == [FIT_MODULE]  # ONE projection for the embeddings and every layer
    kernel = np.asarray(aux["params"][FIT_MODULE]["kernel"], np.float64)
    bias = np.asarray(aux["params"][FIT_MODULE]["bias"], np.float64) + 0.1
    aux_params = {FIT_MODULE: {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}}
    assert kernel.shape == (8, 16)
    out = recipe.loss(loss_inputs(student, teacher, aux_params))
    # task_distill.py: k = N / M, teacher_atts[i * k + k - 1], teacher_reps[i * k] (reps[0]: embeddings)
    k = 4 // 2
    att, rep = np_intermediate(f64(student[1]), f64(teacher[1]), kernel, bias,
                               [i * k + k - 1 for i in range(2)], [i * k for i in range(3)], mode)
    np.testing.assert_allclose(out.parts["tinybert_att"], att, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(out.parts["tinybert_rep"], rep, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(out.per_example, att + rep, rtol=2e-4, atol=1e-6)
    assert "ce" not in out.parts  # the official intermediate stage has no hard-label term


def test_tinybert_explicit_layer_map_and_switches():
    student, teacher = tap_pair()
    recipe = build_recipe({"name": "tinybert", "layer_map": [0, 2], "embeddings": False, "gamma": 0.5})
    aux = recipe.init_aux(jax.random.key(3), student[1], teacher[1])
    out = recipe.loss(loss_inputs(student, teacher, aux["params"]))
    p = aux["params"][FIT_MODULE]
    kernel, bias = np.asarray(p["kernel"], np.float64), np.asarray(p["bias"], np.float64)
    s, t = f64(student[1]), f64(teacher[1])
    att, rep_all = np_intermediate(s, t, kernel, bias, [0, 2], [0, 1, 3], "masked")
    m = s["token_mask"]
    emb = np.array([((s["embeddings"][e] @ kernel + bias - t["embeddings"][e])[m[e] > 0] ** 2).mean()
                    for e in range(3)])
    logits = np.asarray(student[0], np.float64)
    ce = -np.log(np_softmax(logits)[np.arange(3), [1, 2, 3]])
    np.testing.assert_allclose(out.parts["tinybert_att"], att, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(out.parts["tinybert_rep"], rep_all - emb, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(out.per_example, att + rep_all - emb + 0.5 * ce, rtol=2e-4, atol=1e-6)


def test_tinybert_prediction_stage_matches_numpy():
    student, teacher = tap_pair()
    s, t = np.asarray(student[0], np.float64), np.asarray(teacher[0], np.float64)
    for opts, scale in (({}, 1 / 5), ({"prediction_mode": "soft_ce"}, 1.0)):
        recipe = build_recipe({"name": "tinybert", "stage": "prediction", "temperature": 2.0, **opts})
        out = recipe.loss(loss_inputs(student, teacher))
        # soft_cross_entropy(s / T, t / T) = (-softmax(t / T) * log_softmax(s / T)).mean() over classes too
        want = -(np_softmax(t / 2) * np.log(np_softmax(s / 2))).sum(-1) * scale
        np.testing.assert_allclose(out.per_example, want, rtol=1e-5)
        assert recipe.teacher_logits_only and recipe.teacher_temperature == 2.0
        assert recipe.init_aux is None and recipe.frozen == (f"aux/{FIT_MODULE}",)
        assert not recipe.trains(f"aux/{FIT_MODULE}/kernel") and recipe.trains("student/head/kernel")


def test_tinybert_stages_helper():
    stages = tinybert_stages(2, 3, mode="reference", temperature=2.0, layer_map=[1, 3],
                             prediction_optim={"lr": 0.01})
    assert [s["method"]["stage"] for s in stages] == ["intermediate", "prediction"]
    assert stages[0]["method"] == {"name": "tinybert", "stage": "intermediate", "mode": "reference",
                                   "layer_map": [1, 3]}
    assert stages[1]["method"] == {"name": "tinybert", "stage": "prediction", "temperature": 2.0}
    assert stages[1]["optim"] == {"lr": 0.01} and "optim" not in stages[0]
    for s in stages:
        build_recipe(s["method"])


def test_study_budget_from_the_environment(monkeypatch):
    """experiments/configs/fashion_vit.py: 10 epochs (3 intermediate) by default; JAXKD_VIT_EPOCHS /
    JAXKD_VIT_INTERMEDIATE set the budget of every preset (the study's full-data part runs 2 / 1)."""
    from jaxkd.config import load_config
    from jaxkd.experiment import preset_config
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs", "fashion_vit.py")
    for env, (epochs, first, rest) in (({}, (10, 3, 7)), ({"JAXKD_VIT_EPOCHS": "2", "JAXKD_VIT_INTERMEDIATE": "1"}, (2, 1, 1)),
                                       ({"JAXKD_VIT_EPOCHS": "12"}, (12, 3, 9))):
        for name in ("JAXKD_VIT_EPOCHS", "JAXKD_VIT_INTERMEDIATE"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        c = load_config(path)
        assert c.train.num_epochs == epochs and not preset_config(c, "kd").get("stages")
        for preset, methods in (("tinybert", ("tinybert", "tinybert")), ("minilm", ("minilm", "ce"))):
            stages = preset_config(c, preset).stages
            assert [(s["method"]["name"], s["num_epochs"]) for s in stages] == list(zip(methods, (first, rest)))
    # the MNIST-1D config builds on the same pair at its own budget, whatever the variables say
    mnist1d = load_config(path.replace("fashion_vit.py", "mnist1d_transformer.py"))
    assert mnist1d.train.num_epochs == 30
    assert [s["num_epochs"] for s in preset_config(mnist1d, "minilm").stages] == [10, 20]
    monkeypatch.setenv("JAXKD_VIT_EPOCHS", "2")
    monkeypatch.setenv("JAXKD_VIT_INTERMEDIATE", "2")
    with pytest.raises(ValueError, match="intermediate=2 epochs must lie between 0 and epochs=2"):
        load_config(path)
    load_config(path.replace("fashion_vit.py", "mnist1d_transformer.py"))  # not its variables
    monkeypatch.setenv("JAXKD_VIT_EPOCHS", "ten")
    with pytest.raises(ValueError, match="JAXKD_VIT_EPOCHS='ten' must be a whole number"):
        load_config(path)


# ----------------------------------------------------------------------------- MiniLM

def np_kl_rows(p_t, p_s, m):
    """Per example: mean over heads and real query rows of KL(p_t || p_s) over real keys."""
    out = []
    for e in range(m.shape[0]):
        real = m[e] > 0
        pt, ps = p_t[e][:, real][:, :, real], p_s[e][:, real][:, :, real]
        out.append((pt * (np.log(pt) - np.log(ps))).sum(-1).mean())
    return np.array(out)


def np_relation(x, y, m, heads):
    """softmax over real keys of X_r Y_r^T / sqrt(d_r), relation heads from the concatenated width."""
    b, h, length, d = x.shape
    split = lambda a: a.transpose(0, 2, 1, 3).reshape(b, length, h * d).reshape(
        b, length, heads, h * d // heads).transpose(0, 2, 1, 3)
    xs, ys = split(x), split(y)
    logits = np.einsum("brid,brjd->brij", xs, ys) / np.sqrt(xs.shape[-1])
    logits = np.where(m[:, None, None, :] > 0, logits, -np.inf)
    return np_softmax(logits)


def test_minilm_v1_matches_numpy_on_the_last_layers():
    student, teacher = tap_pair(s_shape=(2, 8, 2), t_shape=(3, 16, 2))
    s, t = f64(student[1]), f64(teacher[1])
    m = s["token_mask"]
    out = build_recipe({"name": "minilm", "beta": 2.0}).loss(loss_inputs(student, teacher))
    at = np_kl_rows(t["layer2/attn_probs"], s["layer1/attn_probs"], m)
    vr = np_kl_rows(np_relation(t["layer2/v"], t["layer2/v"], m, 2), np_relation(s["layer1/v"], s["layer1/v"], m, 2), m)
    np.testing.assert_allclose(out.parts["minilm_at"], at, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(out.parts["minilm_vr"], vr, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(out.per_example, 2.0 * (at + vr), rtol=2e-4, atol=1e-6)
    # other layers, and CE + KD switched on
    out = build_recipe({"name": "minilm", "student_layer": 0, "teacher_layer": -2, "gamma": 1.0,
                        "alpha": 0.5, "temperature": 2.0}).loss(loss_inputs(student, teacher))
    at = np_kl_rows(t["layer1/attn_probs"], s["layer0/attn_probs"], m)
    np.testing.assert_allclose(out.parts["minilm_at"], at, rtol=2e-4, atol=1e-6)
    assert set(out.parts) == {"ce", "kd", "minilm_at", "minilm_vr"}


def test_minilm_v2_relations_with_different_head_counts():
    student, teacher = tap_pair(s_shape=(2, 8, 2), t_shape=(2, 16, 4))  # 2 vs 4 heads: v2 does not care
    s, t = f64(student[1]), f64(teacher[1])
    m = s["token_mask"]
    out = build_recipe({"name": "minilm", "version": "v2", "num_relation_heads": 4}).loss(
        loss_inputs(student, teacher))
    want = sum(np_kl_rows(np_relation(t[f"layer1/{x}"], t[f"layer1/{x}"], m, 4),
                          np_relation(s[f"layer1/{x}"], s[f"layer1/{x}"], m, 4), m) for x in "qkv")
    np.testing.assert_allclose(out.per_example, want, rtol=2e-4, atol=1e-6)


# ----------------------------------------------------------------------------- errors

def test_recipe_errors_are_one_line():
    student, teacher = tap_pair(s_shape=(2, 8, 2), t_shape=(3, 16, 2))
    with pytest.raises(ValueError, match="divisible"):  # uniform map: 3 teacher layers, 2 student layers
        build_recipe({"name": "tinybert"}).init_aux(jax.random.key(0), student[1], teacher[1])
    with pytest.raises(ValueError, match=r"teacher layers in \[0, 3\)"):
        build_recipe({"name": "tinybert", "layer_map": [0, 3]}).init_aux(jax.random.key(0), student[1], teacher[1])
    with pytest.raises(ValueError, match="one teacher layer per student layer"):
        build_recipe({"name": "tinybert", "layer_map": [0]}).init_aux(jax.random.key(0), student[1], teacher[1])
    mean_pool = tap_pair(s_shape=(2, 8, 2), t_shape=(2, 16, 2), pool="mean")[1]  # 7 tokens, not 8
    with pytest.raises(ValueError, match="same tokens"):
        build_recipe({"name": "minilm"}).loss(loss_inputs(student, mean_pool))
    with pytest.raises(ValueError, match="no transformer taps"):
        build_recipe({"name": "minilm"}).loss(loss_inputs(student, (teacher[0], {"embeddings": teacher[1]["embeddings"],
                                                                                 "logits": teacher[0]})))
    with pytest.raises(ValueError, match=r"student_layer must be an int in \[-2, 2\)"):
        build_recipe({"name": "minilm", "student_layer": 2}).loss(loss_inputs(student, teacher))
    for method, match in (({"name": "tinybert", "stage": "final"}, "stage must be one of"),
                          ({"name": "tinybert", "mode": "mean"}, "mode must be one of"),
                          ({"name": "tinybert", "prediction_mode": "kl"}, "prediction_mode must be one of"),
                          ({"name": "tinybert", "temperature": 0}, "temperature must be > 0"),
                          ({"name": "minilm", "version": "v3"}, "version must be"),
                          ({"name": "minilm", "beta": -1.0}, "beta must be >= 0")):
        with pytest.raises(ConfigError, match=match):
            build_recipe(method)


# ----------------------------------------------------------------------------- runs

ROW_TOKENS = {"num_layers": 2, "dim": 16, "num_heads": 4, "patch_size": (1, 8)}  # digits: 8 row tokens + [CLS]
STUDENT = {"num_layers": 1, "dim": 8, "num_heads": 4, "patch_size": (1, 8)}


def transformer_digits_config(**over):
    cfg = {"model.name": "transformer", "model.kwargs": STUDENT, "teacher.name": "transformer",
           "teacher.kwargs": ROW_TOKENS, "optim.name": "adamw", "optim.lr": 3e-3, "optim.weight_decay": 0.0,
           "optim.schedule": "constant", "data.batch_size": 32}
    cfg.update(over)
    return tiny_digits_config(**cfg)


@pytest.fixture(scope="module")
def row_teacher(tmp_path_factory, data_dir):
    wd = str(tmp_path_factory.mktemp("row_teacher") / "teacher")
    train_and_evaluate(transformer_digits_config(**{"model.kwargs": ROW_TOKENS, "method": {"name": "ce"},
                                                    "train.num_epochs": 1}), wd)
    return wd


def test_tinybert_two_stages_end_to_end_projection_frozen_in_stage_two(tmp_path, row_teacher):
    cfg = transformer_digits_config(**{"teacher.workdir": row_teacher, "stages": tinybert_stages(1, 1)})
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    summary = train_and_evaluate(cfg, a)
    assert summary["steps"] == 8 and np.isfinite(summary["last_accuracy"])
    train_and_evaluate(cfg, b, stop_after_steps=4)  # the end of the intermediate stage
    end1, end2 = ckpt_lib.load_run_state(b)[1], ckpt_lib.load_run_state(a)[1]
    init = jax.tree.map(np.asarray, step_lib.create_train_state(
        jax.random.PRNGKey(cfg.seed), models.create_model("transformer", 10, **STUDENT),
        [build_recipe(s["method"]) for s in cfg.stages], optax.sgd(0.0), jnp.zeros((1, 8, 8, 1)),
        teacher=models.create_model("transformer", 10, **ROW_TOKENS),
        teacher_variables=jax.jit(models.create_model("transformer", 10, **ROW_TOKENS).init)(
            jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))).params["aux"][FIT_MODULE])
    fit1, fit2 = end1["params"]["aux"][FIT_MODULE], end2["params"]["aux"][FIT_MODULE]
    assert not np.array_equal(fit1["kernel"], init["kernel"])  # trained in stage 1
    jax.tree.map(np.testing.assert_array_equal, fit1, fit2)  # frozen in stage 2, bit for bit
    assert not np.array_equal(end1["params"]["student"]["head"]["kernel"], end2["params"]["student"]["head"]["kernel"])
    with open(os.path.join(a, "metrics.jsonl")) as f:
        train = [r for r in map(json.loads, f) if "train/loss" in r]
    assert any("train/tinybert_att" in r for r in train) and any("train/tinybert_pred" in r for r in train)


@pytest.mark.slow
def test_tinybert_resumes_exactly_in_the_middle_of_each_stage(tmp_path, row_teacher):
    cfg = transformer_digits_config(**{"teacher.workdir": row_teacher, "stages": tinybert_stages(2, 2),
                                       "train.checkpoint_every_steps": 1})
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train_and_evaluate(cfg, a)
    train_and_evaluate(cfg, b, stop_after_steps=5)  # mid intermediate stage (steps 0-7)
    train_and_evaluate(cfg, b, stop_after_steps=11)  # mid prediction stage (steps 8-15)
    train_and_evaluate(cfg, b)
    jax.tree.map(np.testing.assert_array_equal, ckpt_lib.load_run_state(a)[1], ckpt_lib.load_run_state(b)[1])


@pytest.mark.slow
def test_minilm_end_to_end(tmp_path, row_teacher):
    cfg = transformer_digits_config(**{"teacher.workdir": row_teacher, "stages": [
        {"name": "minilm", "num_epochs": 1, "method": {"name": "minilm"}},
        {"name": "finetune", "num_epochs": 1, "method": {"name": "ce"}}]})
    summary = train_and_evaluate(cfg, str(tmp_path / "m"))
    assert summary["steps"] == 8 and np.isfinite(summary["last_accuracy"])
    with open(os.path.join(str(tmp_path / "m"), "metrics.jsonl")) as f:
        recs = [json.loads(ln) for ln in f]
    assert any(r.get("train/minilm_at", 0) > 0 for r in recs)


# ----------------------------------------------------------------------------- 8 devices

def eight_devices_transformer_kd(ctx):
    """(In the 8-device child, tests/_eight_devices.py) two steps each of TinyBERT's intermediate
    stage and MiniLM v1 on 8x8 images read as 8 row tokens, on 1 device and on 8. (Token ids do not
    pass the step's default normalisation, which makes every input float32; the masked losses are
    checked above.)"""
    out = {}
    student = models.create_model("transformer", 10, num_layers=2, dim=8, num_heads=2, patch_size=(1, 8))
    teacher = models.create_model("transformer", 10, num_layers=4, dim=16, num_heads=2, patch_size=(1, 8))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (16, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, 16).astype(np.int32)
    sample = jnp.zeros((1, 8, 8, 1))
    t_vars = random_variables(teacher, sample, 2)
    for n in (1, 8):
        mesh = step_lib.make_mesh(n)
        for method in ({"name": "tinybert"}, {"name": "minilm", "gamma": 1.0}):
            recipe = build_recipe(method)
            tx = optax.sgd(0.05, momentum=0.9)
            state = step_lib.create_train_state(jax.random.PRNGKey(0), student, recipe, tx, sample,
                                                teacher=teacher, teacher_variables=t_vars)
            state = jax.device_put(state, step_lib.replicated(mesh))
            step = step_lib.make_train_step(student, recipe, tx, step_lib.InputPipeline((0.5,), (0.25,)),
                                            teacher=teacher, mesh=mesh)
            metrics = []
            for _ in range(2):
                batch = {"image": images, "label": labels, "index": np.arange(16, dtype=np.int32)}
                state, m = step(state, jax.device_put(t_vars, step_lib.replicated(mesh)),
                                step_lib.shard_batch(batch, mesh))
                metrics.append({k: float(v) for k, v in m.items()})
            out[f"{method['name']}{n}"] = {"metrics": metrics, "params": [
                float(np.abs(np.asarray(x, np.float64)).sum()) for x in jax.tree.leaves(state.params)]}
    return out


def test_transformer_kd_on_eight_devices_equals_one(eight_devices):
    out = eight_devices("test_transformer_kd:eight_devices_transformer_kd")
    for name, keys in (("tinybert", ("loss", "tinybert_att", "tinybert_rep")),
                       ("minilm", ("loss", "ce", "minilm_at", "minilm_vr"))):
        one, eight = out[f"{name}1"], out[f"{name}8"]
        for a, b in zip(one["metrics"], eight["metrics"]):
            for key in keys:
                assert a[key] == pytest.approx(b[key], rel=1e-5), (name, key)
        np.testing.assert_allclose(one["params"], eight["params"], rtol=1e-5, atol=1e-6)  # (|sum| of each leaf)
