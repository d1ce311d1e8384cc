"""TFDS builders of the datasets TFDS cannot prepare offline; importing this registers them.

``fashion_mnist_local`` (Debian's IDX files), ``tiny_imagenet`` (a manual copy of ``tiny-imagenet-200.zip``) and
``sklearn_digits`` (scikit-learn's 8x8 digits) prepare and read back without TensorFlow (array_record files,
images stored as encoded PNG/JPEG bytes).
"""

from vpns_jax.data.builders.fashion_mnist_local import FashionMnistLocal
from vpns_jax.data.builders.sklearn_digits import SklearnDigits
from vpns_jax.data.builders.tiny_imagenet import TinyImagenet

__all__ = ["FashionMnistLocal", "SklearnDigits", "TinyImagenet"]
