"""CRD: the NCE loss and the bank update against numpy, negatives from other classes only, one
step of the recipe recomputed in numpy, exact resume with banks and Z, 8 devices equal 1."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxkd import losses, models
from jaxkd.core import build_recipe
from jaxkd.methods.crd import negative_pool_sizes, sample_negatives
from jaxkd.train import checkpoint as ckpt_lib
from jaxkd.train import step as step_lib
from jaxkd.train.loop import train_and_evaluate

from _configs import tiny_digits_config


def np_normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_nce(p, n, eps=1e-7):
    k = p.shape[1] - 1
    kpn = k / n
    return -(np.log(p[:, 0] / (p[:, 0] + kpn + eps)) + np.log(kpn / (p[:, 1:] + kpn + eps)).sum(1))


def test_nce_loss_matches_numpy():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.01, 3.0, (5, 9))
    np.testing.assert_allclose(losses.crd_nce_loss(jnp.asarray(p, jnp.float32), 100), np_nce(p, 100), rtol=1e-5)
    # a hand case: K = 1, N = 2 (K Pn = 1/2), P_pos = 1/2, P_neg = 3/2
    want = -(np.log(0.5 / (1.0 + 1e-7)) + np.log(0.5 / (2.0 + 1e-7)))
    assert float(losses.crd_nce_loss(jnp.array([[0.5, 1.5]]), 2)[0]) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="K >= 1"):
        losses.crd_nce_loss(jnp.ones((3, 1)), 10)


def test_bank_momentum_update_by_hand_with_a_repeated_example():
    bank = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    index = jnp.array([0, 2, 0])
    new = jnp.array([[0.0, 1.0], [1.0, 0.0], [0.0, -1.0]])
    out = np.asarray(losses.momentum_update(bank, index, new, 0.5))
    # row 0: its last occurrence (new [0, -1]) from the old row: normalize(0.5 [1, 0] + 0.5 [0, -1])
    np.testing.assert_allclose(out[0], [np.sqrt(0.5), -np.sqrt(0.5)], rtol=1e-6)
    np.testing.assert_allclose(out[1], [0.0, 1.0])  # not in the batch: unchanged
    np.testing.assert_allclose(out[2], np_normalize(np.array([0.3 + 0.5, 0.4])), rtol=1e-6)


def _class_structure(labels, num_classes):
    counts = np.bincount(labels, minlength=num_classes)
    return (jnp.asarray(np.argsort(labels, kind="stable"), jnp.int32),
            jnp.asarray(np.concatenate([[0], np.cumsum(counts)[:-1]]), jnp.int32), jnp.asarray(counts, jnp.int32))


def test_negatives_come_from_other_classes_without_replacement_unless_the_pool_is_too_small():
    labels = np.array([0] * 3 + [1] * 5 + [2] * 12)  # pools: 17, 15, 8
    order, start, count = _class_structure(labels, 3)
    anchors = jnp.asarray(np.repeat([0, 1, 2], 40), jnp.int32)
    for k in (8, 12):
        neg = np.asarray(sample_negatives(jax.random.PRNGKey(k), anchors, order, start, count, jnp.asarray(labels), k))
        assert neg.shape == (120, k)
        assert np.all(labels[neg] != np.asarray(anchors)[:, None])  # never the anchor's own class
        for row, y in zip(neg, np.asarray(anchors)):
            pool = int((labels != y).sum())
            if pool >= k:
                assert len(set(row.tolist())) == k  # without replacement
        if k == 12:  # class 2's pool (8) is smaller than K: drawn with replacement, from all 8
            rows2 = neg[np.asarray(anchors) == 2]
            assert any(len(set(r.tolist())) < 12 for r in rows2)
            assert set(rows2.ravel().tolist()) == set(np.flatnonzero(labels != 2).tolist())
    # every member of the pool is drawn about equally often (K = 8 of 17 for class 0)
    neg = np.asarray(sample_negatives(jax.random.PRNGKey(0), jnp.zeros((4000,), jnp.int32), order, start, count,
                                      jnp.asarray(labels), 8))
    freq = np.bincount(neg.ravel(), minlength=20)[3:] / (4000 * 8 / 17)
    assert np.all(np.abs(freq - 1) < 0.1), freq
    np.testing.assert_array_equal(negative_pool_sizes(labels, 3), [17, 15, 8])


def _one_step(k=6, n=40, b=8):
    student, teacher = models.create_model("mlp", 10, hidden=(16,)), models.create_model("mlp", 10, hidden=(12,))
    sample = jnp.zeros((1, 8, 8, 1))
    rng = np.random.default_rng(1)
    train_labels = rng.integers(0, 10, n).astype(np.int32)
    t_vars = jax.jit(teacher.init)(jax.random.PRNGKey(1), sample)
    recipe = build_recipe({"name": "crd", "feat_dim": 4, "nce_k": k, "max_nce_k": None})
    state = step_lib.create_train_state(jax.random.PRNGKey(0), student, recipe, optax.sgd(0.0), sample,
                                        teacher=teacher, teacher_variables=t_vars, num_train=n,
                                        train_labels=train_labels, num_classes=10)
    index = np.array([3, 7, 7, 0, 12, 39, 5, 20], np.int32)[:b]
    batch = {"image": jnp.asarray(rng.integers(0, 255, (b, 8, 8, 1), dtype=np.uint8)),
             "label": jnp.asarray(train_labels[index]), "index": jnp.asarray(index)}
    pipeline = step_lib.InputPipeline((0.5,), (0.25,))
    step = step_lib.make_train_step(student, recipe, optax.sgd(0.0), pipeline, teacher=teacher, donate=False)
    new, m = step(state, t_vars, batch)
    return student, teacher, t_vars, state, new, m, batch, pipeline, train_labels


def test_one_crd_step_recomputed_in_numpy():
    student, teacher, t_vars, state, new, m, batch, pipeline, train_labels = _one_step()
    n, x = len(train_labels), pipeline.normalize(batch["image"])
    f_s = np.asarray(student.apply(state.student_variables(), x, train=True)[1]["embedding"], np.float64)
    f_t = np.asarray(teacher.apply(t_vars, x, train=False)[1]["embedding"], np.float64)
    aux = jax.tree.map(lambda a: np.asarray(a, np.float64), state.params["aux"])
    v_s = np_normalize(f_s @ aux["crd_embed_s"]["linear"]["kernel"] + aux["crd_embed_s"]["linear"]["bias"])
    v_t = np_normalize(f_t @ aux["crd_embed_t"]["linear"]["kernel"] + aux["crd_embed_t"]["linear"]["bias"])
    st = jax.tree.map(np.asarray, state.recipe_state["crd"])
    # the step's negatives: the same sampler with the step's loss key
    loss_rng = jax.random.split(jax.random.fold_in(state.rng, 0), 3)[2]
    idx = np.asarray(batch["index"])
    neg = np.asarray(sample_negatives(loss_rng, jnp.asarray(train_labels[idx]), st["class_order"], st["class_start"],
                                      st["class_count"], jnp.asarray(train_labels), 6))
    assert np.all(train_labels[neg] != train_labels[idx][:, None])
    rows = np.concatenate([idx[:, None], neg], 1)
    out_s = np.exp(np.einsum("bd,bkd->bk", v_s, st["bank_t"][rows].astype(np.float64)) / 0.07)
    out_t = np.exp(np.einsum("bd,bkd->bk", v_t, st["bank_s"][rows].astype(np.float64)) / 0.07)
    z_s, z_t = out_s.mean() * n, out_t.mean() * n  # fixed on this, the first batch
    nce_s, nce_t = np_nce(out_s / z_s, n), np_nce(out_t / z_t, n)
    ce = -np.log(np.exp(np.asarray(student.apply(state.student_variables(), x, train=True)[0], np.float64))
                 / np.exp(np.asarray(student.apply(state.student_variables(), x, train=True)[0], np.float64)).sum(
                     1, keepdims=True))[np.arange(8), np.asarray(batch["label"])]
    assert float(m["crd_s"]) == pytest.approx(nce_s.mean(), rel=2e-4)
    assert float(m["crd_t"]) == pytest.approx(nce_t.mean(), rel=2e-4)
    assert float(m["loss"]) == pytest.approx(np.mean(ce + 0.8 * (nce_s + nce_t)), rel=2e-4)
    got = jax.tree.map(np.asarray, new.recipe_state["crd"])
    assert got["z_s"] == pytest.approx(z_s, rel=2e-4) and got["z_t"] == pytest.approx(z_t, rel=2e-4)
    # banks: momentum 0.5 then renormalised, the repeated example 7 from its last occurrence
    want_s = st["bank_s"].astype(np.float64).copy()
    for i in range(8):
        want_s[idx[i]] = np_normalize(0.5 * st["bank_s"][idx[i]] + 0.5 * v_s[i])
    np.testing.assert_allclose(got["bank_s"], want_s, rtol=1e-4, atol=1e-6)
    untouched = np.setdiff1d(np.arange(n), idx)
    np.testing.assert_array_equal(got["bank_t"][untouched], st["bank_t"][untouched])
    assert np.abs(st["bank_s"]).max() <= 1 / np.sqrt(4 / 3) + 1e-6  # the reference's uniform init


def test_crd_trains_and_resumes_exactly_with_banks_and_z_in_the_checkpoint(tmp_path, data_dir, digits_teacher):
    cfg = tiny_digits_config(**{"teacher.workdir": digits_teacher[0], "teacher.kwargs": {"width": 32},
                                "method": {"name": "crd", "alpha": 1.0, "feat_dim": 16, "nce_k": 64},
                                "train.num_epochs": 2, "train.checkpoint_every_steps": 1})
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train_and_evaluate(cfg, a)
    train_and_evaluate(cfg, b, stop_after_steps=1)
    first = ckpt_lib.load_run_state(b)[1]["recipe_state"]["crd"]
    assert first["z_s"] > 0 and first["z_t"] > 0 and first["k_slots"].shape == (64,)
    train_and_evaluate(cfg, b)
    sa, sb = ckpt_lib.load_run_state(a)[1], ckpt_lib.load_run_state(b)[1]
    jax.tree.map(np.testing.assert_array_equal, sa, sb)
    crd = sa["recipe_state"]["crd"]
    assert crd["z_s"] == first["z_s"] and crd["z_t"] == first["z_t"]  # Z stays as the first batch set it
    np.testing.assert_allclose(np.linalg.norm(crd["bank_s"], axis=1), 1.0, rtol=1e-5)  # every row updated
    rec = [json.loads(ln) for ln in open(os.path.join(a, "metrics.jsonl"))][-1]
    assert rec["train/loss"] == pytest.approx(rec["train/ce"] + rec["train/kd"]
                                              + 0.8 * (rec["train/crd_s"] + rec["train/crd_t"]), rel=1e-5)


def test_k_is_capped_at_the_smallest_other_class_pool_by_default():
    labels = np.array([0] * 30 + [1] * 10)
    recipe = build_recipe({"name": "crd", "nce_k": 16384})
    from jaxkd.core import RecipeContext
    ctx = RecipeContext(num_train=40, num_classes=2, train_labels=labels, student_features={},
                        teacher_features={}, rng=jax.random.PRNGKey(0))
    assert recipe.init_state(ctx)["k_slots"].shape == (10,)  # class 0's pool
    capped = build_recipe({"name": "crd", "nce_k": 16384, "max_nce_k": 5}).init_state(ctx)
    uncapped = build_recipe({"name": "crd", "nce_k": 50, "max_nce_k": None}).init_state(ctx)
    assert capped["k_slots"].shape == (5,) and uncapped["k_slots"].shape == (50,)


def eight_devices_crd(ctx):
    """(In the 8-device child, tests/_eight_devices.py) three CRD steps on 1 device and on 8."""
    out = {}
    for n in (1, 8):
        mesh = step_lib.make_mesh(n)
        student, teacher = models.create_model("mlp", 10, hidden=(16,)), models.create_model("mlp", 10, hidden=(12,))
        sample = jnp.zeros((1, 8, 8, 1))
        t_vars = jax.jit(teacher.init)(jax.random.PRNGKey(1), sample)
        rng = np.random.default_rng(1)
        labels = rng.integers(0, 10, 64).astype(np.int32)
        recipe = build_recipe({"name": "crd", "feat_dim": 8, "nce_k": 16, "alpha": 1.0})
        tx = optax.sgd(0.1, momentum=0.9)
        state = step_lib.create_train_state(jax.random.PRNGKey(0), student, recipe, tx, sample, teacher=teacher,
                                            teacher_variables=t_vars, num_train=64, train_labels=labels,
                                            num_classes=10)
        state = jax.device_put(state, step_lib.replicated(mesh))
        step = step_lib.make_train_step(student, recipe, tx, step_lib.InputPipeline((0.5,), (0.25,)),
                                        teacher=teacher, mesh=mesh)
        metrics = []
        for i in range(3):
            index = rng.permutation(64)[:32].astype(np.int32)
            batch = {"image": rng.integers(0, 255, (32, 8, 8, 1), dtype=np.uint8), "label": labels[index],
                     "index": index}
            state, m = step(state, t_vars, step_lib.shard_batch(batch, mesh))
            metrics.append({k: float(v) for k, v in m.items()})
        out[n] = {"metrics": metrics, "bank_s": np.asarray(state.recipe_state["crd"]["bank_s"]).ravel().tolist(),
                  "z": [float(state.recipe_state["crd"]["z_s"]), float(state.recipe_state["crd"]["z_t"])]}
    return out


def test_crd_on_eight_devices_equals_one(eight_devices):
    out = eight_devices("test_crd:eight_devices_crd")
    for a, b in zip(out["1"]["metrics"], out["8"]["metrics"]):
        for key in ("loss", "crd_s", "crd_t", "kd"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    np.testing.assert_allclose(out["1"]["z"], out["8"]["z"], rtol=1e-5)
    np.testing.assert_allclose(out["1"]["bank_s"], out["8"]["bank_s"], rtol=1e-4, atol=1e-6)
