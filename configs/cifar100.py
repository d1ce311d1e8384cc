"""python -m vpns_jax.main --config=configs/cifar100.py --config.model.init_from=resnet18.npz
python -m vpns_jax.main --config=configs/cifar100.py:resnet50 --config.model.init_from=resnet50.npz

VPNs on CIFAR-100 with an ImageNet-pretrained ResNet-18: the authors' setting.

ARG (after the ':'): the model, one of vpns_jax.models' resnet18 (no ARG), resnet50, vgg16,
vgg16_bn, vit_b_16, vit_b_32 and vit_l_16, with every other value as below, the ResNet-18 ones
(a ViT runs at 224 px, and the pad prompt covers its border patches; torchvision's ViT weights
convert as the CNNs' do, e.g. python -m vpns_jax.convert --model=vit_b_16
--input=vit_b_16-c867db91.pth --output=vit_b_16.npz); the paper's numbers below are ResNet-18's.
The run writes workdir/cifar100, or workdir/cifar100_<ARG> with an ARG (workdir/cifar100_resnet50 above), unless --workdir says otherwise. The authors' ResNet-50 CIFAR-100
run used these same values (docs/method.md, section 6.3), so configs/cifar100.py:resnet50 is that
setting too.

Produces results.json / results.csv in the workdir: test top-1 accuracy (without the prompt,
read through the pretrained 1000-way ImageNet head by frequency label mapping) and sparsity at
each of base.py's densities (1.0, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1: 0-90 % sparsity), one
independent run each from the same pretrained state, with the final masks, weights and prompt
per density. The paper's number for comparison (docs/method.md, section 9, mean of seeds 7, 9,
17): VPNs 80.58 at 90 % sparsity, 82.00 at 80 %; dense 82.10. Other seeds: --config.seed=9 / 17.

Needs:
  * CIFAR-100 prepared under --config.data.data_dir (else $TFDS_DATA_DIR or ~/tensorflow_datasets):
    python -m vpns_jax.data.prepare --dataset=cifar100 --download, once on a machine with network
    and tensorflow-cpu, or copy an already prepared TFDS directory there.
  * ImageNet-pretrained weights of the model, passed as --config.model.init_from=PATH: the
    torchvision .pth itself or the .npz that python -m vpns_jax.convert writes from it, e.g.
    python -m vpns_jax.convert --model=resnet18 --input=resnet18-f37072fd.pth --output=resnet18.npz
    (the authors' ResNet-18 weights: torchvision IMAGENET1K_V1; the other models':
    docs/method.md, section 6.1).

Values: all of base.py's, which are the authors' defaults (docs/method.md, section 6) and what
their CIFAR-100 launch script uses: batch 256 (get_model_dataset.py), 30 + 30 epochs, scores and
stage-1 prompt Adam 1e-4, weights, BatchNorm and stage-2 prompt SGD 0.01 (momentum 0.9), weight
decay 1e-4, epoch cosine schedules; pad prompt 16 px on 224 px inputs; global threshold.
"""

from vpns_jax.config import base
from vpns_jax.models import MODEL_NAMES


def get_config(model: str | None = None):
    """``model``: the ARG of ``--config=FILE.py:ARG``, one of MODEL_NAMES (none: base.py's resnet18)."""
    config = base.get_config()
    config.data.name = "cifar100"
    if model:
        if model not in MODEL_NAMES:
            raise ValueError(f"unknown model {model!r}: use one of {', '.join(MODEL_NAMES)} after the ':' "
                             "(none for resnet18)")
        config.model.name = model
    return config
