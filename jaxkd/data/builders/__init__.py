"""jaxkd's offline tfds builders (array_record; prepared without network or TensorFlow).

Importing this package registers the builders with tfds under their names, so that
``tfds.builder("digits")`` etc. also work.
"""

from jaxkd.data.builders._base import ArrayRecordBuilder, offline_download_config
from jaxkd.data.builders.digits import Digits
from jaxkd.data.builders.fashion_mnist_local import DEFAULT_IDX_DIR, FashionMnistLocal
from jaxkd.data.builders.idx import parse_idx, read_idx, write_idx
from jaxkd.data.builders.mnist1d import Mnist1d, Mnist1dTokens

BUILTIN_BUILDERS = {
    "digits": Digits,
    "fashion_mnist_local": FashionMnistLocal,
    "mnist1d": Mnist1d,
    "mnist1d_tokens": Mnist1dTokens,
}

__all__ = [
    "ArrayRecordBuilder", "BUILTIN_BUILDERS", "DEFAULT_IDX_DIR", "Digits", "FashionMnistLocal",
    "Mnist1d", "Mnist1dTokens", "offline_download_config", "parse_idx", "read_idx", "write_idx",
]
