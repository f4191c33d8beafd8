"""The generic loop end to end: resume equivalence, sharding equivalence, errors, teacher > student."""

import json
import os

import jax
import numpy as np
import pytest

from jaxkd import config as config_lib
from jaxkd.experiment import teacher_config
from jaxkd.train import checkpoint as ckpt_lib
from jaxkd.train.loop import TrainingError, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**over):
    c = config_lib.load_config(os.path.join(ROOT, "experiments/configs/digits.py"))
    c.train.num_epochs = 2
    c.train.progress = False
    c.train.tensorboard = False
    c.data.batch_size = 64
    return config_lib.apply_overrides(c, [f"{k}={v!r}" for k, v in over.items()])


def _student_params(workdir):
    from orbax import checkpoint as ocp
    mgr = ckpt_lib.run_manager(workdir)
    r = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return jax.tree.map(np.asarray, r.state)


@pytest.fixture(scope="module")
def trained_teacher(digits_teacher):
    return digits_teacher


def test_resume_equals_uninterrupted(tmp_path, trained_teacher):
    teacher_wd, _ = trained_teacher
    over = {"teacher.workdir": teacher_wd, "train.checkpoint_every_steps": 7}
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    full = train_and_evaluate(small_config(**over), a)
    # b: "killed" after step 14 (mid-epoch 1), then resumed with the same config
    partial = train_and_evaluate(small_config(**over), b, stop_after_steps=14)
    assert partial["steps"] == 14
    resumed = train_and_evaluate(small_config(**over), b)
    pa, pb = _student_params(a), _student_params(b)
    jax.tree.map(np.testing.assert_array_equal, pa, pb)
    assert full["last_accuracy"] == resumed["last_accuracy"]
    ha = [json.loads(ln) for ln in open(os.path.join(a, "metrics.jsonl"))]
    hb = [json.loads(ln) for ln in open(os.path.join(b, "metrics.jsonl"))]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time_s"} for r in rs]  # noqa: E731
    assert strip(ha) == strip(hb)


def test_teacher_not_in_student_checkpoint(tmp_path, trained_teacher):
    teacher_wd, _ = trained_teacher
    wd = str(tmp_path / "kd")
    train_and_evaluate(small_config(**{"teacher.workdir": teacher_wd, "train.num_epochs": 1}), wd)
    state = _student_params(wd)
    assert set(state["params"]) == {"student", "aux"}
    n_student = sum(x.size for x in jax.tree.leaves(state["params"]))
    from jaxkd import models
    t = models.create_model("cnn", 10, width=32)
    n_teacher = sum(x.size for x in jax.tree.leaves(t.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1)))["params"]))
    assert n_student < n_teacher  # the (bigger) teacher is not stored


def test_teacher_mismatch_names_path(tmp_path, trained_teacher):
    teacher_wd, _ = trained_teacher
    cfg = small_config(**{"teacher.workdir": teacher_wd, "teacher.kwargs": {"width": 16}})
    with pytest.raises(ckpt_lib.CheckpointError, match=r"shape .* the model expects"):
        train_and_evaluate(cfg, str(tmp_path / "x"))
    cfg = small_config(**{"teacher.workdir": teacher_wd, "teacher.name": "mlp", "teacher.kwargs": {}})
    with pytest.raises(ckpt_lib.CheckpointError, match="does not fit the teacher model"):
        train_and_evaluate(cfg, str(tmp_path / "y"))
    cfg = small_config(**{"teacher.workdir": teacher_wd, "teacher.kwargs": {"widht": 32}})
    with pytest.raises(config_lib.ConfigError, match="config.teacher: .*widht"):
        train_and_evaluate(cfg, str(tmp_path / "z"))


def test_config_change_on_resume_refused(tmp_path, trained_teacher):
    teacher_wd, _ = trained_teacher
    wd = str(tmp_path / "r")
    train_and_evaluate(small_config(**{"teacher.workdir": teacher_wd}), wd, stop_after_steps=22)
    with pytest.raises(TrainingError, match=r"data.batch_size: 64 -> 32"):
        train_and_evaluate(small_config(**{"teacher.workdir": teacher_wd, "data.batch_size": 32}), wd)
    with pytest.raises(TrainingError, match=r"data.val_fraction: 0.0 -> 0.1"):
        train_and_evaluate(small_config(**{"teacher.workdir": teacher_wd, "data.val_fraction": 0.1}), wd)
    # checkpoints written before data.val_fraction existed resume as val_fraction 0
    from jaxkd.train.loop import config_differences
    old = small_config().to_dict()
    del old["data"]["val_fraction"]
    assert config_differences(old, small_config().to_dict()) == []
    assert config_differences(old, small_config(**{"data.val_fraction": 0.2}).to_dict()) == \
        ["data.val_fraction: 0.0 -> 0.2"]


def test_bad_config_values(tmp_path, data_dir):
    with pytest.raises(config_lib.ConfigError, match="optim.lr"):
        config_lib.validate(small_config(**{"optim.lr": -1.0}))
    # names are checked where they are built (jaxkd.train.setup), before any step
    with pytest.raises(config_lib.ConfigError, match="config.model: unknown model 'resnet33'. Did you mean"):
        train_and_evaluate(small_config(**{"model.name": "resnet33"}), str(tmp_path / "m"))
    with pytest.raises(config_lib.ConfigError, match="config.method.name: unknown method 'hinton'; did you mean"):
        train_and_evaluate(small_config(**{"method.name": "hinton"}), str(tmp_path / "h"))
    with pytest.raises(config_lib.ConfigError, match="config.optim.name: 'sgdd' is not an optax optimizer; did you"):
        train_and_evaluate(small_config(**{"optim.name": "sgdd", "method.name": "ce"}), str(tmp_path / "o"))
    with pytest.raises(config_lib.ConfigError, match="unknown config key 'optim.learning_rate'"):
        small_config(**{"optim.learning_rate": 0.1})
    with pytest.raises(config_lib.ConfigError, match="divisible by the number of devices"):
        config_lib.validate(small_config(**{"data.batch_size": 30}), num_devices=8)
    with pytest.raises(config_lib.ConfigError, match="teacher.workdir"):
        train_and_evaluate(small_config(), str(tmp_path / "t"))
    for bad in (1.0, -0.1, "0.1", True):
        with pytest.raises(config_lib.ConfigError, match="data.val_fraction"):
            config_lib.validate(small_config(**{"data.val_fraction": bad}))


def test_val_fraction_picks_the_best_checkpoint_on_held_out_training_examples(tmp_path, data_dir):
    from jaxkd import models as models_lib
    from jaxkd.train import step as step_lib
    from jaxkd.train.setup import training_sources
    cfg = teacher_config(small_config(**{"train.num_epochs": 4, "data.val_fraction": 0.25, "optim.lr": 0.02}))
    info, train_src, val_src, eval_src = training_sources(cfg)
    n_all = len(training_sources(small_config())[1])
    assert len(val_src) == round(0.25 * n_all) and len(train_src) + len(val_src) == n_all
    assert set(train_src.ids).isdisjoint(val_src.ids) and info.num_train == len(train_src)

    wd = str(tmp_path / "run")
    summary = train_and_evaluate(cfg, wd)
    history = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    val_acc = [r["val/accuracy"] for r in history]
    # the first epoch with the highest validation accuracy, ties going to the lower validation loss
    best = max(range(len(history)), key=lambda i: (val_acc[i], -history[i]["val/loss"], -i))
    assert summary["selected_on"] == "val" and summary["num_val"] == len(val_src)
    assert summary["best_epoch"] == history[best]["epoch"]
    assert summary["best_val_accuracy"] == val_acc[best]
    assert summary["best_accuracy"] == history[best]["eval/accuracy"]  # reported on the test split
    # the best checkpoint is that epoch's student: its accuracy on the held-out examples, computed here
    model = models_lib.create_model(cfg.model.name, info.num_classes, **dict(cfg.model.kwargs))
    template = model.init(jax.random.PRNGKey(0), np.zeros((1, *info.input_shape), np.float32))
    variables, meta = ckpt_lib.load_model_variables(wd, template, "best")
    assert meta["epoch"] == summary["best_epoch"] and meta["val_accuracy"] == summary["best_val_accuracy"]
    pipeline = step_lib.InputPipeline(mean=info.mean, std=info.std)
    batch = val_src.gather(np.arange(len(val_src)))
    logits = model.apply(variables, pipeline(None, batch["image"], train=False), train=False)[0]
    correct = np.asarray(logits).argmax(-1) == batch["label"]
    assert abs(correct.mean() - summary["best_val_accuracy"]) < 1e-9
    # without val_fraction the eval split picks, as before
    plain = train_and_evaluate(teacher_config(small_config(**{"train.num_epochs": 1})), str(tmp_path / "plain"))
    assert plain["selected_on"] == "eval_split" and plain["best_val_accuracy"] is None and plain["num_val"] == 0


def test_teacher_beats_baseline_and_kd_runs(tmp_path, trained_teacher, data_dir):
    """End to end on digits: the CNN teacher beats the MLP baseline trained the same way, and a KD
    run distils from that teacher (its summary names the teacher's accuracy) with the logged loss
    equal to 0.1 CE + 0.9 KD, the config's weights."""
    teacher_wd, t_sum = trained_teacher
    base = train_and_evaluate(small_config(**{"method.name": "ce", "train.num_epochs": 3}), str(tmp_path / "b"))
    assert t_sum["best_accuracy"] > 0.9
    assert t_sum["best_accuracy"] > base["best_accuracy"] + 0.02
    kd = train_and_evaluate(small_config(**{"teacher.workdir": teacher_wd, "train.num_epochs": 3,
                                            "train.tensorboard": True}),
                            str(tmp_path / "k"))
    assert kd["teacher_accuracy"] == pytest.approx(t_sum["best_accuracy"])
    for rec in (json.loads(ln) for ln in open(os.path.join(tmp_path, "k", "metrics.jsonl"))):
        assert rec["train/loss"] == pytest.approx(0.1 * rec["train/ce"] + 0.9 * rec["train/kd"], rel=1e-5)
        assert rec["train/teacher_accuracy"] > 0.85  # the trained teacher, not a fresh one
    for name in ("metrics.jsonl", "summary.json"):
        assert os.path.exists(os.path.join(tmp_path, "k", name))
    events = os.listdir(os.path.join(tmp_path, "k", "tensorboard"))
    assert any(e.startswith("events.out.tfevents") for e in events)


def eight_devices_kd_step(ctx):
    """(In the 8-device child, tests/_eight_devices.py) six KD steps of a cnn student on 1 device and
    on 8, from the same state and batches."""
    import jax.numpy as jnp
    import optax

    from jaxkd import models
    from jaxkd.train import InputPipeline, create_train_state, make_mesh, make_train_step, recipes, shard_batch

    student, teacher = models.create_model("cnn", 10, width=8), models.create_model("cnn", 10, width=16)
    sample = jnp.zeros((1, 8, 8, 1))
    t_vars = teacher.init(jax.random.PRNGKey(1), sample)
    recipe = recipes.hinton_kd_recipe()
    tx = optax.sgd(0.05, momentum=0.9)
    rng = np.random.default_rng(0)
    batches = [{"image": rng.integers(0, 255, (32, 8, 8, 1), dtype=np.uint8),
                "label": rng.integers(0, 10, 32).astype(np.int32)} for _ in range(6)]
    out = {}
    for n in (1, 8):
        mesh = make_mesh(n)
        state = jax.device_put(create_train_state(jax.random.PRNGKey(0), student, recipe, tx, sample),
                               jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        step = make_train_step(student, recipe, tx, InputPipeline((0.5,), (0.25,), pad=1, flip=True),
                               teacher=teacher, mesh=mesh)
        losses = []
        for b in batches:
            state, m = step(state, t_vars, shard_batch(b, mesh))
            losses.append(float(m["loss"]))  # block every step (XLA:CPU collectives)
        out[n] = {"losses": losses,
                  "params": [np.asarray(x).ravel().tolist()[:50] for x in jax.tree.leaves(state.params)],
                  "bn": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state.model_state["student"])]}
    return out


def test_one_vs_eight_devices_same_numbers(eight_devices):
    out = eight_devices("test_train:eight_devices_kd_step")
    np.testing.assert_allclose(out["1"]["losses"], out["8"]["losses"], rtol=1e-5, atol=1e-6)
    for a, b in zip(out["1"]["params"] + out["1"]["bn"], out["8"]["params"] + out["8"]["bn"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def eight_devices_loop(ctx):
    """(In the 8-device child) one epoch of KD from the session's teacher through the whole loop
    (train, padded eval, checkpoint) on 1 device and on 8."""
    out = {}
    for n in (1, 8):
        wd = os.path.join(ctx["tmp"], f"loop_dev{n}")
        train_and_evaluate(small_config(**{"train.num_epochs": 1, "train.num_devices": n,
                                           "data.num_train_examples": 320, "teacher.workdir": ctx["teacher"]}), wd)
        out[n] = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    return out


def test_loop_on_eight_devices_matches_one(eight_devices):
    """The whole loop (train, padded eval, checkpoint) on 8 forced CPU devices vs 1."""
    out = eight_devices("test_train:eight_devices_loop")
    one, eight = out["1"][-1], out["8"][-1]
    for key in ("train/loss", "train/accuracy", "train/kd", "eval/loss", "eval/accuracy"):
        assert one[key] == pytest.approx(eight[key], rel=1e-4, abs=1e-5), key


def test_bfloat16_teacher_is_stored_and_run_in_bfloat16(tmp_path, trained_teacher):
    import jax.numpy as jnp

    from jaxkd import models
    from jaxkd.train.setup import load_teacher

    teacher_dir, _ = trained_teacher
    runs = {}
    for name, kwargs in (("f32", {"width": 32}), ("bf16", {"width": 32, "dtype": "bfloat16"})):
        cfg = small_config(**{"teacher.workdir": teacher_dir, "teacher.kwargs": kwargs, "train.num_epochs": 1})
        if name == "bf16":
            fns = models.create_model("cnn", 10, **kwargs)
            variables, _ = load_teacher(cfg, fns, jnp.zeros((1, 8, 8, 1)))
            dtypes = {x.dtype for x in jax.tree.leaves(variables)}
            assert dtypes == {jnp.dtype(jnp.bfloat16)}, dtypes
        train_and_evaluate(cfg, str(tmp_path / name))
        with open(tmp_path / name / "metrics.jsonl") as f:
            runs[name] = json.loads(f.readline())
    f32, bf16 = runs["f32"], runs["bf16"]
    # the same teacher to bfloat16 precision: its train-batch accuracy within 1 point, KD close
    assert abs(f32["train/teacher_accuracy"] - bf16["train/teacher_accuracy"]) < 0.01
    assert f32["train/kd"] != bf16["train/kd"]  # it really ran in bfloat16
    np.testing.assert_allclose(bf16["train/kd"], f32["train/kd"], rtol=0.05)


def test_best_selection_order_and_its_orbax_score():
    improves, score = ckpt_lib.improves, ckpt_lib.selection_score
    assert improves((0.5,), None) and improves((0.6,), (0.5,))
    assert not improves((0.5,), (0.5,))  # eval-split selection: a tie keeps the earlier epoch
    assert improves((0.9, -0.30), (0.9, -0.31)) and not improves((0.9, -0.31), (0.9, -0.30))
    assert improves((0.91, -5.0), (0.9, -0.01))  # accuracy first
    assert ckpt_lib.best_key_so_far({"best_accuracy": 0.7}) == (0.7,)  # a run saved before keys
    assert ckpt_lib.best_key_so_far({"best_accuracy": 0.7, "best_key": [0.8, -0.2]}) == (0.8, -0.2)
    assert ckpt_lib.best_key_so_far({"best_accuracy": None}) is None
    # Orbax keeps the checkpoint with the highest score: it must order keys as improves does
    rng = np.random.default_rng(0)
    keys = [(rng.integers(0, 500) / 500, -float(rng.exponential(2.0))) for _ in range(300)]
    keys += [(0.5, -0.25), (0.5, -0.2500001), (1.0, 0.0), (0.0, -1e6)]
    for a in keys[::7]:
        for b in keys:
            assert (score(a) > score(b)) == improves(a, b), (a, b)


def test_curves_plot_validation_next_to_test_accuracy(tmp_path, monkeypatch):
    from jaxkd import experiment
    runs = {"kd": {0: ([0.5, 0.7, 0.8], [0.55, 0.75, 0.7]), 1: ([0.6, 0.65, 0.9], [0.6, 0.8, 0.85])},
            "baseline": {0: ([0.4, 0.5, 0.6], None)}}
    for name, seeds in runs.items():
        for seed, (test, val) in seeds.items():
            os.makedirs(tmp_path / name / f"seed{seed}")
            with open(tmp_path / name / f"seed{seed}" / "metrics.jsonl", "w") as f:
                for e, acc in enumerate(test, 1):
                    rec = {"epoch": e, "eval/accuracy": acc, **({"val/accuracy": val[e - 1]} if val else {})}
                    f.write(json.dumps(rec) + "\n")
    drawn = []
    plot_mean = experiment._plot_mean
    monkeypatch.setattr(experiment, "_plot_mean", lambda ax, curves, label, ls, **kw: (
        drawn.append((label, ls, experiment.mean_curve(curves))), plot_mean(ax, curves, label, ls, **kw))[1])
    assert os.path.exists(experiment.plot_curves(str(tmp_path), ["baseline", "kd"]))
    by_label = {label: (ls, curve) for label, ls, curve in drawn}
    assert set(by_label) == {"baseline (n=1)", "kd (n=2)", "kd validation"}  # no validation curve without one
    ls, (epochs, mean) = by_label["kd validation"]
    assert ls == ":" and epochs == [1, 2, 3]
    np.testing.assert_allclose(mean, np.mean([[0.55, 0.75, 0.7], [0.6, 0.8, 0.85]], axis=0))
    np.testing.assert_allclose(by_label["kd (n=2)"][1][1], [0.55, 0.675, 0.85])
