"""Fashion-MNIST, resnet20 -> resnet8 on 3,000 training images: the reruns of issue 19 (modes that
follow the reference code beside jaxkd's earlier readings).

The data, models, optimizer (SGD, lr 0.05, cosine, wd 5e-4, batch 128) and 10-epoch schedule of
``fashion_features.py``, so ``kd`` and the baseline are comparable with that study and with
``fashion_modern.py``. ``experiments/fidelity_study.sh`` trains N resnet20 teachers (seeds
0 .. N-1, 3 epochs on all 60,000 images; N = $JAXKD_FIDELITY_TEACHERS, default 2: every
multi-teacher step runs N teacher forwards, and the relabelled data set is N times longer, so N = 3
would cost about twice as much on 2 CPU cores) into $JAXKD_FIDELITY_DIR/teachers/seed<k> (default
runs/fashion_fidelity) and runs every preset below over 3 seeds:

    bash experiments/fidelity_study.sh       # ~6 h on 2 CPU cores (estimated); needs the IDX files

Presets:

* ``fitnets_two_stage``: as in the feature study (2 hint epochs, then 8 epochs of CE + alpha KD
  at T = 4, alpha 4 -> 1, KD with T^2, i.e. an effective soft-target weight 64 -> 16);
  ``fitnets_two_stage_no_t2``: the same without T^2, the FitNets paper's stage 2 (lambda 4 -> 1
  on the unscaled soft cross-entropy; the authors' ``KDCost.py`` has no T^2; their yamls use
  T = 3, kept at 4 here so that only the T^2 factor differs).
* ``at``: attention transfer, code mode (beta 1000, the authors' code and RepDistiller);
  ``at_paper``: the paper's form with its per-layer weight beta / (H_j W_j);
  ``at_paper_unscaled``: jaxkd's earlier paper mode (beta / 2 with no division by H_j W_j).
* ``meal_v2_ref`` / ``meal_v2_gan``: MEAL V2 from the N teachers in the reference mode
  (discriminator on logits in the student's optimizer, one loss) and in jaxkd's earlier GAN mode;
  each seed's student starts from that seed's baseline of the same comparison
  ($JAXKD_FIDELITY_COMPARE_DIR, default $JAXKD_FIDELITY_DIR/n3000) and is fine-tuned 10 epochs
  at lr 0.01; ``ft_ce`` is the control (the same fine-tuning with cross-entropy). The
  reference's discriminator widths for 10 classes: 10 -> 4 -> 4 -> 2.
* ``ens_avg``: KD from the uniform average of the N teachers' soft labels (gamma 0.1,
  alpha 0.9, T 4); ``ens_relabel_data``: the relabelled data set (``data.copies = N``, each epoch
  every example N times, once per teacher, so N times the steps);
  ``ens_avg_long``: uniform averaging for N × 10 epochs, the relabelled run's number of steps;
  ``ce_long``: the baseline (cross-entropy) for as many epochs, the control of both.
"""

import os

from jaxkd.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.environ.get("JAXKD_FIDELITY_DIR", "runs/fashion_fidelity")
COMPARE_DIR = os.environ.get("JAXKD_FIDELITY_COMPARE_DIR", os.path.join(ROOT, "n3000"))
NUM_TEACHERS = int(os.environ.get("JAXKD_FIDELITY_TEACHERS", "2"))
TEACHERS = [{"name": "resnet20", "kwargs": {}, "workdir": os.path.join(ROOT, "teachers", f"seed{k}")}
            for k in range(NUM_TEACHERS)]
KD = {"temperature": 4.0, "alpha": 0.9, "gamma": 0.1}


def fidelity_presets(c, first_stage_epochs: int = 2) -> dict:
    rest = c.train.num_epochs - first_stage_epochs

    def fitnets(t2: bool) -> dict:
        return {"stages": [
            {"name": "hint", "num_epochs": first_stage_epochs, "method": {"name": "fitnets_hint"}},
            {"name": "kd", "num_epochs": rest, "method": {
                "name": "hinton_kd", "temperature": 4.0, "gamma": 1.0, "t2": t2,
                "alpha": {"type": "linear", "init": 4.0, "end": 1.0}}}]}

    # a preset's section dict sets only the fields it names (jaxkd.experiment.preset_config)
    finetune = {"model": {"init_from": os.path.join(COMPARE_DIR, "baseline", "seed{seed}")}, "optim": {"lr": 0.01}}
    return {
        "kd": {"method": {"name": "hinton_kd", **KD}},
        "fitnets_two_stage": fitnets(True),
        "fitnets_two_stage_no_t2": fitnets(False),
        "at": {"method": {"name": "at", "mode": "code"}},
        "at_paper": {"method": {"name": "at", "mode": "paper"}},
        "at_paper_unscaled": {"method": {"name": "at", "mode": "paper_unscaled"}},
        "meal_v2_ref": {"method": {"name": "meal_v2", "mode": "reference"}, "teachers": TEACHERS, **finetune},
        "meal_v2_gan": {"method": {"name": "meal_v2", "mode": "gan"}, "teachers": TEACHERS, **finetune},
        "ft_ce": {"method": {"name": "ce"}, **finetune},
        "ens_avg": {"method": {"name": "ensemble_kd", **KD}, "teachers": TEACHERS},
        "ens_relabel_data": {"method": {"name": "relabel_data_kd", **KD}, "teachers": TEACHERS,
                             "data": {"copies": NUM_TEACHERS}},
        "ens_avg_long": {"method": {"name": "ensemble_kd", **KD}, "teachers": TEACHERS,
                         "train": {"num_epochs": NUM_TEACHERS * c.train.num_epochs}},
        "ce_long": {"method": {"name": "ce"}, "train": {"num_epochs": NUM_TEACHERS * c.train.num_epochs}},
    }


def get_config():
    c = load_config(os.path.join(HERE, "fashion_features.py"))
    c.presets = fidelity_presets(c)
    return c
