"""Fashion-MNIST from local IDX files: CNN teacher -> MLP student, Hinton KD.

Needs the IDX files (Debian: `apt-get install dataset-fashion-mnist`, or set
`data.builder_kwargs={"idx_dir": "/path"}`); with internet, `data.name=fashion_mnist` uses
the tfds catalog's own builder instead.

    jaxkd compare --config experiments/configs/fashion_mnist.py --workdir runs/fmnist --seeds 0,1,2
    # limited-data regime, where KD's gain is known to be larger:
    jaxkd compare --config experiments/configs/fashion_mnist.py --workdir runs/fmnist_1k \
        data.num_train_examples=1000
"""

from jaxkd.config import base_config


def get_config():
    c = base_config()
    c.data.name = "fashion_mnist_local"
    c.data.batch_size = 128
    c.data.eval_batch_size = 500
    c.teacher.name = "cnn"
    c.teacher.kwargs = {"width": 32}
    c.model.name = "mlp"
    c.model.kwargs = {"hidden": (256,)}
    c.method.name = "hinton_kd"
    c.method.temperature = 4.0
    c.method.alpha = 0.9
    c.method.gamma = 0.1
    c.optim.lr = 0.05
    c.optim.weight_decay = 5e-4
    c.optim.schedule = "cosine"
    c.train.num_epochs = 15
    return c
