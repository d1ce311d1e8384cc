"""TFDS builders of the datasets TFDS cannot prepare offline; importing this registers them.

* ``fashion_mnist_local``: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` IDX files.
* ``tiny_imagenet``: Tiny-ImageNet-200 from a manual copy of ``tiny-imagenet-200.zip``.
* ``sklearn_digits``: scikit-learn's bundled 8x8 digits with a fixed train/test split.

All three prepare and read back without TensorFlow (``file_format='array_record'``,
images stored as already encoded PNG/JPEG bytes).
"""

from vpns_jax.data.builders.fashion_mnist_local import FashionMnistLocal
from vpns_jax.data.builders.sklearn_digits import SklearnDigits
from vpns_jax.data.builders.tiny_imagenet import TinyImagenet

__all__ = ["FashionMnistLocal", "SklearnDigits", "TinyImagenet"]
