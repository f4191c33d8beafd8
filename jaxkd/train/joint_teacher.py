"""A teacher trained jointly with the student (recipes with ``trains_teacher``, e.g. Apprentice).

The teacher is the auxiliary module ``aux/teacher`` of the run's state, so the run's own
checkpoints hold its params, batch statistics and optimizer state and resume covers it.
This module gives the loop what it needs around that:

* :func:`initial_variables`: from ``config.teacher.workdir`` (a finished run, restored with
  :func:`~jaxkd.train.checkpoint.load_model_variables`) when that is set, else a fresh init;
* :class:`JointTeacherEval`: eval accuracy of the teacher at every eval epoch
  (``eval/teacher_accuracy`` in ``metrics.jsonl``) and its best-accuracy variables saved to
  ``WORKDIR/joint_teacher`` (``best/`` plus ``summary.json``), the layout of an ordinary run,
  so ``jaxkd eval --workdir WORKDIR/joint_teacher model.name=<teacher> ...`` evaluates it and
  ``teacher.workdir=WORKDIR/joint_teacher`` distils from it. The exported student
  (``WORKDIR/best``) never contains it.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import jax

from jaxkd.train import checkpoint as ckpt_lib
from jaxkd.train import step as step_lib

SUBDIR = "joint_teacher"


def initial_variables(config, teacher, sample_input, rng) -> tuple[dict, dict | None]:
    """``(variables, meta)``: the pretrained teacher of ``config.teacher.workdir``, or a fresh init
    (``meta`` None)."""
    template = jax.jit(teacher.init)(rng, sample_input)  # (eager Flax init is slow on CPU)
    if not config.teacher.workdir:
        return template, None
    return ckpt_lib.load_model_variables(config.teacher.workdir, template, config.teacher.checkpoint)


def teacher_variables(state) -> dict:
    """The jointly trained teacher's Flax variables in a :class:`~jaxkd.train.step.TrainState`."""
    return step_lib.joint_teacher_variables(state.params["aux"], state.model_state["aux"])


class JointTeacherEval:
    """Evaluates the joint teacher at eval epochs and keeps its best checkpoint.

    ``evaluate`` is :func:`jaxkd.train.loop.evaluate_for_selection`: with ``val_src`` the best
    teacher is picked on the validation set, as the student is."""

    def __init__(self, workdir: str, teacher, pipeline, mesh, evaluate: Callable, eval_src, batch_size: int,
                 cfg_dict: dict, val_src=None):
        self.dir = os.path.join(workdir, SUBDIR)
        self.teacher, self.mesh, self.evaluate = teacher, mesh, evaluate
        self.eval_src, self.batch_size, self.cfg_dict = eval_src, batch_size, cfg_dict
        self.val_src = val_src  # when set, it picks the best teacher (as for the student)
        self.eval_step = step_lib.make_eval_step(teacher, pipeline, mesh=mesh)
        self.best_mgr = ckpt_lib.best_manager(self.dir)

    def __call__(self, state, step: int, epoch: int, meta: dict, save: bool = True) -> dict:
        variables = teacher_variables(state)
        ev, ev_val, key = self.evaluate(self.eval_step, variables, self.eval_src, self.val_src,
                                        self.batch_size, self.mesh)
        out = {"eval/teacher_accuracy": ev["accuracy"], "eval/teacher_loss": ev["loss"]}
        if ev_val is not None:
            out.update({"val/teacher_accuracy": ev_val["accuracy"], "val/teacher_loss": ev_val["loss"]})
        if save and ckpt_lib.improves(key, ckpt_lib.best_key_so_far(meta, "joint_teacher_")):
            meta["joint_teacher_best_accuracy"], meta["joint_teacher_best_epoch"] = ev["accuracy"], epoch
            meta["joint_teacher_best_key"] = list(key)
            best_meta = {"epoch": epoch, "accuracy": ev["accuracy"], "config": self.cfg_dict}
            if ev_val is not None:
                meta["joint_teacher_best_val_accuracy"] = best_meta["val_accuracy"] = ev_val["accuracy"]
            model = {"params": variables["params"], "model_state": {k: v for k, v in variables.items()
                                                                    if k != "params"}}
            ckpt_lib.save_best(self.best_mgr, step, model, best_meta, key)
        return out

    def finish(self, meta: dict, last_accuracy: float | None) -> None:
        self.best_mgr.wait_until_finished()
        if jax.process_index() != 0:
            return
        teacher_cfg = self.cfg_dict.get("teacher", {})
        summary = {"method": "joint teacher of " + str(self.cfg_dict.get("method", {}).get("name")),
                   "model": teacher_cfg.get("name"), "model_kwargs": teacher_cfg.get("kwargs"),
                   "best_accuracy": meta.get("joint_teacher_best_accuracy"),
                   "best_epoch": meta.get("joint_teacher_best_epoch"), "last_accuracy": last_accuracy,
                   "selected_on": "val" if self.val_src is not None else "eval_split",
                   "best_val_accuracy": meta.get("joint_teacher_best_val_accuracy")}
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
