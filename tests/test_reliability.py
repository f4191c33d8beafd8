"""Checkpoints verified by checksum, a fallback resume that reconciles everything written ahead
of the restored step, and saves that fail (issue 20)."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
from orbax import checkpoint as ocp

from jaxkd import config as config_lib
from jaxkd.errors import CheckpointError
from jaxkd.train import checkpoint as ckpt_lib
from jaxkd.train.loop import TrainingError, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS_PER_EPOCH = 6  # 384 digits, batch 64


def _config(method="ce", **over):
    c = config_lib.load_config(os.path.join(ROOT, "experiments/configs/digits.py"))
    c.train.progress = False
    c.train.tensorboard = True
    c.train.num_epochs = 3
    c.train.checkpoint_every_steps = 0  # epoch ends only
    c.data.num_train_examples = 384
    if method == "apprentice":
        c.teacher.kwargs = {"width": 8, "hidden": 32}
        c.method = {"name": "apprentice", "teacher_optim": {"lr": 0.02}}
    else:
        c.method = {"name": "ce"}
    return config_lib.apply_overrides(c, [f"{k}={v!r}" for k, v in over.items()])


# --------------------------------------------------------------------------------------------
# What a run leaves behind, for bit-for-bit comparisons
# --------------------------------------------------------------------------------------------


def _tb_scalars(workdir):
    """(tag, step, value) of every scalar in the TensorBoard event files (TFRecord framing read
    by hand; the events parsed with tensorboardX's protos)."""
    from tensorboardX.proto import event_pb2
    out = []
    folder = os.path.join(workdir, "tensorboard")
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            blob = f.read()
        pos = 0
        while pos < len(blob):
            (n,) = struct.unpack("<Q", blob[pos:pos + 8])
            ev = event_pb2.Event.FromString(blob[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                if v.tag != "time_s":
                    out.append((v.tag, ev.step, v.simple_value))
    return sorted(out)


def _history(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(ln).items() if k != "time_s"} for ln in f]


def _summary(path):
    with open(path) as f:
        s = json.load(f)
    return {k: v for k, v in s.items() if k not in ("train_time_s", "images_per_s")}


def _best(workdir):
    """(step, arrays, meta) of the best checkpoint in ``workdir`` (verified)."""
    mgr = ckpt_lib.best_manager(workdir)
    steps = mgr.all_steps()
    assert len(steps) == 1, steps
    model, meta = ckpt_lib.restore_on_this_process(mgr, steps[0], "model")
    return steps[0], jax.tree.map(np.asarray, model), meta


def _final_state(workdir):
    return ckpt_lib.load_run_state(workdir)


def _assert_same_run(ref, run, joint=False, same_config=True):
    s_ref, s_run = _final_state(ref), _final_state(run)
    assert s_ref[0] == s_run[0]
    jax.tree.map(np.testing.assert_array_equal, s_ref[1], s_run[1])
    assert _history(ref) == _history(run)
    assert _tb_scalars(ref) == _tb_scalars(run)
    assert _summary(os.path.join(ref, "summary.json")) == _summary(os.path.join(run, "summary.json"))
    dirs = [""] + (["joint_teacher"] if joint else [])
    for sub in dirs:
        b_ref, b_run = _best(os.path.join(ref, sub)), _best(os.path.join(run, sub))
        if not same_config:  # the best checkpoint's meta records the config
            b_ref[2].pop("config"), b_run[2].pop("config")
        assert b_ref[0] == b_run[0] and b_ref[2] == b_run[2]
        jax.tree.map(np.testing.assert_array_equal, b_ref[1], b_run[1])
    if joint:
        assert (_summary(os.path.join(ref, "joint_teacher", "summary.json"))
                == _summary(os.path.join(run, "joint_teacher", "summary.json")))


# --------------------------------------------------------------------------------------------
# Damage
# --------------------------------------------------------------------------------------------


def _alter_array(step_dir, item="state"):
    """Rewrites ``step_dir/item`` with one parameter changed by 1e-3: valid files that Orbax
    restores without complaint (the silent corruption a flipped byte can cause)."""
    with ocp.StandardCheckpointer() as c:
        tree = c.restore(os.path.join(step_dir, item))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    target = next(i for i, (p, _) in enumerate(leaves) if "kernel" in jax.tree_util.keystr(p))
    values = [np.asarray(v) for _, v in leaves]
    values[target] = values[target] + np.float32(1e-3)
    tmp = step_dir + ".altered"
    with ocp.StandardCheckpointer() as c:
        c.save(tmp, jax.tree_util.tree_unflatten(treedef, values))
    shutil.rmtree(os.path.join(step_dir, item))
    shutil.move(tmp, os.path.join(step_dir, item))


def _alter_meta(step_dir):
    path = os.path.join(step_dir, "meta", "metadata")
    with open(path) as f:
        meta = json.load(f)
    meta["history"][-1]["train/loss"] += 0.5
    with open(path, "w") as f:
        json.dump(meta, f)


def _flip_bytes(step_dir):
    """The issue's damage: one byte flipped a third of the way into each array data file."""
    folder = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        with open(path, "r+b") as f:
            data = bytearray(f.read())
            data[len(data) // 3] ^= 0xFF
            f.seek(0)
            f.write(data)


# --------------------------------------------------------------------------------------------
# Checksums (unit)
# --------------------------------------------------------------------------------------------


def test_checksums_catch_a_changed_value_dtype_shape_and_a_missing_leaf():
    tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": {"c": np.int32(7)}}
    rec = ckpt_lib.checksums_of(5, {"state": tree}, {"meta": {"x": [1.5, 2], "y": None}})
    assert ckpt_lib.verify_checksums(rec, {"state": tree}, {"meta": {"y": None, "x": [1.5, 2]}}) is None
    bumped = {"a": tree["a"].copy(), "b": tree["b"]}
    bumped["a"][1, 2] = np.nextafter(bumped["a"][1, 2], np.float32(10))  # one ulp
    assert "a does not match" in ckpt_lib.verify_checksums(rec, {"state": bumped}, {})
    as_int = {"a": tree["a"].astype(np.int32), "b": tree["b"]}
    assert ckpt_lib.verify_checksums(rec, {"state": as_int}, {}) is not None
    reshaped = {"a": tree["a"].reshape(3, 2), "b": tree["b"]}
    assert ckpt_lib.verify_checksums(rec, {"state": reshaped}, {}) is not None
    assert "b/c is recorded but was not restored" in ckpt_lib.verify_checksums(rec, {"state": {"a": tree["a"]}}, {})
    assert "'meta' does not match" in ckpt_lib.verify_checksums(rec, {}, {"meta": {"x": [1.5, 2.0001], "y": None}})
    # a digest is of the bytes: an independent SHA-256 of dtype, shape and bytes
    import hashlib
    h = hashlib.sha256()
    h.update(b"<f4|(2, 3)|")
    h.update(np.arange(6, dtype="<f4").tobytes())
    assert rec["arrays"]["state"]["a"] == h.hexdigest()
    # a single process agrees with itself
    assert ckpt_lib.agree(None) is None and ckpt_lib.agree("bad") == "bad"


# --------------------------------------------------------------------------------------------
# Damaged steps are found and set aside
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """An uninterrupted CE run (3 epochs of 6 steps)."""
    wd = str(tmp_path_factory.mktemp("reliab") / "ref")
    train_and_evaluate(_config(), wd)
    return wd


@pytest.mark.parametrize("damage", ["array", pytest.param("meta", marks=pytest.mark.slow)])
def test_silently_damaged_newest_step_is_detected_and_the_run_ends_as_uninterrupted(tmp_path, reference, damage):
    """A checkpoint whose files are valid but whose values changed restored silently before;
    now its checksums do not match: it is set aside, the run resumes from the older step, and
    (best/, metrics, TensorBoard, summary reconciled) ends exactly like the uninterrupted run."""
    run = str(tmp_path / "run")
    train_and_evaluate(_config(), run, stop_after_steps=2 * STEPS_PER_EPOCH)
    newest = os.path.join(run, "checkpoints", str(2 * STEPS_PER_EPOCH))
    (_alter_array if damage == "array" else _alter_meta)(newest)
    with pytest.warns(RuntimeWarning, match=rf"checkpoint step {2 * STEPS_PER_EPOCH} .* unusable .*checksum"):
        train_and_evaluate(_config(), run)
    assert os.path.isdir(newest + ".unusable")
    _assert_same_run(reference, run)


def test_flipped_bytes_never_restore_silently(tmp_path, reference):
    """The issue's damage (a byte flipped in every array file): the step is refused, or what it
    gives is exactly what was saved; never altered values."""
    run = str(tmp_path / "run")
    shutil.copytree(reference, run)
    newest = max(ckpt_lib.run_manager(run).all_steps())
    saved = _final_state(reference)[1]
    _flip_bytes(os.path.join(run, "checkpoints", str(newest)))
    try:
        _, state = ckpt_lib.load_run_state(run, newest)
    except CheckpointError as e:
        assert f"checkpoints/{newest} is damaged" in str(e)
    else:
        jax.tree.map(np.testing.assert_array_equal, saved, state)


def test_newest_verified_step_skips_a_damaged_step(tmp_path, reference, data_dir):
    from jaxkd.train import setup as setup_lib
    from jaxkd.train import step as step_lib
    run = str(tmp_path / "run")
    shutil.copytree(reference, run)
    mgr = ckpt_lib.run_manager(run)
    steps = sorted(mgr.all_steps())
    setup = setup_lib.build_run(config_lib.apply_overrides(_config(), []), step_lib.make_mesh(None))
    assert ckpt_lib.newest_verified_step(mgr, setup.state_template) == steps[-1]
    _alter_array(os.path.join(run, "checkpoints", str(steps[-1])))
    assert ckpt_lib.newest_verified_step(mgr, setup.state_template) == steps[-2]


# --------------------------------------------------------------------------------------------
# best/: a damaged best is an error, never replaced by another checkpoint
# --------------------------------------------------------------------------------------------


def _template(name="mlp", **kw):
    import jax.numpy as jnp

    from jaxkd import models
    return models.create_model(name, 10, **kw).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))


def test_damaged_best_checkpoint_is_a_clear_error_naming_it(tmp_path, reference):
    run = str(tmp_path / "run")
    shutil.copytree(reference, run)
    template = _template(hidden=(32,))
    good, _ = ckpt_lib.load_model_variables(run, template)
    (step,) = ckpt_lib.best_manager(run).all_steps()
    _alter_array(os.path.join(run, "best", str(step)), "model")
    with pytest.raises(CheckpointError, match=rf"best checkpoint of the teacher is unusable: checkpoint "
                                              rf"{os.path.join(run, 'best', str(step))} is damaged: .*checksum"
                                              rf".*teacher.checkpoint=last"):
        ckpt_lib.load_model_variables(run, template)
    # asking for the latest run checkpoint still works
    last, _ = ckpt_lib.load_model_variables(run, template, "last")
    assert jax.tree.leaves(last) and all(np.isfinite(x).all() for x in jax.tree.leaves(last))
    del good
    # and without a best/ at all: an error too, not the latest checkpoint in its place
    shutil.rmtree(os.path.join(run, "best"))
    with pytest.raises(CheckpointError, match="no best checkpoint of the teacher"):
        ckpt_lib.load_model_variables(run, template)


# --------------------------------------------------------------------------------------------
# Fallback resume reconciles best/, joint_teacher/, metrics, TensorBoard, summaries
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ce", pytest.param("apprentice", marks=pytest.mark.slow)])
def test_fallback_past_a_best_checkpoint_ends_as_uninterrupted(tmp_path, data_dir, reference, method):
    """The issue's crash: best/ (and Apprentice's joint_teacher/best) hold a step newer than the
    one the run falls back to. Stopped right after step 12 (both saved and finalised), step 12
    damaged: the run resumes from 6, saves step 12's best again and ends bit-identical."""
    ref, run = reference, str(tmp_path / "run")
    if method != "ce":
        ref = str(tmp_path / "ref")
        train_and_evaluate(_config(method), ref)
    train_and_evaluate(_config(method), run, stop_after_steps=2 * STEPS_PER_EPOCH)
    joint = method == "apprentice"
    for sub in [""] + (["joint_teacher"] if joint else []):  # what makes the fallback hard
        assert 2 * STEPS_PER_EPOCH in ckpt_lib.best_manager(os.path.join(run, sub)).all_steps(), sub
    _alter_array(os.path.join(run, "checkpoints", str(2 * STEPS_PER_EPOCH)))
    with pytest.warns(RuntimeWarning, match="unusable"):
        train_and_evaluate(_config(method), run)
    _assert_same_run(ref, run, joint=joint)


# --------------------------------------------------------------------------------------------
# A save that fails
# --------------------------------------------------------------------------------------------


def test_failed_save_stops_with_one_line_and_the_rerun_resumes(tmp_path, reference, monkeypatch):
    run = str(tmp_path / "run")
    cfg = _config(**{"train.checkpoint_every_steps": 4})  # saves at 4, 6, 8, 12, ...
    monkeypatch.setenv("JAXKD_FAULT", "oserror_during_save:8")
    with pytest.raises(CheckpointError, match=r"writing a checkpoint in .* failed \(.*No space left on device") as e:
        train_and_evaluate(cfg, run)
    assert "\n" not in str(e.value) and "run the same command again" in str(e.value)
    mgr = ckpt_lib.run_manager(run)
    assert sorted(mgr.all_steps()) == [4, 6]  # step 8 never finalised; the earlier ones intact
    for step in (4, 6):
        ckpt_lib.load_run_state(run, step)  # verified
    monkeypatch.delenv("JAXKD_FAULT")
    out = train_and_evaluate(cfg, run)
    assert out["steps"] == 3 * STEPS_PER_EPOCH
    _assert_same_run(reference, run, same_config=False)  # saving more often changes nothing else


# --------------------------------------------------------------------------------------------
# The same with real kills (SIGKILL), through the command line
# --------------------------------------------------------------------------------------------


def _cmd(workdir, method):
    extra = (["method.name=apprentice", "teacher.kwargs={'width': 8, 'hidden': 32}",
              "method.teacher_optim={'lr': 0.02}"] if method == "apprentice" else ["method.name=ce"])
    return [sys.executable, "-m", "jaxkd.cli", "train", "--config", os.path.join(ROOT, "experiments/configs/digits.py"),
            "--workdir", workdir, "train.num_epochs=3", "train.checkpoint_every_steps=0", "train.progress=False",
            "data.num_train_examples=384"] + extra


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ce", "apprentice"])
def test_killed_after_a_save_newest_step_damaged_rerun_matches_uninterrupted(tmp_path, data_dir, method):
    """The issue's reproduction with a SIGKILL: killed once step 12 (and its best checkpoints) is
    finalised, step 12 damaged, the same command run again: bit-identical to a run never killed."""
    env = dict(os.environ, JAXKD_DATA_DIR=data_dir)
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    subprocess.run(_cmd(ref, method), check=True, env=env, timeout=300, capture_output=True)
    killed = subprocess.run(_cmd(run, method), env=dict(env, JAXKD_FAULT=f"kill_after_save:{2 * STEPS_PER_EPOCH}"),
                            timeout=300, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    _flip_bytes(os.path.join(run, "checkpoints", str(2 * STEPS_PER_EPOCH)))
    _alter_array(os.path.join(run, "checkpoints", str(2 * STEPS_PER_EPOCH)))  # in case the flips were caught anyway
    rerun = subprocess.run(_cmd(run, method), env=env, timeout=300, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"jaxkd: resuming from checkpoint step {STEPS_PER_EPOCH}" in rerun.stdout
    _assert_same_run(ref, run, joint=method == "apprentice")


def test_non_finite_message_names_only_a_verified_checkpoint(tmp_path, data_dir, monkeypatch):
    """The last good checkpoint named when a run diverges is one that verifies."""
    from jaxkd.train import loop as loop_lib

    real = ckpt_lib.save_run

    def save_then_damage(manager, step, state, data_state, meta):
        real(manager, step, state, data_state, meta)
        if step == 2:  # the newest step before the divergence (at step 3) is damaged on disk
            manager.wait_until_finished()
            _alter_array(os.path.join(str(manager.directory), "2"))

    monkeypatch.setattr(loop_lib.ckpt_lib, "save_run", save_then_damage)
    cfg = _config(**{"optim.lr": 1e12, "optim.schedule": "constant", "train.checkpoint_every_steps": 1})
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step (\d+); ") as e:
        train_and_evaluate(cfg, str(tmp_path / "nan"))
    import re
    m = re.search(r"at step (\d+); last good checkpoint: step (\d+) in .*\(checksums verified\)", str(e.value))
    assert m, str(e.value)
    bad, named = map(int, m.groups())
    assert bad == 3 and named == 1, str(e.value)  # not step 2, whose arrays were altered


# --------------------------------------------------------------------------------------------
# The teacher cache
# --------------------------------------------------------------------------------------------


def test_damaged_teacher_cache_is_refused(tmp_path, digits_teacher):
    """The manifest holds a checksum of every file; opening the cache (and so any run from it)
    checks them, reading in chunks, and refuses a damaged file by name."""
    import hashlib

    from _configs import digits_config
    from jaxkd.train import teacher_cache as cache_lib
    from jaxkd.train.cache_build import build_teacher_cache

    cfg = digits_config(**{"teacher.workdir": digits_teacher[0], "data.num_train_examples": 128,
                           "train.num_epochs": 1})
    cache = str(tmp_path / "cache")
    manifest = build_teacher_cache(cfg, None, cache, progress=False)
    assert set(manifest["checksums"]) == {"logits.npy", "ids.npy"}
    for name, digest in manifest["checksums"].items():  # an independent digest of each file
        with open(os.path.join(cache, name), "rb") as f:
            assert digest == hashlib.sha256(f.read()).hexdigest()
    cache_lib.open_teacher_cache(cache)  # intact: opens
    path = os.path.join(cache, "logits.npy")
    with open(path, "r+b") as f:  # one logit's low byte changed: still a valid .npy
        f.seek(os.path.getsize(path) - 7)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(config_lib.ConfigError, match=r"teacher cache file .*logits.npy' is damaged"):
        cache_lib.open_teacher_cache(cache)
    with pytest.raises(config_lib.ConfigError, match=r"logits.npy' is damaged"):
        train_and_evaluate(config_lib.apply_overrides(cfg, [f"teacher.cache={cache!r}"]), str(tmp_path / "kd"))
    # the chunked reader gives the digest of the whole file
    assert cache_lib.file_checksum(path, chunk=1000) == cache_lib.file_checksum(path)


@pytest.mark.slow
def test_cli_failed_save_prints_one_line_and_the_same_command_resumes(tmp_path, data_dir):
    env = dict(os.environ, JAXKD_DATA_DIR=data_dir)
    run = str(tmp_path / "run")
    cmd = _cmd(run, "ce") + ["train.num_epochs=1", "train.checkpoint_every_steps=2"]
    failed = subprocess.run(cmd, env=dict(env, JAXKD_FAULT="oserror_during_save:4"), timeout=300,
                            capture_output=True, text=True)
    lines = [ln for ln in failed.stderr.splitlines() if ln.strip()]
    assert failed.returncode == 2 and len(lines) == 1, failed.stderr[-3000:]
    assert lines[0].startswith("jaxkd: error: writing a checkpoint in") and "No space left" in lines[0]
    assert "newest: step 2" in lines[0]
    rerun = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert rerun.returncode == 0 and "jaxkd: resuming from checkpoint step 2" in rerun.stdout, rerun.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# Several processes agree
# --------------------------------------------------------------------------------------------

_AGREE_SCRIPT = r"""
import json, sys
import numpy as np
from jaxkd.cli import initialize_distributed
initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
import jax
from jaxkd.train import checkpoint as ckpt_lib
pid = jax.process_index()
out = {"none": ckpt_lib.agree(None), "one": ckpt_lib.agree("bad digest here" if pid == 1 else None),
       "both": ckpt_lib.agree(f"bad on {pid}")}
# an array sharded over the two processes is checksummed as the whole array on each
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
full = np.arange(8, dtype=np.float32)
x = jax.make_array_from_callback((8,), sharding, lambda idx: full[idx])
out["sharded"] = ckpt_lib.array_digest(x) == ckpt_lib.array_digest(full)
print("RESULT " + json.dumps(out), flush=True)
"""


@pytest.mark.slow
def test_processes_agree_on_a_step_only_if_every_one_verified_it(tmp_path):
    """Two processes (gloo on CPU): a step one of them found damaged is damaged for both."""
    import socket

    from conftest import child_xla_flags
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "agree.py"
    script.write_text(_AGREE_SCRIPT)
    env = dict(os.environ, XLA_FLAGS=child_xla_flags(), PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}", str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=180)
        line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
        assert p.returncode == 0 and line, out[-3000:]
        results.append(json.loads(line[len("RESULT "):]))
    assert [r["none"] for r in results] == [None, None]
    assert results[0]["one"] == "failed to restore or verify on process(es) [1]"
    assert results[1]["one"] == "bad digest here"
    assert [r["both"] for r in results] == ["bad on 0", "bad on 1"]
    assert all(r["sharded"] for r in results)


def test_resume_refuses_a_method_default_that_changed_since_the_checkpoint(tmp_path, data_dir):
    """A run that leaves an option at its default resumes only with the same default: a jaxkd
    upgrade that changes the default between kill and resume is reported, naming the option."""
    from jaxkd import losses
    from jaxkd.core import LossOutput, Recipe, register_recipe
    from _configs import tiny_digits_config

    def probe(scale=1.0, widths=(4, 8)):
        return Recipe(name="default_probe",
                      loss=lambda inp: LossOutput(per_example=scale * losses.cross_entropy(inp.student_logits,
                                                                                           inp.labels)))

    def probe_v2(scale=2.0, widths=(4, 8)):
        return probe(scale, widths)

    cfg = tiny_digits_config(**{"method": {"name": "default_probe"}, "train.num_epochs": 2})
    wd = str(tmp_path / "run")
    try:
        register_recipe("default_probe", probe, overwrite=True)
        train_and_evaluate(cfg, wd, stop_after_steps=1)
        register_recipe("default_probe", probe_v2, overwrite=True)
        with pytest.raises(TrainingError, match=r"option 'scale' is not set in the config and its default "
                                                r"changed .*\(1\.0 -> 2\.0"):
            train_and_evaluate(cfg, wd)
        # set explicitly to the old value, the run resumes (the unchanged tuple default is no difference)
        old = tiny_digits_config(**{"method": {"name": "default_probe", "scale": 1.0}, "train.num_epochs": 2})
        assert train_and_evaluate(old, wd)["steps"] == 4  # 2 epochs of 2 steps
    finally:
        register_recipe("default_probe", probe, overwrite=True)
