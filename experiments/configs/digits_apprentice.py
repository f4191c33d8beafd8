"""Digits: Apprentice joint training (full- and low-precision MLP students) and Label Refinery.

Same data, models and schedule as ``digits.py`` (CNN teacher, MLP(32) student, 30 epochs of
SGD with a cosine schedule). Presets (``experiments/apprentice_refinery_study.py`` runs them
over 3 seeds; each is also a plain ``jaxkd train`` run, e.g.
``jaxkd train --config experiments/configs/digits_apprentice.py --workdir W method.name=apprentice``):

* ``ce``, ``ce_w4a4``, ``ce_w2a2``: the student alone on hard labels, in float32 and with
  4-bit / 2-bit fake-quantised weights and activations (``model.kwargs.quant``);
* ``apprentice``, ``apprentice_w4a4``, ``apprentice_w2a2``: the same students trained jointly
  with a CNN teacher from scratch (paper weights 1 / 0.5 / 0.5, T = 1, the teacher with its
  own SGD state);
* ``kd``, ``kd_w4a4``, ``kd_w2a2``, ``apprentice_w2a2_pretrained``: the same students with a
  pretrained CNN (``teacher.workdir``): Hinton KD from the frozen teacher, and Apprentice
  starting from the pretrained teacher;
* Label Refinery: ``jaxkd refine --config experiments/configs/digits_apprentice.py
  --workdir W --generations 3 [--refinery teacher]`` (``config.method`` is ``label_refinery``).
"""


import importlib.util
import os

_spec = importlib.util.spec_from_file_location("_digits", os.path.join(os.path.dirname(__file__), "digits.py"))
_digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_digits)

STUDENT = {"hidden": (32,)}


def _quant(bits):
    return {"name": "mlp", "kwargs": {**STUDENT, "quant": {"weight_bits": bits, "act_bits": bits}}}


def get_config():
    c = _digits.get_config()
    c.method = {"name": "label_refinery"}
    apprentice = {"name": "apprentice", "teacher_weight": 1.0, "student_weight": 0.5, "kd_weight": 0.5,
                  "temperature": 1.0}
    kd = {"name": "hinton_kd", "temperature": 4.0, "alpha": 0.9, "gamma": 0.1}
    c.presets = {
        "ce": {"method": {"name": "ce"}},
        "ce_w4a4": {"method": {"name": "ce"}, "model": _quant(4)},
        "ce_w2a2": {"method": {"name": "ce"}, "model": _quant(2)},
        "apprentice": {"method": apprentice},
        "apprentice_w4a4": {"method": apprentice, "model": _quant(4)},
        "apprentice_w2a2": {"method": apprentice, "model": _quant(2)},
        # with a pretrained CNN (teacher.workdir set by the study script): Hinton KD from the
        # frozen teacher, and Apprentice starting from it (the teacher keeps training)
        "kd": {"method": kd},
        "kd_w4a4": {"method": kd, "model": _quant(4)},
        "kd_w2a2": {"method": kd, "model": _quant(2)},
        "apprentice_w2a2_pretrained": {"method": apprentice, "model": _quant(2)},
    }
    return c
