"""python -m vpns_jax.main --config=configs/tiny_imagenet.py --config.model.init_from=resnet18.npz
python -m vpns_jax.main --config=configs/tiny_imagenet.py:resnet50 --config.model.init_from=resnet50.npz

VPNs on Tiny-ImageNet (200 classes) with an ImageNet-pretrained ResNet-18: the authors' setting.

ARG (after the ':'): the model, one of vpns_jax.models' resnet18 (no ARG), resnet50, vgg16 and
vgg16_bn, with every other value as below, the ResNet-18 ones; the paper's numbers below are
ResNet-18's. The run writes workdir/tiny_imagenet, or workdir/tiny_imagenet_<ARG> with an ARG
(workdir/tiny_imagenet_resnet50 above), unless --workdir says otherwise. The authors' other
Tiny-ImageNet runs differ (docs/method.md, section 6.3); this file keeps the ResNet-18 values, so
add their overrides: :resnet50 with --config.stage2.weights.lr=1e-4 --config.stage2.bn.lr=1e-4
--config.stage2.prompt.lr=1e-4 (the development scripts; the official repository keeps 0.01),
:vgg16_bn or :vgg16 with --config.data.batch_size=128 --config.data.eval_batch_size=128
--config.stage1.epochs=20 --config.stage2.epochs=20.

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
  * ImageNet-pretrained weights of the model, passed as --config.model.init_from=PATH: the
    torchvision .pth itself or the .npz that python -m vpns_jax.convert writes from it, e.g.
    python -m vpns_jax.convert --model=resnet18 --input=resnet18-f37072fd.pth --output=resnet18.npz
    (the authors' ResNet-18 weights: torchvision IMAGENET1K_V1; the other models':
    docs/method.md, section 6.1).

Values: all of base.py's, which are the authors' defaults (docs/method.md, section 6) and what
their ResNet-18 Tiny-ImageNet launch script uses: batch 256 (get_model_dataset.py), 30 + 30
epochs, scores and stage-1 prompt Adam 1e-4, weights, BatchNorm and stage-2 prompt SGD 0.01
(momentum 0.9), weight decay 1e-4, epoch cosine schedules; pad prompt 16 px on 224 px inputs
(64 px images upsampled); global threshold.
"""

from vpns_jax.config import base
from vpns_jax.models import MODEL_NAMES


def get_config(model: str | None = None):
    """``model``: the ARG of ``--config=FILE.py:ARG``, one of MODEL_NAMES (none: base.py's resnet18)."""
    config = base.get_config()
    config.data.name = "tiny_imagenet"
    if model:
        if model not in MODEL_NAMES:
            raise ValueError(f"unknown model {model!r}: use one of {', '.join(MODEL_NAMES)} after the ':' "
                             "(none for resnet18)")
        config.model.name = model
    return config
