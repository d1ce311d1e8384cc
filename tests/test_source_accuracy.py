"""experiments.source_accuracy on real Fashion-MNIST: a head that always answers class 0 scores its share."""

import numpy as np
import pytest
from flax import nnx

from vpns_jax.config import offline
from experiments import source_accuracy
from vpns_jax.io import array_files
from vpns_jax.models import create_model, functional

pytestmark = pytest.mark.slow  # experiments.source_accuracy end to end on real Fashion-MNIST


def test_a_constant_head_scores_the_share_of_its_class(fashion_data_dir, tmp_path):
    config = offline.resnet()
    config.model.width = 1 / 16
    config.data.data_dir = fashion_data_dir
    model = create_model("resnet18", num_classes=5, width=1 / 16, rngs=nnx.Rngs(0))
    _, weights, batch_stats = functional.split_model(model)
    weights["fc"]["kernel"] = np.zeros_like(weights["fc"]["kernel"])
    weights["fc"]["bias"] = np.array([1.0, 0.0, 0.0, 0.0, 0.0], np.float32)
    path = tmp_path / "source.npz"
    array_files.save_arrays(path, {"weights": weights, "batch_stats": batch_stats})
    # Fashion-MNIST's test split has 1,000 images of each class: class 0 is a fifth of classes 0-4.
    assert source_accuracy.source_accuracy(config, str(path)) == (0.2, 5000)
