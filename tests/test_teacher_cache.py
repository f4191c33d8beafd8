"""Teacher-output cache: rows keyed by example id, KD from the cache = KD with the live teacher,
and every refusal (other teacher, data, subset, normalisation, augmentation, feature methods)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import config as config_lib
from jaxkd import data as data_lib
from jaxkd import models as models_lib
from jaxkd.train import checkpoint as ckpt_lib
from jaxkd.train import recipes as recipes_lib
from jaxkd.train import step as step_lib
from jaxkd.train import teacher_cache as cache_lib
from jaxkd.train import cache_build
from jaxkd.train.cache_build import build_teacher_cache
from jaxkd.train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**over):
    c = config_lib.load_config(os.path.join(ROOT, "experiments/configs/digits.py"))
    c.train.num_epochs = 1
    c.train.progress = False
    c.train.tensorboard = False
    c.data.batch_size = 64
    c.data.augment = {}
    return config_lib.apply_overrides(c, [f"{k}={v!r}" for k, v in over.items()])


@pytest.fixture(scope="module")
def teacher_and_cache(tmp_path_factory, digits_teacher):
    """The session's digits teacher, and its cache."""
    wd = digits_teacher[0]
    cache = str(tmp_path_factory.mktemp("cache"))
    build_teacher_cache(small_config(**{"teacher.workdir": wd}), None, cache, batch_size=100)
    return wd, cache


def _teacher_forward(config, teacher_wd):
    info, train_src, _ = data_lib.load_dataset(config.data.name)
    teacher = models_lib.create_model(config.teacher.name, info.num_classes, **dict(config.teacher.kwargs))
    template = teacher.init(jax.random.PRNGKey(0), jnp.zeros((1, *info.input_shape)))
    variables, _ = ckpt_lib.load_model_variables(teacher_wd, template)
    pipeline = step_lib.InputPipeline(mean=info.mean, std=info.std)
    forward = jax.jit(lambda im: teacher.apply(variables, pipeline(None, im, train=False), train=False)[0])
    return train_src, forward, variables


def _run_params(workdir):
    _, state = ckpt_lib.load_run_state(workdir)
    return state["params"]


def test_manifest_records_what_the_cache_was_made_from(teacher_and_cache):
    teacher_wd, cache = teacher_and_cache
    m = cache_lib.open_teacher_cache(cache).manifest
    _, _, variables = _teacher_forward(small_config(), teacher_wd)
    assert m["teacher"]["workdir"] == os.path.abspath(teacher_wd)
    assert m["teacher"]["variables_sha256"] == cache_lib.variables_hash(variables)
    assert m["teacher"]["name"] == "cnn" and m["teacher"]["kwargs"] == {"width": 32}
    assert isinstance(m["teacher"]["step"], int) and m["teacher"]["kind"] == "best"
    assert m["data"]["name"] == "digits" and m["data"]["train_split"] == "train"
    assert m["data"]["num_train_examples"] is None
    assert m["augmentation"] == {"pad": 0, "flip": False} and m["num_views"] == 1
    assert m["logits"]["dtype"] == "float32" and m["logits"]["shape"][1:] == [1, 10]
    assert len(m["normalisation"]["mean"]) == 1


def test_cached_rows_are_the_teachers_logits_even_when_shuffled(teacher_and_cache):
    """The old cache's bug: rows found by batch index. Here, over 3 shuffled epochs, every row
    looked up by ``batch["id"]`` is the teacher's output on the image that is in the batch."""
    teacher_wd, cache_path = teacher_and_cache
    train_src, forward, _ = _teacher_forward(small_config(), teacher_wd)
    cache = cache_lib.open_teacher_cache(cache_path)
    assert cache.logits.shape[0] == len(train_src)
    batches = data_lib.train_batches(train_src, 64, seed=3)
    steps = 3 * data_lib.steps_per_epoch(len(train_src), 64)
    orders = []
    for _ in range(steps):
        b = next(batches)
        orders.append(b["id"])
        np.testing.assert_allclose(cache.lookup(b["id"]), np.asarray(forward(b["image"])), rtol=1e-5, atol=1e-5)
    first, second = np.concatenate(orders[:5]), np.concatenate(orders[steps // 3:steps // 3 + 5])
    assert not np.array_equal(first, second)  # the epochs really are in different orders
    with pytest.raises(KeyError, match="not in the teacher cache"):
        cache.lookup([10**9])


def test_kd_from_cache_equals_kd_with_live_teacher(tmp_path, teacher_and_cache):
    teacher_wd, cache = teacher_and_cache
    live = train_and_evaluate(small_config(**{"teacher.workdir": teacher_wd}), str(tmp_path / "live"))
    cached = train_and_evaluate(small_config(**{"teacher.workdir": teacher_wd, "teacher.cache": cache}),
                                str(tmp_path / "cached"))
    # Not bitwise: the cache's logits come from their own jit (batch 100, the teacher alone), the
    # live ones from the teacher fused into the KD step, and XLA may round a few of them
    # differently in the last bit. After one epoch (23 steps) the params differ by at most
    # ~1 ulp (6e-8 measured); any stale or misplaced row would move them by orders more.
    pa, pb = _run_params(str(tmp_path / "live")), _run_params(str(tmp_path / "cached"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), pa, pb)
    assert cached["steps"] == live["steps"]
    assert cached["teacher_accuracy"] == pytest.approx(live["teacher_accuracy"])
    # without teacher.workdir the cache's own teacher is used (nothing to compare it with)
    info, _, _ = data_lib.load_dataset("digits")
    manifest = cache_lib.open_teacher_cache(cache).manifest
    assert cache_lib.cache_mismatches(manifest, small_config(**{"teacher.cache": cache}), info,
                                      {"pad": 0, "flip": False}) == []


@pytest.mark.parametrize("over, expected", [
    ({"teacher.kwargs": {"width": 16}}, "teacher model"),
    ({"data.num_train_examples": 640}, "data.num_train_examples"),
    ({"data.augment": {"pad": 1, "flip": True}}, "cache-teacher --views K"),
    ({"data.val_fraction": 0.2}, "data.val_fraction: cache None, config 0.2"),
    ({"method": {"name": "at"}}, "only logit methods"),
    ({"method": {"name": "bss"}}, "only logit methods"),
])
def test_refusals(tmp_path, teacher_and_cache, over, expected):
    teacher_wd, cache = teacher_and_cache
    cfg = small_config(**{"teacher.workdir": teacher_wd, "teacher.cache": cache, **over})
    with pytest.raises(config_lib.ConfigError, match=expected.replace("{", r"\{").replace("}", r"\}")):
        train_and_evaluate(cfg, str(tmp_path / "run"))


def test_refuses_other_teacher_normalisation_and_split(tmp_path, teacher_and_cache):
    teacher_wd, cache = teacher_and_cache
    # another teacher work dir
    other = str(tmp_path / "other_teacher")
    shutil.copytree(teacher_wd, other)
    with pytest.raises(config_lib.ConfigError, match="teacher work dir"):
        train_and_evaluate(small_config(**{"teacher.workdir": other, "teacher.cache": cache}), str(tmp_path / "a"))
    # the same work dir, retrained (Orbax's checkpoint metadata changes): simulated on a copy
    fake = str(tmp_path / "fake_cache")
    shutil.copytree(cache, fake)
    manifest = json.load(open(os.path.join(fake, "manifest.json")))
    manifest["teacher"]["fingerprint"] = "0" * 16
    json.dump(manifest, open(os.path.join(fake, "manifest.json"), "w"))
    with pytest.raises(config_lib.ConfigError, match="the teacher was retrained"):
        train_and_evaluate(small_config(**{"teacher.workdir": teacher_wd, "teacher.cache": fake}),
                           str(tmp_path / "b"))
    # other normalisation and split
    manifest["teacher"]["fingerprint"] = json.load(open(os.path.join(cache, "manifest.json")))["teacher"]["fingerprint"]
    manifest["normalisation"]["mean"] = [0.25]
    manifest["data"]["train_split"] = "train[:50%]"
    json.dump(manifest, open(os.path.join(fake, "manifest.json"), "w"))
    with pytest.raises(config_lib.ConfigError, match="input normalisation") as e:
        train_and_evaluate(small_config(**{"teacher.workdir": teacher_wd, "teacher.cache": fake}),
                           str(tmp_path / "c"))
    assert "data.train_split" in str(e.value)
    with pytest.raises(config_lib.ConfigError, match="no manifest.json"):
        train_and_evaluate(small_config(**{"teacher.cache": str(tmp_path)}), str(tmp_path / "d"))


def test_cache_with_val_fraction_covers_only_the_examples_trained_on(tmp_path, teacher_and_cache):
    teacher_wd, _ = teacher_and_cache
    cfg = small_config(**{"teacher.workdir": teacher_wd, "data.val_fraction": 0.2})
    cache = str(tmp_path / "cache")
    build_teacher_cache(cfg, None, cache, batch_size=100)
    manifest = json.load(open(os.path.join(cache, "manifest.json")))
    from jaxkd.train.setup import training_sources
    _, train_src, val_src, _ = training_sources(cfg)
    assert manifest["data"]["num_examples"] == len(train_src) and manifest["data"]["val_fraction"] == 0.2
    assert not set(np.asarray(cache_lib.open_teacher_cache(cache).ids)) & set(val_src.ids)
    summary = train_and_evaluate(small_config(**{"teacher.workdir": teacher_wd, "teacher.cache": cache,
                                                 "data.val_fraction": 0.2}), str(tmp_path / "run"))
    assert summary["selected_on"] == "val" and summary["num_val"] == len(val_src)


def _np_crop_flip(images, offsets, flips, pad):
    """numpy reference: zero-pad, crop at (row, col), mirror the columns where flips."""
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h, w = images.shape[1:3]
    out = np.stack([padded[i, r:r + h, c:c + w] for i, (r, c) in enumerate(offsets)])
    return np.where(np.asarray(flips)[:, None, None, None], out[:, :, ::-1], out)


def test_view_params_and_choice_are_seeded_uniform_and_in_range():
    ids = np.arange(6000)
    off, flip = cache_lib.view_params(ids, 2, seed=7, pad=2, flip=True)
    assert off.shape == (6000, 2) and off.dtype == np.int32 and off.min() == 0 and off.max() == 4
    for axis in range(2):  # each of the 5 offsets ~1/5 of the time (binomial sd ~0.005)
        np.testing.assert_allclose(np.bincount(off[:, axis], minlength=5) / 6000, 0.2, atol=0.025)
    assert abs(flip.mean() - 0.5) < 0.03 and abs(np.corrcoef(off[:, 0], off[:, 1])[0, 1]) < 0.05
    again, flip_again = cache_lib.view_params(ids[::-1], 2, seed=7, pad=2, flip=True)
    np.testing.assert_array_equal(again[::-1], off)  # a function of (seed, id, view) only
    np.testing.assert_array_equal(flip_again[::-1], flip)
    other, _ = cache_lib.view_params(ids, 3, seed=7, pad=2, flip=True)
    assert (other != off).any(axis=1).mean() > 0.9  # another view is another crop (1 - 1/25 expected)
    assert not cache_lib.view_params(ids, 2, seed=7, pad=2, flip=False)[1].any()
    views = cache_lib.choose_views(ids, 0, 4, seed=7)
    np.testing.assert_allclose(np.bincount(views, minlength=4) / 6000, 0.25, atol=0.03)
    np.testing.assert_array_equal(views, cache_lib.choose_views(ids, 0, 4, seed=7))
    assert (views != cache_lib.choose_views(ids, 1, 4, seed=7)).mean() > 0.6  # expected 0.75
    assert not cache_lib.choose_views(ids, 5, 1, seed=7).any()


@pytest.fixture(scope="module")
def view_cache(tmp_path_factory, teacher_and_cache):
    """3 augmented views (pad 1 + flip) of every digits training example."""
    teacher_wd, _ = teacher_and_cache
    out = str(tmp_path_factory.mktemp("view_cache"))
    cfg = small_config(**{"teacher.workdir": teacher_wd, "data.augment": {"pad": 1, "flip": True}})
    build_teacher_cache(cfg, None, out, batch_size=128, num_views=3, view_seed=11)
    return out


def test_view_cache_holds_the_teacher_on_each_stored_crop(teacher_and_cache, view_cache):
    teacher_wd, _ = teacher_and_cache
    train_src, forward, _ = _teacher_forward(small_config(), teacher_wd)
    cache = cache_lib.open_teacher_cache(view_cache)
    m = cache.manifest
    assert m["augmentation"] == {"pad": 1, "flip": True} and m["num_views"] == 3 and m["view_seed"] == 11
    assert cache.logits.shape == (len(train_src), 3, 10)
    batch = train_src.gather(np.arange(0, len(train_src), 7))
    for view in range(3):
        off, flip = cache_lib.view_params(batch["id"], view, seed=11, pad=1, flip=True)
        expected = np.asarray(forward(_np_crop_flip(batch["image"], off, flip, 1)))
        np.testing.assert_allclose(cache.lookup(batch["id"], view), expected, rtol=1e-5, atol=1e-5)
    # the views differ, so the student gets different targets for different crops
    assert np.abs(cache.logits[:, 0] - cache.logits[:, 1]).max() > 1e-2
    # what the loop adds to a batch: logits of the view whose crop it also passes to the step
    batches = data_lib.train_batches(train_src, 64, seed=3)
    steps_per_epoch = data_lib.steps_per_epoch(len(train_src), 64)
    for step in range(2 * steps_per_epoch + 4):
        b = next(batches)
        if step not in (0, 1, steps_per_epoch, 2 * steps_per_epoch + 3):
            continue
        extra = cache.batch_views(b["id"], step // steps_per_epoch)
        image = _np_crop_flip(b["image"], extra["aug_offsets"], extra["aug_flips"], 1)
        np.testing.assert_allclose(extra["teacher_logits"], np.asarray(forward(image)), rtol=1e-5, atol=1e-5)


def test_step_with_stored_view_equals_live_teacher_on_the_same_crop(teacher_and_cache, view_cache):
    """One KD step from the cache (logits + the view's crop) equals one with the live teacher
    fed the same crop: the student saw the image the teacher's logits belong to."""
    import optax
    teacher_wd, _ = teacher_and_cache
    info, train_src, _ = data_lib.load_dataset("digits")
    student = models_lib.create_model("cnn", 10, width=4)
    teacher = models_lib.create_model("cnn", 10, width=32)
    sample = jnp.zeros((1, *info.input_shape))
    t_vars, _ = ckpt_lib.load_model_variables(teacher_wd, teacher.init(jax.random.PRNGKey(0), sample))
    pipeline = step_lib.InputPipeline(mean=info.mean, std=info.std, pad=1, flip=True)
    recipe = recipes_lib.hinton_kd_recipe(4.0, 0.9, 0.1)
    tx = optax.sgd(0.1, momentum=0.9)
    state = step_lib.create_train_state(jax.random.PRNGKey(0), student, recipe, tx, sample)
    cache = cache_lib.open_teacher_cache(view_cache)
    b = train_src.gather(np.arange(64) * 3)
    extra = cache.batch_views(b["id"], epoch=2)
    base = {"image": jnp.asarray(b["image"]), "label": jnp.asarray(b["label"]),
            "aug_offsets": jnp.asarray(extra["aug_offsets"]), "aug_flips": jnp.asarray(extra["aug_flips"])}
    live = step_lib.make_train_step(student, recipe, tx, pipeline, teacher=teacher, donate=False)
    cached = step_lib.make_train_step(student, recipe, tx, pipeline, cached_teacher=True, donate=False)
    s_live, m_live = live(state, t_vars, base)
    s_cached, m_cached = cached(state, None, {**base, "teacher_logits": jnp.asarray(extra["teacher_logits"])})
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6), s_live.params, s_cached.params)
    assert float(m_live["loss"]) == pytest.approx(float(m_cached["loss"]), rel=1e-5)
    # and the crop matters: a random crop instead gives another update
    s_rand, _ = live(state, t_vars, {"image": base["image"], "label": base["label"]})
    assert not np.allclose(np.asarray(jax.tree.leaves(s_rand.params)[0]), np.asarray(jax.tree.leaves(s_live.params)[0]))


def test_kd_from_view_cache_trains_and_resumes_exactly(tmp_path, teacher_and_cache, view_cache):
    teacher_wd, _ = teacher_and_cache
    over = {"teacher.workdir": teacher_wd, "teacher.cache": view_cache, "data.augment": {"pad": 1, "flip": True},
            "train.num_epochs": 2, "train.checkpoint_every_steps": 5}
    full = train_and_evaluate(small_config(**over), str(tmp_path / "full"))
    train_and_evaluate(small_config(**over), str(tmp_path / "resumed"), stop_after_steps=30)
    resumed = train_and_evaluate(small_config(**over), str(tmp_path / "resumed"))
    jax.tree.map(np.testing.assert_array_equal, _run_params(str(tmp_path / "full")),
                 _run_params(str(tmp_path / "resumed")))
    assert full["last_accuracy"] == resumed["last_accuracy"] > 0.3  # it learns (chance 0.1; flipped digits)
    # a run with other augmentation is refused, naming both
    with pytest.raises(config_lib.ConfigError, match="cache views .'pad': 1, 'flip': True., run .'pad': 2"):
        train_and_evaluate(small_config(**{**over, "data.augment": {"pad": 2, "flip": True}}), str(tmp_path / "x"))


def test_float16_cache_is_half_the_size_and_rounds_within_half_an_ulp(tmp_path, teacher_and_cache):
    teacher_wd, cache32 = teacher_and_cache
    path = str(tmp_path / "f16")
    m = build_teacher_cache(small_config(**{"teacher.workdir": teacher_wd}), None, path,
                                      batch_size=100, dtype="float16")
    a, b = cache_lib.open_teacher_cache(cache32), cache_lib.open_teacher_cache(path)
    assert b.logits.dtype == np.float16 and m["logits"]["dtype"] == "float16"
    size = lambda p: os.path.getsize(os.path.join(p, "logits.npy"))  # noqa: E731
    assert size(path) < 0.52 * size(cache32)
    ids = a.ids[::5]
    exact, rounded = a.lookup(ids), b.lookup(ids)
    assert rounded.dtype == np.float32
    # round-to-nearest float16, exactly: every stored value is numpy's rounding of the float32 logit
    np.testing.assert_array_equal(np.asarray(b.logits), np.asarray(a.logits).astype(np.float16))
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(exact), 2.0 ** -14))) - 10)
    assert np.all(np.abs(rounded - exact) <= ulp / 2)
    # the manifest records the largest rounding error over the whole cache, exactly
    largest = np.abs(np.asarray(b.logits, np.float64) - np.asarray(a.logits, np.float64)).max()
    assert largest > 0 and m["logits"]["max_abs_rounding"] == pytest.approx(largest, rel=1e-12)
    # a run trains from it like from the float32 cache
    summary = train_and_evaluate(small_config(**{"teacher.workdir": teacher_wd, "teacher.cache": path}),
                                 str(tmp_path / "run"))
    assert summary["last_accuracy"] > 0.5
    with pytest.raises(config_lib.ConfigError, match="dtype must be"):
        build_teacher_cache(small_config(**{"teacher.workdir": teacher_wd}), None, path, dtype="int8")


def test_view_cache_build_errors(teacher_and_cache, tmp_path):
    teacher_wd, _ = teacher_and_cache
    aug = small_config(**{"teacher.workdir": teacher_wd, "data.augment": {"pad": 1, "flip": False}})
    with pytest.raises(config_lib.ConfigError, match="cache-teacher --views K"):
        build_teacher_cache(aug, None, str(tmp_path / "a"))
    with pytest.raises(config_lib.ConfigError, match="needs augmentation"):
        build_teacher_cache(small_config(**{"teacher.workdir": teacher_wd}), None, str(tmp_path / "b"),
                                      num_views=2)
    with pytest.raises(config_lib.ConfigError, match="positive int"):
        build_teacher_cache(aug, None, str(tmp_path / "c"), num_views=0)


def test_step_refuses_cache_for_feature_recipe():
    student = models_lib.create_model("cnn", 10, width=4)
    import optax
    with pytest.raises(ValueError, match="cannot train from cached teacher logits"):
        step_lib.make_train_step(student, recipes_lib.build_recipe({"name": "at"}), optax.sgd(0.1),
                                 step_lib.InputPipeline((0.5,), (0.25,)), cached_teacher=True)
    # a logit recipe needs no teacher model when its logits come from a cache
    step_lib.make_train_step(student, recipes_lib.hinton_kd_recipe(), optax.sgd(0.1),
                             step_lib.InputPipeline((0.5,), (0.25,)), cached_teacher=True)


def test_cli_cache_teacher(tmp_path, teacher_and_cache, capsys):
    from jaxkd import cli
    teacher_wd, cache = teacher_and_cache
    out = str(tmp_path / "cli_cache")
    cli.run(["cache-teacher", "--config", os.path.join(ROOT, "experiments/configs/digits.py"), "--workdir", out,
             "--no-progress", "teacher.kwargs={'width': 32}", "data.augment={}", f"teacher.workdir={teacher_wd}"])
    assert json.loads(capsys.readouterr().out)["logits_shape"][1:] == [1, 10]
    a, b = cache_lib.open_teacher_cache(out), cache_lib.open_teacher_cache(cache)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-5)  # another batch size
    views = str(tmp_path / "cli_views")
    cli.run(["cache-teacher", "--config", os.path.join(ROOT, "experiments/configs/digits.py"), "--workdir", views,
             "--no-progress", "--views", "2", "--view-seed", "5", "--dtype", "float16", "teacher.kwargs={'width': 32}",
             "data.augment={'pad': 1, 'flip': False}", f"teacher.workdir={teacher_wd}"])
    assert json.loads(capsys.readouterr().out)["logits_shape"][1:] == [2, 10]
    m = cache_lib.open_teacher_cache(views).manifest
    assert m["view_seed"] == 5 and m["augmentation"] == {"pad": 1, "flip": False}
    assert m["logits"]["dtype"] == "float16"


# --------------------------------------------------------------------------------------------
# Top-k caches (FKD-style stored soft labels)
# --------------------------------------------------------------------------------------------


def _fkd_label(z, k, temperature):
    """Independent expectation: the teacher's softmax at T on its k most likely classes, the
    remaining probability split evenly over the others (FKD's stored soft label)."""
    z = np.asarray(z, np.float64) / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.empty_like(p)
    for i in range(p.shape[0]):
        top = np.argsort(-p[i], kind="stable")[:k]
        q[i] = (1.0 - p[i, top].sum()) / (p.shape[1] - k)
        q[i, top] = p[i, top]
    return q


def _softmax(z, temperature):
    z = np.asarray(z, np.float64) / temperature
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("k, temperature", [(1, 4.0), (3, 4.0), (5, 1.0), (19, 2.5)])
def test_topk_compress_expands_to_fkd_soft_labels(k, temperature):
    rng = np.random.default_rng(k)
    z = rng.normal(scale=4.0, size=(64, 20))
    values, indices, rest = cache_lib.topk_compress(z, k, temperature)
    assert values.shape == indices.shape == (64, k) and rest.shape == (64,)
    np.testing.assert_array_equal(indices, np.argsort(-z, axis=-1)[:, :k])  # largest first
    assert np.all(np.diff(values, axis=-1) <= 0)
    dense = cache_lib.topk_expand(values, indices, rest, 20)
    assert dense.dtype == np.float32 and dense.shape == z.shape
    np.testing.assert_allclose(_softmax(dense, temperature), _fkd_label(z, k, temperature), rtol=2e-5, atol=1e-7)
    np.testing.assert_array_equal(dense.argmax(-1), z.argmax(-1))
    mass = cache_lib.topk_mass(values, rest, 20, temperature)
    np.testing.assert_allclose(mass, np.sort(_softmax(z, temperature), -1)[:, -k:].sum(-1), rtol=1e-12)
    if k == 19:  # one class left: its "rest" logit is its own logit
        np.testing.assert_allclose(rest, np.sort(z, -1)[:, 0], rtol=1e-12)


def test_in_memory_cache_serves_lookups():
    """A cache made in memory (``benchmarks/bench_cached_kd.py`` does this) needs no manifest keys."""
    logits = np.arange(4 * 1 * 3, dtype=np.float32).reshape(4, 1, 3)
    cache = cache_lib.TeacherCache(path="<memory>", manifest={}, ids=np.arange(10, 14), logits=logits)
    np.testing.assert_array_equal(cache.lookup([13, 10]), logits[[3, 0], 0])
    assert cache.num_views == 1 and cache.top_k is None and cache.num_classes == 3
    assert set(cache.batch_views([11], epoch=0)) == {"teacher_logits"}


def test_topk_compress_errors():
    z = np.zeros((2, 5))
    for k in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match="top_k must be an int in"):
            cache_lib.topk_compress(z, k, 4.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        cache_lib.topk_compress(z, 2, 0.0)


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory, teacher_and_cache):
    teacher_wd, _ = teacher_and_cache
    path = str(tmp_path_factory.mktemp("topk"))
    # the temperature comes from the config's hinton_kd method (digits: T=4)
    build_teacher_cache(small_config(**{"teacher.workdir": teacher_wd}), None, path, batch_size=100, top_k=3)
    return path


def test_topk_cache_holds_the_teachers_fkd_labels(teacher_and_cache, topk_cache):
    _, dense_path = teacher_and_cache
    dense, top = cache_lib.open_teacher_cache(dense_path), cache_lib.open_teacher_cache(topk_cache)
    m = top.manifest
    assert m["format"] == cache_lib.TOPK_FORMAT and m["logits"]["top_k"] == 3 == top.top_k
    assert m["logits"]["temperature"] == 4.0 and m["logits"]["num_classes"] == 10 == top.num_classes
    n = len(dense.ids)
    assert top.logits.shape == (n, 1, 3) and top.indices.shape == (n, 1, 3) and top.rest.shape == (n, 1)
    assert top.indices.dtype == np.int16
    np.testing.assert_array_equal(top.ids, dense.ids)
    exact = dense.lookup(dense.ids)
    got = top.lookup(dense.ids[::-1])[::-1]  # any order
    np.testing.assert_allclose(_softmax(got, 4.0), _fkd_label(exact, 3, 4.0), rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(got.argmax(-1), exact.argmax(-1))
    mass = np.sort(_softmax(exact, 4.0), -1)[:, -3:].sum(-1)
    assert m["logits"]["top_k_mass"]["mean"] == pytest.approx(mass.mean(), rel=1e-5)
    assert m["logits"]["top_k_mass"]["min"] == pytest.approx(mass.min(), rel=1e-5)
    total = lambda p: sum(os.path.getsize(os.path.join(p, f)) - 128 for f in os.listdir(p) if f.endswith(".npy"))  # noqa: E731
    # values (3 float32) + classes (3 int16) + rest (1 float32) + id (int64) against 10 float32 + id
    assert total(topk_cache) == n * (3 * 4 + 3 * 2 + 4 + 8) and total(dense_path) == n * (10 * 4 + 8)


def test_kd_from_topk_cache_trains_and_needs_its_temperature(tmp_path, teacher_and_cache, topk_cache):
    teacher_wd, _ = teacher_and_cache
    summary = train_and_evaluate(small_config(**{"teacher.workdir": teacher_wd, "teacher.cache": topk_cache}),
                                 str(tmp_path / "run"))
    # it learns (chance 0.1; one epoch from a one-epoch teacher's top-3 at T=4)
    assert summary["last_accuracy"] > 0.3 and summary["teacher_accuracy"] is not None
    with pytest.raises(config_lib.ConfigError, match="top-k cache .top_k=3. spreads .* at T=4, the run distils at T=2"):
        train_and_evaluate(small_config(**{"teacher.workdir": teacher_wd, "teacher.cache": topk_cache,
                                           "method.temperature": 2.0}), str(tmp_path / "t2"))
    stages = [{"num_epochs": 1, "method": {"name": "hinton_kd", "temperature": 4.0}},
              {"num_epochs": 1, "method": {"name": "hinton_kd", "temperature": 8.0}}]
    with pytest.raises(config_lib.ConfigError, match="run distils at T=8"):
        train_and_evaluate(small_config(**{"teacher.workdir": teacher_wd, "teacher.cache": topk_cache,
                                           "stages": stages}), str(tmp_path / "stages"))
    # Label Refinery reads the refinery's softmax at T=1
    with pytest.raises(config_lib.ConfigError, match="run distils at T=1;"):
        train_and_evaluate(small_config(**{"teacher.workdir": teacher_wd, "teacher.cache": topk_cache,
                                           "method": {"name": "label_refinery"}}), str(tmp_path / "lr"))


def test_topk_cache_build_options_and_errors(tmp_path, teacher_and_cache):
    teacher_wd, _ = teacher_and_cache
    cfg = small_config(**{"teacher.workdir": teacher_wd})
    path = str(tmp_path / "c")
    m = build_teacher_cache(cfg, None, path, top_k=2, temperature=1.5, dtype="float16")
    c16 = cache_lib.open_teacher_cache(path)
    assert m["logits"]["temperature"] == 1.5 and c16.logits.dtype == c16.rest.dtype == np.float16
    assert 0 < m["logits"]["max_abs_rounding"] < 0.05
    assert os.path.exists(os.path.join(path, "indices.npy"))
    # rebuilt as a dense cache in the same folder: the top-k files go
    build_teacher_cache(cfg, None, path)
    assert sorted(os.listdir(path)) == ["ids.npy", "logits.npy", "manifest.json"]
    assert cache_lib.open_teacher_cache(path).top_k is None
    with pytest.raises(config_lib.ConfigError, match="keeps every one of the 10 classes"):
        build_teacher_cache(cfg, None, path, top_k=10)
    with pytest.raises(config_lib.ConfigError, match="positive int"):
        build_teacher_cache(cfg, None, path, top_k=0)
    with pytest.raises(config_lib.ConfigError, match="only applies to a top-k cache"):
        build_teacher_cache(cfg, None, path, temperature=2.0)
    with pytest.raises(config_lib.ConfigError, match=r"method\(s\) give none: pass temperature \(--temperature T\)"):
        build_teacher_cache(small_config(**{"teacher.workdir": teacher_wd, "method": {"name": "ce"}}),
                                      None, path, top_k=2)
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    manifest["format"] = 3
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(config_lib.ConfigError, match="reads formats 1 and 2"):
        cache_lib.open_teacher_cache(path)


def test_cli_cache_teacher_top_k(tmp_path, teacher_and_cache, capsys):
    from jaxkd import cli
    teacher_wd, _ = teacher_and_cache
    out = str(tmp_path / "cli_topk")
    cli.run(["cache-teacher", "--config", os.path.join(ROOT, "experiments/configs/digits.py"), "--workdir", out,
             "--no-progress", "--top-k", "2", "--temperature", "3", "teacher.kwargs={'width': 32}", "data.augment={}",
             f"teacher.workdir={teacher_wd}"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["top_k"] == 2 and printed["temperature"] == 3.0 and printed["logits_shape"][1:] == [1, 2]
    assert 0.2 < printed["top_k_mass"]["min"] <= printed["top_k_mass"]["mean"] <= 1.0


def test_topk_view_cache_serves_each_views_fkd_label(tmp_path, teacher_and_cache, view_cache):
    """Top-k and stored views together: every (example, view) row expands to the FKD label of
    the full-logit view cache's row, and batch_views pairs it with the same crop."""
    teacher_wd, _ = teacher_and_cache
    cfg = small_config(**{"teacher.workdir": teacher_wd, "data.augment": {"pad": 1, "flip": True}})
    path = str(tmp_path / "topk_views")
    build_teacher_cache(cfg, None, path, batch_size=128, num_views=3, view_seed=11, top_k=2)
    dense, top = cache_lib.open_teacher_cache(view_cache), cache_lib.open_teacher_cache(path)
    assert top.logits.shape == (len(dense.ids), 3, 2) and top.rest.shape == (len(dense.ids), 3)
    ids = dense.ids[::7]
    for view in range(3):
        np.testing.assert_allclose(_softmax(top.lookup(ids, view), 4.0), _fkd_label(dense.lookup(ids, view), 2, 4.0),
                                   rtol=1e-4, atol=1e-7)
    a, b = dense.batch_views(ids, epoch=5), top.batch_views(ids, epoch=5)
    np.testing.assert_array_equal(a["aug_offsets"], b["aug_offsets"])
    np.testing.assert_array_equal(a["aug_flips"], b["aug_flips"])
    np.testing.assert_allclose(_softmax(b["teacher_logits"], 4.0), _fkd_label(a["teacher_logits"], 2, 4.0),
                               rtol=1e-4, atol=1e-7)


def eight_devices_cache(ctx):
    """(In the 8-device child, tests/_eight_devices.py) the session teacher's top-k view cache built
    on 1 device and on 8, and the error for a batch size 8 devices cannot split."""
    aug = {"teacher.workdir": ctx["teacher"], "data.augment": {"pad": 1, "flip": True}}
    out = {}
    for n in (1, 8):
        out[n] = os.path.join(ctx["tmp"], f"cache{n}")
        build_teacher_cache(small_config(**aug, **{"train.num_devices": n}), None, out[n],
                                      batch_size=64, num_views=2, view_seed=3, top_k=4)
    try:
        build_teacher_cache(small_config(**aug), None, os.path.join(ctx["tmp"], "bad"), batch_size=100,
                                      num_views=2)
    except config_lib.ConfigError as e:
        out["error"] = str(e)
    return out


def test_cache_built_on_eight_devices_equals_one(eight_devices):
    """The builder splits each batch over the host's devices: 8 forced CPU devices give the
    1-device cache (same rows, classes and views; values to float32 round-off)."""
    out = eight_devices("test_teacher_cache:eight_devices_cache")
    assert "must be divisible by the number of devices (8)" in out.get("error", "")
    one, eight = (cache_lib.open_teacher_cache(out[n]) for n in ("1", "8"))
    np.testing.assert_array_equal(one.ids, eight.ids)
    for view in range(2):  # expanded rows (classes of a near-tie may swap places by round-off)
        np.testing.assert_allclose(one.lookup(one.ids, view), eight.lookup(one.ids, view), rtol=1e-5, atol=1e-5)
    assert np.mean(one.indices == eight.indices) > 0.99
    assert one.manifest["teacher"]["variables_sha256"] == eight.manifest["teacher"]["variables_sha256"]


class _Interrupt(Exception):
    pass


def _interrupt_at(stop):
    def hook(view, row):
        if (view, row) == stop:
            raise _Interrupt()
    return hook


def _recorder(calls):
    return lambda view, row: calls.append((view, row))


def _same_cache(a_path, b_path):
    a, b = cache_lib.open_teacher_cache(a_path), cache_lib.open_teacher_cache(b_path)
    for name in ("ids", "logits", "indices", "rest"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=name)  # bit for bit
    strip = lambda m: {k: v for k, v in m.items() if k != "teacher"}  # noqa: E731
    assert strip(a.manifest) == strip(b.manifest)


def test_interrupted_build_resumes_to_the_same_cache(tmp_path, teacher_and_cache, view_cache):
    teacher_wd, _ = teacher_and_cache
    cfg = small_config(**{"teacher.workdir": teacher_wd, "data.augment": {"pad": 1, "flip": True}})
    out = str(tmp_path / "c")
    kw = dict(batch_size=128, num_views=3, view_seed=11, save_every_s=0.0)
    with pytest.raises(_Interrupt):  # after view 1's 5th batch is written, before its progress record
        build_teacher_cache(cfg, None, out, on_batch=_interrupt_at((1, 640)), **kw)
    assert not os.path.exists(os.path.join(out, "manifest.json"))  # an unfinished cache cannot be opened
    with pytest.raises(config_lib.ConfigError, match="no manifest.json"):
        cache_lib.open_teacher_cache(out)
    with open(os.path.join(out, ".building", "progress.json")) as f:
        assert {k: v for k, v in json.load(f).items() if k in ("view", "row")} == {"view": 1, "row": 512}
    calls = []
    build_teacher_cache(cfg, None, out, on_batch=_recorder(calls), **kw)
    n = len(cache_lib.open_teacher_cache(view_cache).ids)
    batches = -(-n // 128)
    assert calls[0] == (1, 640) and len(calls) == (batches - 4) + batches  # the rest of view 1, all of view 2
    assert sorted(os.listdir(out)) == ["ids.npy", "logits.npy", "manifest.json"]  # .building is gone
    _same_cache(out, view_cache)
    # another plan (another view seed, another batch size) does not reuse the partial files
    for change, first in (({"view_seed": 12}, (0, 128)), ({"batch_size": 64}, (0, 64))):
        with pytest.raises(_Interrupt):
            build_teacher_cache(cfg, None, str(tmp_path / "d"), on_batch=_interrupt_at((1, 640)), **kw)
        calls = []
        build_teacher_cache(cfg, None, str(tmp_path / "d"), on_batch=_recorder(calls), **{**kw, **change})
        assert calls[0] == first and len(calls) == 3 * -(-n // (change.get("batch_size", 128)))


def test_interrupted_float16_topk_build_keeps_its_statistics(tmp_path, teacher_and_cache):
    teacher_wd, _ = teacher_and_cache
    cfg = small_config(**{"teacher.workdir": teacher_wd})
    kw = dict(batch_size=100, top_k=3, dtype="float16", save_every_s=0.0)
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    build_teacher_cache(cfg, None, whole, **kw)
    with pytest.raises(_Interrupt):
        build_teacher_cache(cfg, None, resumed, on_batch=_interrupt_at((0, 900)), **kw)
    # the record holds the rounding of the rows before it (0-799), carried into the resumed build
    with open(os.path.join(resumed, ".building", "progress.json")) as f:
        record = json.load(f)
    exact = cache_lib.open_teacher_cache(teacher_and_cache[1]).lookup(np.arange(800))  # float32, same batches
    values, _, rest = cache_lib.topk_compress(exact, 3, 4.0)
    expected = max(np.abs(values.astype(np.float16) - values).max(), np.abs(rest.astype(np.float16) - rest).max())
    assert record["row"] == 800 and record["rounding"] == pytest.approx(expected, rel=1e-9)
    build_teacher_cache(cfg, None, resumed, **kw)
    _same_cache(whole, resumed)  # incl. max_abs_rounding and top_k_mass in the manifest


KILLED_BUILD = """
import os, signal, sys
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
from test_teacher_cache import small_config
from jaxkd.train import teacher_cache as cache_lib
from jaxkd.train.cache_build import build_teacher_cache

def kill(view, row):
    if (view, row) == (1, 640):  # rows written, progress record not: the worst moment
        os.kill(os.getpid(), signal.SIGKILL)

cfg = small_config(**{"teacher.workdir": sys.argv[1], "data.augment": {"pad": 1, "flip": True}})
build_teacher_cache(cfg, None, sys.argv[2], batch_size=128, num_views=3, view_seed=11, save_every_s=0.0,
                              on_batch=kill)
"""


def test_build_killed_by_sigkill_resumes_to_the_same_cache(tmp_path, teacher_and_cache, view_cache, data_dir):
    import subprocess
    import sys
    teacher_wd, _ = teacher_and_cache
    out = str(tmp_path / "killed")
    proc = subprocess.run([sys.executable, "-c", KILLED_BUILD, teacher_wd, out], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, JAXKD_DATA_DIR=data_dir), cwd=ROOT)
    assert proc.returncode == -9, proc.stderr[-2000:]
    cfg = small_config(**{"teacher.workdir": teacher_wd, "data.augment": {"pad": 1, "flip": True}})
    calls = []
    build_teacher_cache(cfg, None, out, batch_size=128, num_views=3, view_seed=11,
                                  on_batch=_recorder(calls))
    assert calls[0] == (1, 640)  # resumed at view 1, batch 5
    _same_cache(out, view_cache)


def _failing_replace(monkeypatch, should_fail):
    """``os.replace`` that raises once for the first (src, dst) ``should_fail`` accepts."""
    real, state = os.replace, {"failed": False}

    def replace(src, dst, *a, **k):
        if not state["failed"] and should_fail(str(src), str(dst)):
            state["failed"] = True
            raise _Interrupt()
        return real(src, dst, *a, **k)
    monkeypatch.setattr(cache_lib.os, "replace", replace)
    return state


def test_crash_while_moving_the_finished_files_only_completes_the_move(tmp_path, teacher_and_cache, view_cache,
                                                                        monkeypatch):
    teacher_wd, _ = teacher_and_cache
    cfg = small_config(**{"teacher.workdir": teacher_wd, "data.augment": {"pad": 1, "flip": True}})
    out = str(tmp_path / "c")
    kw = dict(batch_size=128, num_views=3, view_seed=11)
    state = _failing_replace(monkeypatch, lambda src, dst: dst == os.path.join(out, "ids.npy"))  # after logits.npy
    with pytest.raises(_Interrupt):
        build_teacher_cache(cfg, None, out, **kw)
    monkeypatch.undo()
    assert state["failed"] and not os.path.exists(os.path.join(out, "manifest.json"))
    assert os.path.exists(os.path.join(out, "logits.npy"))  # moved before the crash
    calls = []
    build_teacher_cache(cfg, None, out, on_batch=_recorder(calls), **kw)
    assert calls == []  # nothing recomputed
    _same_cache(out, view_cache)
    assert not os.path.exists(os.path.join(out, ".building"))


def test_partial_build_sorts_rows_read_out_of_id_order_and_survives_a_crash(tmp_path, monkeypatch):
    """Splits read out of id order: rows are sorted by id inside .building before anything moves,
    and a crash while sorting leaves the unsorted rows to sort again."""
    folder, out = str(tmp_path / "out" / ".building"), str(tmp_path / "out")
    n = 70000  # more than one copy chunk (65,536 rows)
    shapes = {cache_lib.LOGITS: ((n, 1, 3), np.float32), cache_lib.IDS: ((n,), np.int64)}
    ids = np.random.default_rng(0).permutation(n) * 3 + 5
    work = cache_build._PartialBuild(folder, "plan", shapes)
    work.arrays[cache_lib.IDS][:] = ids
    work.arrays[cache_lib.LOGITS][:] = (ids[:, None, None] * np.array([1.0, 2.0, 3.0])).astype(np.float32)
    work.save(1, 0)
    names = [cache_lib.LOGITS, cache_lib.IDS]
    _failing_replace(monkeypatch, lambda src, dst: dst.endswith("sorted_ids.npy"))
    with pytest.raises(_Interrupt):
        work.finish(out, names, {"format": 1})
    monkeypatch.undo()
    work = cache_build._PartialBuild(folder, "plan", shapes)  # resumes: the record was not "finishing"
    assert not work.finishing and work.view == 1
    np.testing.assert_array_equal(work.arrays[cache_lib.IDS], ids)  # sources untouched
    work.finish(out, names, {"format": 1})
    got_ids = np.load(os.path.join(out, "ids.npy"))
    np.testing.assert_array_equal(got_ids, np.sort(ids))
    np.testing.assert_array_equal(np.load(os.path.join(out, "logits.npy"))[:, 0, 2], (got_ids * 3).astype(np.float32))
    assert sorted(os.listdir(out)) == ["ids.npy", "logits.npy", "manifest.json"]
    # a duplicate id is refused before anything is written
    work = cache_build._PartialBuild(str(tmp_path / "dup" / ".building"), "p", {cache_lib.IDS: ((3,), np.int64)})
    work.arrays[cache_lib.IDS][:] = [4, 1, 4]
    with pytest.raises(ValueError, match="duplicate example ids"):
        work.finish(str(tmp_path / "dup"), [cache_lib.IDS], {})
