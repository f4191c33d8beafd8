"""Fashion-MNIST, ViT teacher (6 layers, D=256, 8 heads) -> ViT student (3 layers, D=128, 8 heads):
baseline, logit KD, TinyBERT (two stages) and MiniLM (v1, v2).

Both networks cut the 28x28 image into 7x7 patches (16 tokens + [CLS]), so every attention map
is ``[B, 8, 17, 17]`` on both sides (TinyBERT's attention MSE and MiniLM-v1 need equal head and
token counts). ``model.name=vit_student2`` gives the 2-layer student (uniform map 6/2).
``model.kwargs.patch_size=(1, 28)`` (and the same for the teacher) reads each image as a sequence
of its 28 rows instead.

    PARTS="fashion_limited fashion_full" bash experiments/transformer_study.sh   # the study (docs §4b)
    jaxkd compare --config experiments/configs/fashion_vit.py --workdir runs/fvit --methods kd,tinybert,minilm

Every method trains the student for ``EPOCHS`` epochs in all; two-stage methods split them:
TinyBERT ``INTERMEDIATE`` epochs of intermediate-layer distillation (attention-score MSE on the
layer pairs (0,1), (1,3), (2,5), hidden-state MSE of the embeddings and those pairs through one
shared projection 128 -> 256) then prediction-layer distillation (soft CE at T = 1, the official
class-averaged form, no hard labels); MiniLM ``INTERMEDIATE`` epochs of last-layer attention KL
+ value-relation KL, then fine-tuning with cross-entropy (the paper distils, then fine-tunes).
AdamW (lr 1e-3, weight decay 0.05, cosine with one warm-up epoch; each stage restarts its
schedule), batch 128, no augmentation.

``JAXKD_VIT_EPOCHS`` and ``JAXKD_VIT_INTERMEDIATE`` in the environment change the budget (default
10 and 3); the study's full-data part runs 2 and 1 to fit a 2-core CPU (experiments/transformer_study.sh).

Needs the Fashion-MNIST IDX files (see fashion_mnist.py).
"""

import os

from jaxkd.config import base_config
from jaxkd.methods.transformer_kd import tinybert_stages

EPOCHS = 10
INTERMEDIATE = 3
PATCH = (7, 7)


def transformer_presets(epochs: int = EPOCHS, intermediate: int = INTERMEDIATE) -> dict:
    """KD, TinyBERT (two stages), MiniLM v1 / v2 (distil, then fine-tune with CE)."""
    rest = epochs - intermediate

    def minilm(**opts):
        return {"stages": [
            {"name": "minilm", "num_epochs": intermediate, "method": {"name": "minilm", **opts}},
            {"name": "finetune", "num_epochs": rest, "method": {"name": "ce"}}]}

    return {
        "kd": {"method": {"name": "hinton_kd", "temperature": 4.0, "alpha": 0.9, "gamma": 0.1}},
        "tinybert": {"stages": tinybert_stages(intermediate, rest)},
        "minilm": minilm(),
        "minilm_v2": minilm(version="v2", num_relation_heads=8),
    }


def vit_config(epochs: int = EPOCHS, intermediate: int = INTERMEDIATE):
    """The ViT pair with every preset at this budget (mnist1d_transformer.py builds on it)."""
    c = base_config()
    c.data.name = "fashion_mnist_local"
    c.data.batch_size = 128
    c.data.eval_batch_size = 500
    c.teacher.name = "vit_teacher"
    c.teacher.kwargs = {"patch_size": PATCH}
    c.model.name = "vit_student"
    c.model.kwargs = {"patch_size": PATCH}
    c.method.name = "hinton_kd"
    c.method.temperature = 4.0
    c.method.alpha = 0.9
    c.method.gamma = 0.1
    c.optim.name = "adamw"
    c.optim.lr = 1e-3
    c.optim.weight_decay = 0.05
    c.optim.schedule = "cosine"
    c.optim.warmup_epochs = 1.0
    if not 0 < intermediate < epochs:
        raise ValueError(f"intermediate={intermediate} epochs must lie between 0 and epochs={epochs} "
                         "(the two-stage methods need epochs for both stages)")
    c.train.num_epochs = epochs
    c.presets = transformer_presets(epochs, intermediate)
    return c


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name) or default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be a whole number of epochs") from None


def get_config():
    """``vit_config`` at ``JAXKD_VIT_EPOCHS`` / ``JAXKD_VIT_INTERMEDIATE`` (default 10 / 3)."""
    return vit_config(_env_int("JAXKD_VIT_EPOCHS", EPOCHS), _env_int("JAXKD_VIT_INTERMEDIATE", INTERMEDIATE))
