"""A teacher trained jointly with the student (recipes with ``trains_teacher``, e.g. Apprentice).

The teacher is the auxiliary module ``aux/teacher`` of the run's state, so the run's own
checkpoints hold its params, batch statistics and optimizer state and resume covers it.
This module gives the loop what it needs around that:

* its starting variables come from :func:`jaxkd.train.setup.joint_teacher_init` (the finished
  run in ``config.teacher.workdir`` when that is set, else a fresh init);
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

import jax

from jaxkd.train import checkpoint as ckpt_lib
from jaxkd.train import step as step_lib
from jaxkd.train.evaluation import evaluate_for_selection

SUBDIR = "joint_teacher"
PREFIX = "joint_teacher_"  # its keys in the run's meta (see checkpoint.BestCheckpoint)


def teacher_variables(state) -> dict:
    """The jointly trained teacher's Flax variables in a :class:`~jaxkd.train.step.TrainState`."""
    return step_lib.joint_teacher_variables(state.params["aux"], state.model_state["aux"])


class JointTeacherEval:
    """Evaluates the joint teacher at eval epochs and keeps its best checkpoint, picked as the
    student's is (on the validation set when there is one)."""

    def __init__(self, workdir: str, teacher, pipeline, mesh, eval_src, batch_size: int, cfg_dict: dict,
                 val_src=None):
        self.dir = os.path.join(workdir, SUBDIR)
        self.mesh, self.eval_src, self.val_src = mesh, eval_src, val_src
        self.batch_size, self.cfg_dict = batch_size, cfg_dict
        self.eval_step = step_lib.make_eval_step(teacher, pipeline, mesh=mesh)
        self.best = ckpt_lib.BestCheckpoint(self.dir, PREFIX)

    def __call__(self, state, step: int, epoch: int, meta: dict) -> dict:
        variables = teacher_variables(state)
        ev, ev_val, key = evaluate_for_selection(self.eval_step, variables, self.eval_src, self.val_src,
                                                 self.batch_size, self.mesh)
        out = {"eval/teacher_accuracy": ev["accuracy"], "eval/teacher_loss": ev["loss"]}
        if ev_val is not None:
            out.update({"val/teacher_accuracy": ev_val["accuracy"], "val/teacher_loss": ev_val["loss"]})
        self.best.consider(meta, step, epoch, key, ev["accuracy"], ev_val and ev_val["accuracy"], variables,
                           self.cfg_dict)
        return out

    def finish(self, meta: dict, last_accuracy: float | None) -> None:
        self.best.wait_until_finished()
        if jax.process_index() != 0:
            return
        teacher_cfg = self.cfg_dict.get("teacher", {})
        summary = {"method": "joint teacher of " + str(self.cfg_dict.get("method", {}).get("name")),
                   "model": teacher_cfg.get("name"), "model_kwargs": teacher_cfg.get("kwargs"),
                   "best_accuracy": meta.get(PREFIX + "best_accuracy"),
                   "best_epoch": meta.get(PREFIX + "best_epoch"), "last_accuracy": last_accuracy,
                   "selected_on": "val" if self.val_src is not None else "eval_split",
                   "best_val_accuracy": meta.get(PREFIX + "best_val_accuracy")}
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
