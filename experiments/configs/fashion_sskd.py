"""Fashion-MNIST, resnet20 -> resnet8 with limited labels: SSKD against KD and CRD.

The data, models, optimizer and 10-epoch student schedule of ``fashion_features.py`` /
``fashion_modern.py`` (so their baseline and KD rows are comparable), plus SSKD's presets:

    bash experiments/sskd_study.sh        # 1,000 and 3,000 images, 3 seeds; see the script for its cost

* ``sskd``: by default two stages in one run. ``teacher_head`` (``PRE_EPOCHS`` epochs): only the teacher's
  projection head trains, by the cross-entropy of raw cosine similarities between the rotated
  views and the originals (SGD 0.05, x0.1 at half and three quarters of the stage, as the
  reference's 60 epochs with milestones 30 and 45); ``train/ss_acc_t`` in ``metrics.jsonl`` is its
  rotation-retrieval accuracy. ``student`` (10 epochs, the config's optimizer): the SSKD loss with
  the reference's weights (0.1 CE, 0.9 KD at T 4, 2.7 rotated-view KD at T 4 with ratio 1.0,
  10 similarity KD at T 0.5 with ratio 0.75), the teacher head read frozen.
  With ``JAXKD_SSKD_HEAD=<work dir>`` in the environment, the SSKD presets (``sskd``,
  ``sskd_unlabelled``, ``sskd_cnn`` and the ablations below) are instead the student stage alone, with the teacher head
  loaded frozen from that run (``aux_init_from``): a head trained once, by the method
  ``sskd_teacher_head``, on all 60,000 training images (what ``sskd_study.sh`` does, since the
  in-run pre-stage on a 1,000-image subset is only 56 steps and leaves the head near chance).
* ``sskd_no_ss`` and ``sskd_views_only``: ablations of ``sskd`` (similarity term off; both auxiliary
  terms off, leaving 0.1 CE + 0.9 KD on the originals with the student trained on all four views).
* ``sskd_unlabelled``: the same without labels (no CE; the rotated-view filter ranks the teacher's
  top-1 class on the original view instead of the label).
* augmentation control: SSKD's views carry a crop (pad 4) and a flip that the other presets do
  not; ``sskd_study.sh`` also runs the baseline and KD with ``data.augment={"pad": 4, "flip": True}``.
* heterogeneous pair, resnet20 -> the small ``cnn`` (width 16, hidden 64; not a residual network):
  ``ce_cnn`` (its baseline; ``compare``'s own baseline row is resnet8), ``kd_cnn`` and ``sskd_cnn``.
  Its ``embedding`` tap is the hidden dense layer (64), the head is 64 -> 64.

The teacher's head sees the teacher's pooled 64-channel features (resnet20), the student's the
student's (resnet8: 64). SSKD's views replace ``data.augment`` for its own runs; the other presets
train on un-augmented images, as in the feature study.
"""

import os

from jaxkd.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))

PRE_EPOCHS = 8       # the teacher-head stage (reference: 60 epochs for 240 student epochs)
STUDENT_EPOCHS = 10  # as fashion_features.py
CNN = {"model": {"name": "cnn", "kwargs": {"width": 16, "hidden": 64}, "init_from": None}}


def head_optim(epochs: int) -> dict:
    """The teacher head's optimizer: SGD 0.05, x0.1 at half and three quarters of its epochs
    (the reference: 60 epochs, milestones 30 and 45)."""
    return {"lr": 0.05, "schedule": "step", "milestones": (epochs // 2, (3 * epochs) // 4), "decay": 0.1,
            "warmup_epochs": 0.0}


def sskd_stages(pre_epochs: int = PRE_EPOCHS, student_epochs: int = STUDENT_EPOCHS, **options) -> list:
    """The two stages of one SSKD run: the teacher head, then the student (``options`` go to ``sskd``)."""
    return [
        {"name": "teacher_head", "num_epochs": pre_epochs, "method": {"name": "sskd_teacher_head"},
         "evaluate": False,  # the student does not change in this stage
         "optim": head_optim(pre_epochs)},
        {"name": "student", "num_epochs": student_epochs, "method": {"name": "sskd", **options}},
    ]


def sskd_presets(pre_epochs: int = PRE_EPOCHS, student_epochs: int = STUDENT_EPOCHS,
                 head_workdir: str | None = None) -> dict:
    """The study's presets; with ``head_workdir`` (a run that trained ``aux/sskd_head_t``) the SSKD
    presets load that head and train the student only, without a pre-stage."""
    kd = {"name": "hinton_kd", "temperature": 4.0, "alpha": 0.9, "gamma": 0.1}

    def sskd(**options):
        # config.method names the student stage's method too, so summary.json records it
        method = {"method": {"name": "sskd", **options}}
        if head_workdir:
            return {**method, "aux_init_from": {"sskd_head_t": head_workdir}}
        return {**method, "stages": sskd_stages(pre_epochs, student_epochs, **options)}

    return {
        "kd": {"method": kd},
        "crd": {"method": {"name": "crd", "beta": 0.8, "gamma": 1.0, "alpha": 0.0}},
        "sskd": sskd(),
        "sskd_unlabelled": sskd(use_labels=False),
        # ablations: without the similarity term; without both auxiliary terms (CE + KD on the
        # originals, the student still trained on all four views, its BN statistics over them)
        "sskd_no_ss": sskd(ss_weight=0.0),
        "sskd_views_only": sskd(ss_weight=0.0, tf_weight=0.0),
        "ce_cnn": {**CNN, "method": {"name": "ce"}},
        "kd_cnn": {**CNN, "method": kd},
        "sskd_cnn": {**CNN, **sskd()},
    }


def get_config():
    c = load_config(os.path.join(HERE, "fashion_features.py"))
    c.train.num_epochs = STUDENT_EPOCHS
    c.presets = sskd_presets(head_workdir=os.environ.get("JAXKD_SSKD_HEAD") or None)
    return c
