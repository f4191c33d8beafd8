"""SSKD: the 4xB views against np.rot90, the filtering against a hand-worked case, the similarity
matrix's diagonal, every loss term of one step recomputed in numpy (labelled, unlabelled, teacher
pre-stage), the pre-stage trains only the teacher head, exact resume in either stage, a later run
loading the head, 8 devices equal 1."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxkd import models
from jaxkd.core import build_recipe
from jaxkd.errors import ConfigError
from jaxkd.methods import sskd
from jaxkd.train import checkpoint as ckpt_lib
from jaxkd.train import step as step_lib
from jaxkd.train.loop import train_and_evaluate

from _configs import tiny_digits_config

PIPELINE = step_lib.InputPipeline((0.5,), (0.25,))


# ---------------------------------------------------------------------------------------------
# numpy references
# ---------------------------------------------------------------------------------------------


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl_rows(s, t, temp):
    """T^2 KL(softmax(t/T) || softmax(s/T)) per row."""
    lt, ls = np_log_softmax(t / temp), np_log_softmax(s / temp)
    return temp ** 2 * (np.exp(lt) * (lt - ls)).sum(-1)


def np_ce_rows(z, y):
    return -np_log_softmax(z)[np.arange(len(y)), y]


def np_rank(scores, target):
    """Position of the target in each row sorted in descending order (stable: lower column first)."""
    return np.array([int(np.flatnonzero(np.argsort(-row, kind="stable") == y)[0]) for row, y in zip(scores, target)])


def np_keep(rank, ratio):
    wrong = int((rank != 0).sum())
    n_keep = len(rank) - wrong + int(ratio * wrong)
    order = np.lexsort((np.arange(len(rank)), rank))  # by rank, then row index
    keep = np.zeros(len(rank), bool)
    keep[order[:n_keep]] = True
    return keep


def np_cos(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def np_head(p, x):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    h = np.maximum(x @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0.0)
    return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def np_split(x):
    """(rotated rows, original rows) of an interleaved [4B, ...] array, numpy's way."""
    idx = np.arange(len(x))
    return x[idx % 4 != 0], x[idx % 4 == 0]


# ---------------------------------------------------------------------------------------------
# views, filtering, similarity
# ---------------------------------------------------------------------------------------------


def test_views_are_flipped_rotated_and_cropped_per_view_interleaved_4i_plus_k():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 6, 6, 2)).astype(np.uint8)  # asymmetric, two channels
    flips = np.array([False, True, False])
    pad = 2
    offsets = rng.integers(0, 2 * pad + 1, (3, 4, 2)).astype(np.int32)
    got = np.asarray(sskd.make_views(jnp.asarray(images), jnp.asarray(flips), jnp.asarray(offsets), pad))
    assert got.shape == (12, 6, 6, 2)
    for i in range(3):
        img = images[i][:, ::-1] if flips[i] else images[i]
        for k in range(4):
            padded = np.pad(np.rot90(img, k), ((pad, pad), (pad, pad), (0, 0)))
            r, c = offsets[i, k]
            np.testing.assert_array_equal(got[4 * i + k], padded[r:r + 6, c:c + 6])
    # without padding the views are exactly np.rot90 of the (mirrored) image
    plain = np.asarray(sskd.make_views(jnp.asarray(images), jnp.asarray(flips), jnp.zeros((3, 4, 2), jnp.int32), 0))
    np.testing.assert_array_equal(plain[5], np.rot90(images[1][:, ::-1], 1))
    np.testing.assert_array_equal(plain[10], np.rot90(images[2], 2))
    with pytest.raises(ValueError, match="square images"):
        sskd.make_views(jnp.zeros((2, 6, 5, 1)), jnp.zeros((2,), bool), jnp.zeros((2, 4, 2), jnp.int32), 0)


def test_prepared_batch_repeats_fields_draws_one_flip_per_image_and_scales_the_padding():
    rng = np.random.default_rng(1)
    b = 64
    batch = {"image": jnp.asarray(rng.integers(0, 255, (b, 8, 8, 1)).astype(np.uint8)),
             "label": jnp.arange(b) % 10, "index": jnp.arange(b) + 100}
    out = sskd.sskd_prepare_batch(batch, jax.random.PRNGKey(3), PIPELINE, crop_pad=0)
    np.testing.assert_array_equal(out["label"], np.repeat(np.arange(b) % 10, 4))
    np.testing.assert_array_equal(out["index"], np.repeat(np.arange(b) + 100, 4))
    x = np.asarray(batch["image"], np.float32) / 255.0
    views = np.asarray(out["image"]) * 0.25 + 0.5
    flipped = 0
    for i in range(b):
        for f in (False, True):
            img = x[i][:, ::-1] if f else x[i]
            if all(np.allclose(views[4 * i + k], np.rot90(img, k), atol=1e-6) for k in range(4)):
                flipped += f
                break
        else:
            raise AssertionError(f"image {i}: its four views are not one flip then four rotations")
    assert 16 < flipped < 48  # a fair coin per image (64 draws)
    assert [sskd.scaled_pad(n) for n in (8, 28, 32, 64)] == [1, 4, 4, 8]


def test_filtering_keeps_rank_zero_rows_then_the_best_ranked_wrong_rows_stably():
    # teacher rows over 4 classes; targets: ties inside a row rank the lower class first
    scores = jnp.array([[0.9, 0.1, 0.0, 0.0],   # target 0: rank 0
                        [0.2, 0.5, 0.2, 0.1],   # target 2: 0.5 above, 0.2 tie at class 0 before it -> 2
                        [0.3, 0.3, 0.3, 0.1],   # target 1: tie with class 0 -> 1
                        [0.1, 0.2, 0.3, 0.4],   # target 3: rank 0
                        [0.4, 0.3, 0.2, 0.1],   # target 2: rank 2
                        [0.5, 0.5, 0.0, 0.0],   # target 1: tie with class 0 -> 1
                        [0.1, 0.1, 0.1, 0.7]])  # target 0: 0.7 above -> 1
    target = jnp.array([0, 2, 1, 3, 2, 1, 0])
    rank = np.asarray(sskd.true_rank(scores, target))
    np.testing.assert_array_equal(rank, [0, 2, 1, 0, 2, 1, 1])  # worked out by hand
    np.testing.assert_array_equal(rank, np_rank(np.asarray(scores), np.asarray(target)))
    # 5 wrong rows (ranks 2, 1, 2, 1, 1 at rows 1, 2, 4, 5, 6); stable order: rows 2, 5, 6 (rank 1), 1, 4 (rank 2)
    # ratio 0.75: int(3.75) = 3 wrong rows kept: rows 2, 5, 6 (all of rank 1)
    np.testing.assert_array_equal(np.asarray(sskd.keep_rows(jnp.asarray(rank), 0.75)), [1, 0, 1, 1, 0, 1, 1])
    # ratio 0.5: int(2.5) = 2: rows 2 and 5, the earlier two of the three rows of rank 1
    np.testing.assert_array_equal(np.asarray(sskd.keep_rows(jnp.asarray(rank), 0.5)), [1, 0, 1, 1, 0, 1, 0])
    # ratio 0.8: 4 wrong rows: the three of rank 1, then row 1 (the earlier of the two of rank 2)
    np.testing.assert_array_equal(np.asarray(sskd.keep_rows(jnp.asarray(rank), 0.8)), [1, 1, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(np.asarray(sskd.keep_rows(jnp.asarray(rank), 1.0)), np.ones(7, bool))
    np.testing.assert_array_equal(np.asarray(sskd.keep_rows(jnp.asarray(rank), 0.0)), rank == 0)
    for ratio in (0.1, 0.3, 0.75):
        r = np.random.default_rng(2).integers(0, 4, 50)
        np.testing.assert_array_equal(np.asarray(sskd.keep_rows(jnp.asarray(r), ratio)), np_keep(r, ratio))


def test_similarity_of_identical_features_peaks_at_each_views_own_original():
    rng = np.random.default_rng(3)
    f = rng.normal(size=(5, 7)).astype(np.float32)
    z = jnp.asarray(np.repeat(f, 4, axis=0))  # row 4i+k: image i, every view with the same feature
    rotated, originals = sskd.rotated_and_originals(z)
    sim = np.asarray(sskd.cosine_matrix(rotated, originals))
    assert sim.shape == (15, 5)
    np.testing.assert_array_equal(sim.argmax(1), np.arange(15) // 3)  # the "diagonal" of [3B, B]
    np.testing.assert_allclose(sim[np.arange(15), np.arange(15) // 3], 1.0, rtol=1e-6)
    np.testing.assert_allclose(sim, np_cos(np.repeat(f, 3, axis=0), f), rtol=1e-5, atol=1e-6)
    assert float(sskd.retrieval_accuracy(jnp.asarray(sim))) == 1.0


# ---------------------------------------------------------------------------------------------
# one step of each recipe against numpy
# ---------------------------------------------------------------------------------------------


def _setup(method, b=8, lr=0.0, wd=0.0):
    student, teacher = models.create_model("mlp", 10, hidden=(16,)), models.create_model("mlp", 10, hidden=(12,))
    sample = jnp.zeros((1, 8, 8, 1))
    t_vars = jax.jit(teacher.init)(jax.random.PRNGKey(1), sample)
    recipes = [build_recipe(m) for m in method]
    tx = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=0.9))
    state = step_lib.create_train_state(jax.random.PRNGKey(0), student, recipes, tx, sample, teacher=teacher,
                                        teacher_variables=t_vars)
    rng = np.random.default_rng(4)
    batch = {"image": jnp.asarray(rng.integers(0, 255, (b, 8, 8, 1)).astype(np.uint8)),
             "label": jnp.asarray(rng.integers(0, 10, b).astype(np.int32)), "index": jnp.arange(b)}
    steps = [step_lib.make_train_step(student, r, tx, PIPELINE, teacher=teacher, donate=False) for r in recipes]
    return student, teacher, t_vars, state, batch, steps


def _forward(student, teacher, t_vars, state, batch, method):
    """The step's views (its preparation RNG) and both networks' logits and embeddings, in float64."""
    prep_rng = jax.random.split(jax.random.fold_in(state.rng, state.step), 3)[0]
    x = build_recipe(method).prepare_batch(dict(batch), prep_rng, PIPELINE)["image"]
    s_logits, s_feats, _ = student.apply(state.student_variables(), x, train=True)
    t_logits, t_feats, _ = teacher.apply(t_vars, x, train=False)
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    return f64(s_logits), f64(s_feats["embedding"]), f64(t_logits), f64(t_feats["embedding"])


@pytest.mark.parametrize("use_labels", [True, False])
def test_every_student_term_of_one_step_recomputed_in_numpy(use_labels):
    method = {"name": "sskd", "use_labels": use_labels, "tf_ratio": 0.5}  # a ratio that drops rows
    student, teacher, t_vars, state, batch, (step,) = _setup([method])
    _, m = step(state, t_vars, batch)
    s_logits, s_emb, t_logits, t_emb = _forward(student, teacher, t_vars, state, batch, method)
    b, y = 8, np.asarray(batch["label"])
    s_rot, s_nor = np_split(s_logits)
    t_rot, t_nor = np_split(t_logits)
    ce = np_ce_rows(s_nor, y)
    kd = np_kl_rows(s_nor, t_nor, 4.0)
    target = y if use_labels else t_nor.argmax(1)
    keep_tf = np_keep(np_rank(t_rot, np.repeat(target, 3)), 0.5)
    kd_tf = np_kl_rows(s_rot, t_rot, 4.0)[keep_tf].mean()
    aux = state.params["aux"]
    zs, zt = np_head(aux["sskd_head_s"], s_emb), np_head(aux["sskd_head_t"], t_emb)
    sim_s, sim_t = np_cos(*np_split(zs)), np_cos(*np_split(zt))
    keep_ss = np_keep(np_rank(sim_t, np.arange(3 * b) // 3), 0.75)
    kd_ss = np_kl_rows(sim_s, sim_t, 0.5)[keep_ss].mean()
    want = (0.1 * ce.mean() if use_labels else 0.0) + 0.9 * kd.mean() + 2.7 * kd_tf + 10.0 * kd_ss
    assert float(m["kd"]) == pytest.approx(kd.mean(), rel=1e-4)
    assert float(m["kd_tf"]) == pytest.approx(kd_tf, rel=1e-4)
    assert float(m["kd_ss"]) == pytest.approx(kd_ss, rel=1e-4)
    assert float(m["tf_kept"]) == pytest.approx(keep_tf.mean()) and float(m["ss_kept"]) == pytest.approx(keep_ss.mean())
    assert float(m["sskd_tf"]) == pytest.approx(2.7 * kd_tf, rel=1e-4)
    assert float(m["sskd_ss"]) == pytest.approx(10.0 * kd_ss, rel=1e-4)
    assert float(m["loss"]) == pytest.approx(want, rel=1e-4)
    assert float(m["ss_acc_t"]) == pytest.approx(np.mean(sim_t.argmax(1) == np.arange(3 * b) // 3))
    if use_labels:
        assert float(m["ce"]) == pytest.approx(ce.mean(), rel=1e-4)
    else:
        assert "ce" not in m
    assert keep_tf.sum() < 3 * b or np.all(np_rank(t_rot, np.repeat(target, 3)) == 0)


def test_teacher_head_stage_loss_is_plain_ce_over_raw_cosines_and_changes_only_the_teacher_head():
    method = {"name": "sskd_teacher_head"}
    student, teacher, t_vars, state, batch, (pre, main) = _setup([method, {"name": "sskd"}], lr=0.1, wd=5e-4)
    new, m = pre(state, t_vars, batch)
    _, _, _, t_emb = _forward(student, teacher, t_vars, state, batch, method)
    sim = np_cos(*np_split(np_head(state.params["aux"]["sskd_head_t"], t_emb)))
    assert sim.shape == (24, 8)
    want = np_ce_rows(sim, np.arange(24) // 3).mean()  # no temperature
    assert float(m["ss_head_loss"]) == pytest.approx(want, rel=1e-5)
    assert float(m["loss"]) == pytest.approx(want, rel=1e-5)
    assert float(m["ss_acc_t"]) == pytest.approx(np.mean(sim.argmax(1) == np.arange(24) // 3))
    # only the teacher head moved (weight decay and momentum on, so a frozen param would move too)
    jax.tree.map(np.testing.assert_array_equal, new.params["student"], state.params["student"])
    jax.tree.map(np.testing.assert_array_equal, new.params["aux"]["sskd_head_s"], state.params["aux"]["sskd_head_s"])
    jax.tree.map(np.testing.assert_array_equal, new.model_state, state.model_state)
    moved = jax.tree.map(lambda a, b: bool(np.all(np.asarray(a) != np.asarray(b))),
                         new.params["aux"]["sskd_head_t"], state.params["aux"]["sskd_head_t"])
    assert all(jax.tree.leaves(moved)), moved
    # the student stage reads the head frozen and trains the student and its head
    after, _ = main(new, t_vars, batch)
    jax.tree.map(np.testing.assert_array_equal, after.params["aux"]["sskd_head_t"], new.params["aux"]["sskd_head_t"])
    assert not np.array_equal(after.params["aux"]["sskd_head_s"]["fc1"]["kernel"],
                              new.params["aux"]["sskd_head_s"]["fc1"]["kernel"])
    assert not np.array_equal(after.params["student"]["fc"]["kernel"], new.params["student"]["fc"]["kernel"])


def test_bad_options_are_refused_in_one_line():
    for method, match in (({"name": "sskd", "ss_ratio": 1.5}, "ss_ratio must be a number in"),
                          ({"name": "sskd", "ss_temperature": 0}, "ss_temperature must be a number > 0"),
                          ({"name": "sskd", "crop_pad": -1}, "crop_pad must be"),
                          ({"name": "sskd_teacher_head", "teacher_layer": ""}, "teacher_layer must name")):
        with pytest.raises(ConfigError, match=match):
            build_recipe(method)


# ---------------------------------------------------------------------------------------------
# runs: the two stages, resume, a later run loading the head
# ---------------------------------------------------------------------------------------------

STAGES = [{"name": "teacher_head", "num_epochs": 1, "method": {"name": "sskd_teacher_head"}},
          {"name": "student", "num_epochs": 1, "method": {"name": "sskd", "ss_ratio": 0.5}}]


def test_two_stages_resume_exactly_in_either_stage_and_a_later_run_loads_the_head(tmp_path, data_dir, digits_teacher):
    cfg = tiny_digits_config(**{"teacher.workdir": digits_teacher[0], "teacher.kwargs": {"width": 32},
                                "stages": STAGES, "train.checkpoint_every_steps": 1})
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train_and_evaluate(cfg, a)  # 128 images, batch 64: 2 steps per stage
    train_and_evaluate(cfg, b, stop_after_steps=1)  # in the middle of the teacher-head stage
    first = ckpt_lib.load_run_state(b)[1]
    train_and_evaluate(cfg, b, stop_after_steps=3)  # in the middle of the student stage
    third = ckpt_lib.load_run_state(b)[1]
    assert int(first["step"]) == 1 and int(third["step"]) == 3  # stage 1 is steps 0-1, stage 2 steps 2-3
    train_and_evaluate(cfg, b)
    sa, sb = ckpt_lib.load_run_state(a)[1], ckpt_lib.load_run_state(b)[1]
    jax.tree.map(np.testing.assert_array_equal, sa, sb)
    # stage 1 moved only the teacher head; stage 2 kept it and trained the student
    assert sorted(sa["params"]["aux"]) == ["sskd_head_s", "sskd_head_t"]  # both stages declare the same two
    jax.tree.map(np.testing.assert_array_equal, third["params"]["aux"]["sskd_head_t"],
                 sa["params"]["aux"]["sskd_head_t"])
    assert not np.array_equal(first["params"]["aux"]["sskd_head_t"]["fc1"]["kernel"],
                              sa["params"]["aux"]["sskd_head_t"]["fc1"]["kernel"])
    # a later run reads the trained head from a's work dir, frozen
    later = tiny_digits_config(**{"teacher.workdir": digits_teacher[0], "teacher.kwargs": {"width": 32},
                                  "method": {"name": "sskd"}, "aux_init_from": {"sskd_head_t": a},
                                  "train.checkpoint_every_steps": 1})
    c = str(tmp_path / "c")
    train_and_evaluate(later, c, stop_after_steps=1)
    jax.tree.map(np.testing.assert_array_equal, sa["params"]["aux"]["sskd_head_t"],
                 ckpt_lib.load_run_state(c)[1]["params"]["aux"]["sskd_head_t"])
    # the trained head on the test split, against numpy: np.rot90 views, the numpy head and cosines
    from jaxkd.train.sskd_eval import evaluate_teacher_head
    ev = evaluate_teacher_head(a)
    from jaxkd import data as data_lib
    info, _, test = data_lib.load_dataset("digits")
    images = test.gather(np.arange(256))["image"]  # 297 test digits: 4 batches of 64, the tail left out
    teacher = models.create_model("cnn", 10, width=32)
    t_vars = ckpt_lib.load_model_variables(digits_teacher[0], jax.jit(teacher.init)(jax.random.key(0),
                                                                                   jnp.zeros((1, 8, 8, 1))))[0]
    x = (images / 255.0 - np.asarray(info.mean)) / np.asarray(info.std)
    hits = 0
    for i in range(0, 256, 64):
        emb = [np.asarray(teacher.apply(t_vars, jnp.asarray(np.rot90(x[i:i + 64], k, axes=(1, 2)), jnp.float32),
                                        train=False)[1]["embedding"], np.float64) for k in range(4)]
        z = [np_head(sa["params"]["aux"]["sskd_head_t"], e) for e in emb]
        for k in (1, 2, 3):
            hits += int(np.sum(np.argmax(np_cos(z[k], z[0]), axis=1) == np.arange(64)))
    assert (ev["num_images"], ev["batch_size"], ev["split"], ev["step"]) == (256, 64, "test", 4)
    assert ev["accuracy"] == pytest.approx(hits / (3 * 256), abs=1.5 / (3 * 256))  # (a near-tie may flip)
    with pytest.raises(ValueError, match="no run checkpoint"):
        evaluate_teacher_head(str(tmp_path / "nothing"))


def test_study_presets_load_a_shared_head_or_train_their_own(monkeypatch):
    """experiments/configs/fashion_sskd.py: with JAXKD_SSKD_HEAD the SSKD presets are the student stage
    alone, reading that run's teacher head; without it, a teacher-head stage then the student stage.
    fashion_sskd_head.py trains that shared head."""
    import os

    from jaxkd.config import load_config
    from jaxkd.experiment import preset_config
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs", "fashion_sskd.py")
    for head in ("runs/sskd/teacher_head", ""):
        monkeypatch.setenv("JAXKD_SSKD_HEAD", head)
        c = load_config(path)
        for name, model, labels in (("sskd", "resnet8", True), ("sskd_unlabelled", "resnet8", False),
                                    ("sskd_cnn", "cnn", True)):
            p = preset_config(c, name)
            assert (p.model.name, p.method.name, p.method.get("use_labels", True)) == (model, "sskd", labels)
            if head:
                assert p.aux_init_from.to_dict() == {"sskd_head_t": head} and not p.get("stages")
            else:
                assert p.aux_init_from.to_dict() == {}
                pre, student = p.stages
                assert (pre["method"]["name"], pre["num_epochs"], student["num_epochs"]) == ("sskd_teacher_head", 8, 10)
                assert tuple(pre["optim"]["milestones"]) == (4, 6) and pre["optim"]["lr"] == 0.05
                assert student["method"] == p.method.to_dict()
            build_recipe(p.method.to_dict())
        for name, weights in (("sskd_no_ss", {"ss_weight": 0.0}), ("sskd_views_only", {"ss_weight": 0.0, "tf_weight": 0.0})):
            assert preset_config(c, name).method.to_dict() == {"name": "sskd", **weights}
        for name in ("kd", "crd", "ce_cnn", "kd_cnn"):  # no teacher head outside SSKD
            p = preset_config(c, name)
            assert p.aux_init_from.to_dict() == {} and not p.get("stages")
    # the shared head's own run: the pre-stage's optimizer, milestones at half and three quarters
    head_path = path.replace("fashion_sskd.py", "fashion_sskd_head.py")
    for epochs, milestones in (("", (3, 4)), ("8", (4, 6))):
        monkeypatch.setenv("JAXKD_SSKD_HEAD_EPOCHS", epochs)
        h = load_config(head_path)
        assert (h.method.to_dict(), h.train.num_epochs) == ({"name": "sskd_teacher_head"}, int(epochs or 6))
        assert (h.optim.name, h.optim.lr, h.optim.schedule, tuple(h.optim.milestones), h.optim.decay) == (
            "sgd", 0.05, "step", milestones, 0.1)


# ---------------------------------------------------------------------------------------------
# 8 devices
# ---------------------------------------------------------------------------------------------


def eight_devices_sskd(ctx):
    """(In the 8-device child, tests/_eight_devices.py) a pre-stage step then two SSKD steps, 1 and 8 devices."""
    out = {}
    for n in (1, 8):
        mesh = step_lib.make_mesh(n)
        student, teacher = models.create_model("cnn", 10, width=4, hidden=8), models.create_model("mlp", 10,
                                                                                                  hidden=(12,))
        sample = jnp.zeros((1, 8, 8, 1))
        t_vars = jax.jit(teacher.init)(jax.random.PRNGKey(1), sample)
        recipes = [build_recipe({"name": "sskd_teacher_head"}), build_recipe({"name": "sskd", "tf_ratio": 0.5})]
        tx = optax.sgd(0.1, momentum=0.9)
        state = step_lib.create_train_state(jax.random.PRNGKey(0), student, recipes, tx, sample, teacher=teacher,
                                            teacher_variables=t_vars)
        state = jax.device_put(state, step_lib.replicated(mesh))
        steps = [step_lib.make_train_step(student, r, tx, PIPELINE, teacher=teacher, mesh=mesh) for r in recipes]
        rng = np.random.default_rng(5)
        metrics = []
        for which in (0, 1, 1):
            batch = {"image": rng.integers(0, 255, (16, 8, 8, 1), dtype=np.uint8),
                     "label": rng.integers(0, 10, 16).astype(np.int32), "index": np.arange(16, dtype=np.int32)}
            state, m = steps[which](state, t_vars, step_lib.shard_batch(batch, mesh))
            metrics.append({k: float(v) for k, v in m.items()})
        head_t = state.params["aux"]["sskd_head_t"]["fc2"]["kernel"]
        out[n] = {"metrics": metrics, "head_t": np.asarray(head_t).ravel().tolist(),
                  "fc": np.asarray(state.params["student"]["fc"]["kernel"]).ravel().tolist()}
    return out


def test_sskd_on_eight_devices_equals_one(eight_devices):
    out = eight_devices("test_sskd:eight_devices_sskd")
    for a, b in zip(out["1"]["metrics"], out["8"]["metrics"]):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert "kd_ss" in out["1"]["metrics"][1]
    np.testing.assert_allclose(out["1"]["head_t"], out["8"]["head_t"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["1"]["fc"], out["8"]["fc"], rtol=1e-4, atol=1e-6)
