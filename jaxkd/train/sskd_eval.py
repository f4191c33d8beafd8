"""SSKD's teacher head on held-out images: :func:`evaluate_teacher_head` loads a run's trained head,
its teacher and its data set and measures :func:`jaxkd.methods.sskd.head_retrieval_accuracy`."""

from __future__ import annotations

import ml_collections
import numpy as np

from jaxkd.methods.sskd import HEADS, head_retrieval_accuracy
from jaxkd.train import checkpoint as ckpt_lib
from jaxkd.train import setup as setup_lib
from jaxkd.train.step import InputPipeline

__all__ = ["evaluate_teacher_head"]


def evaluate_teacher_head(workdir: str, *, batch_size: int | None = None, split: str | None = None) -> dict:
    """:func:`head_retrieval_accuracy` of the teacher head stored in the run ``workdir`` (its newest
    checkpoint; the head is frozen after SSKD's pre-stage, so any checkpoint of the student stage
    holds the trained head), on ``split`` (default the run's ``data.eval_split``) in batches of
    ``batch_size`` (default the run's training batch size, the number of candidates ``train/ss_acc_t``
    retrieves among). The tail that does not fill a batch is left out. The teacher, its feature
    tap and the data set are the run's own (from the config stored with the checkpoints)."""
    mgr = ckpt_lib.run_manager(workdir)
    step = mgr.latest_step()
    if step is None:
        raise ValueError(f"no run checkpoint in {workdir!r}")
    state, meta = ckpt_lib.restore_on_this_process(mgr, step, "state")
    config = ml_collections.ConfigDict(meta["config"])
    if HEADS[1] not in state["params"]["aux"]:
        raise ValueError(f"the run in {workdir!r} has no SSKD teacher head (aux/{HEADS[1]})")
    methods = [st["method"] for st in config.get("stages") or []] or [config.method]
    layers = {m.get("teacher_layer", "embedding") for m in methods if m["name"] in ("sskd", "sskd_teacher_head")}
    teacher_layer = layers.pop() if len(layers) == 1 else "embedding"
    info, eval_src = setup_lib.eval_data(config, split)
    teacher = setup_lib.create_model(config.teacher, "teacher", info.num_classes)
    t_vars, _ = setup_lib.load_teacher(config, teacher, setup_lib.sample_input(info))
    size = int(batch_size or config.data.batch_size)
    n = len(eval_src) // size * size
    if not n:
        raise ValueError(f"the split holds {len(eval_src)} images, fewer than one batch of {size}")
    batches = (eval_src.gather(np.arange(i, i + size))["image"] for i in range(0, n, size))
    out = head_retrieval_accuracy(teacher, t_vars, state["params"]["aux"][HEADS[1]], batches,
                                  InputPipeline(mean=tuple(info.mean), std=tuple(info.std)), teacher_layer)
    return {**out, "split": split or config.data.eval_split, "step": int(step)}
