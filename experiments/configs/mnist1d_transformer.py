"""MNIST-1D as a sequence task: each 40-sample signal is a sequence of 10 tokens of 4 samples.

The same models, methods and presets as ``fashion_vit.py`` (ViT teacher 6 layers, D=256, 8 heads
-> student 3 layers, D=128, 8 heads; baseline, KD, TinyBERT, MiniLM v1/v2), on the offline
MNIST-1D (``mnist1d`` package, 4,000 training / 1,000 test signals, 10 classes). A signal
``(40, 1)`` is read as an image of width 1 and cut into patches of ``(4, 1)``: 10 tokens + [CLS].
Every sequence has the same length, so the token masks are all ones.

    jaxkd compare --config experiments/configs/mnist1d_transformer.py --workdir runs/m1d \\
        --methods kd,tinybert,minilm --seeds 0,1,2

The limited-data variant is ``data.num_train_examples=1000``.
"""

import importlib.util
import os


HERE = os.path.dirname(os.path.abspath(__file__))
PATCH = (4, 1)
EPOCHS = 30
INTERMEDIATE = 10


def get_config():
    spec = importlib.util.spec_from_file_location("_fashion_vit", os.path.join(HERE, "fashion_vit.py"))
    fashion_vit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fashion_vit)
    # everything as the Fashion-MNIST ViT config (AdamW 1e-3, cosine, KD defaults) but data, patches, epochs
    c = fashion_vit.vit_config(EPOCHS, INTERMEDIATE)
    c.data.name = "mnist1d"
    c.teacher.kwargs = {"patch_size": PATCH}
    c.model.kwargs = {"patch_size": PATCH}
    return c
