"""python -m vpns_jax.main --config=configs/tiny_imagenet.py --workdir=workdir/tiny_imagenet --config.model.init_from=PATH

VPNs on Tiny-ImageNet (200 classes) with an ImageNet-pretrained ResNet-18: the authors' setting.

Produces results.json / results.csv in the workdir: test top-1 accuracy (without the prompt,
read through the pretrained 1000-way ImageNet head by frequency label mapping) and sparsity at
each of base.py's densities (1.0, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1: 0-90 % sparsity), one
independent run each from the same pretrained state, with the final masks, weights and prompt
per density. As in the authors' code, the test set is the official val/ set (10,000 images).
The paper's number for comparison (docs/method.md, section 9, mean of seeds 7, 9, 17): VPNs
67.89 at 90 % sparsity, 70.11 at 80 %; dense 73.03. Other seeds: --config.seed=9 / 17.

Needs:
  * Tiny-ImageNet prepared under --config.data.data_dir (else $TFDS_DATA_DIR or
    ~/tensorflow_datasets): put tiny-imagenet-200.zip
    (http://cs231n.stanford.edu/tiny-imagenet-200.zip) or its extracted tiny-imagenet-200/ folder
    in a folder and run python -m vpns_jax.data.prepare --dataset=tiny_imagenet --manual_dir=FOLDER.
  * ImageNet-pretrained ResNet-18 weights (torchvision IMAGENET1K_V1, as the authors used)
    passed as --config.model.init_from=PATH: the torchvision .pth itself (e.g. resnet18-f37072fd.pth)
    or the .npz that python -m vpns_jax.convert writes from it.

Values: all of base.py's, which are the authors' defaults (docs/method.md, section 6) and what
their ResNet-18 Tiny-ImageNet launch script uses: batch 256 (get_model_dataset.py), 30 + 30
epochs, scores and stage-1 prompt Adam 1e-4, weights, BatchNorm and stage-2 prompt SGD 0.01
(momentum 0.9), weight decay 1e-4, epoch cosine schedules; pad prompt 16 px on 224 px inputs
(64 px images upsampled); global threshold.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.data.name = "tiny_imagenet"
    return config
