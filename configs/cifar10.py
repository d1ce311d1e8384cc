"""python -m vpns_jax.main --config=configs/cifar10.py --workdir=workdir/cifar10 --config.model.init_from=PATH

VPNs on CIFAR-10 with an ImageNet-pretrained ResNet-18: the authors' setting.

Produces results.json / results.csv in the workdir: test top-1 accuracy (without the prompt,
read through the pretrained 1000-way ImageNet head by frequency label mapping) and sparsity at
each of base.py's densities (1.0, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1: 0-90 % sparsity), one
independent run each from the same pretrained state, with the final masks, weights and prompt
per density. The paper's number for comparison (docs/method.md, section 9, mean of seeds 7, 9,
17): VPNs 96.29 at 90 % sparsity, 96.55 at 80 %; dense 96.09. Other seeds: --config.seed=9 / 17.

Needs:
  * CIFAR-10 prepared under --config.data.data_dir (else $TFDS_DATA_DIR or ~/tensorflow_datasets):
    python -m vpns_jax.data.prepare --dataset=cifar10 --download, once on a machine with network
    and tensorflow-cpu, or copy an already prepared TFDS directory there.
  * ImageNet-pretrained ResNet-18 weights (torchvision IMAGENET1K_V1, as the authors used)
    passed as --config.model.init_from=PATH: the torchvision .pth itself (e.g. resnet18-f37072fd.pth)
    or the .npz that python -m vpns_jax.convert writes from it.

Values: all of base.py's, which are the authors' defaults (docs/method.md, section 6) and what
their CIFAR-10 launch script uses: batch 256 (get_model_dataset.py), 30 + 30 epochs, scores and
stage-1 prompt Adam 1e-4, weights, BatchNorm and stage-2 prompt SGD 0.01 (momentum 0.9), weight
decay 1e-4, epoch cosine schedules; pad prompt 16 px on 224 px inputs; global threshold.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.data.name = "cifar10"
    return config
