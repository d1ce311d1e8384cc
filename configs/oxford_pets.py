"""python -m vpns_jax.main --config=configs/oxford_pets.py --config.model.init_from=resnet18.npz
python -m vpns_jax.main --config=configs/oxford_pets.py:resnet50 --config.model.init_from=resnet50.npz

VPNs on Oxford-IIIT Pets (37 classes) with an ImageNet-pretrained ResNet-18: the authors'
setting.

ARG (after the ':'): the model, one of vpns_jax.models' resnet18 (no ARG), resnet50, vgg16 and
vgg16_bn, with every other value as below, the ResNet-18 ones; the paper's numbers below are
ResNet-18's. The run writes workdir/oxford_pets, or workdir/oxford_pets_<ARG> with an ARG
(workdir/oxford_pets_resnet50 above), unless --workdir says otherwise.

Produces results.json / results.csv in the workdir: test top-1 accuracy (without the prompt,
read through the pretrained 1000-way ImageNet head by frequency label mapping) and sparsity at
each of base.py's densities (1.0, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1: 0-90 % sparsity), one
independent run each from the same pretrained state, with the final masks, weights and prompt
per density. As in the authors' code, training uses trainval (TFDS 'train') and testing 'test'.
The paper's number for comparison (docs/method.md, section 9, mean over seeds): VPNs 85.41 at
90 % sparsity, 87.95 at 80 %; dense 90.36. The authors' Pets script lists seeds 9 and 17 only:
--config.seed=9 / 17.

Needs:
  * Oxford-IIIT Pets prepared under --config.data.data_dir (else $TFDS_DATA_DIR or
    ~/tensorflow_datasets): python -m vpns_jax.data.prepare --dataset=oxford_iiit_pet --download,
    once on a machine with network and tensorflow-cpu, or copy an already prepared TFDS directory
    there.
  * ImageNet-pretrained weights of the model, passed as --config.model.init_from=PATH: the
    torchvision .pth itself or the .npz that python -m vpns_jax.convert writes from it, e.g.
    python -m vpns_jax.convert --model=resnet18 --input=resnet18-f37072fd.pth --output=resnet18.npz
    (the authors' ResNet-18 weights: torchvision IMAGENET1K_V1; the other models':
    docs/method.md, section 6.1).

Values:
  * batch 64 (training and evaluation): the authors' OxfordPets batch size in
    get_model_dataset.py (docs/method.md, section 2.2);
  * stage-1 scores SGD lr 0.05 (momentum 0.9, weight decay 1e-4), from the authors' Pets launch
    script (section 6.3), and so the stage-1 prompt too: the scripts set score_vp_* = score_*;
  * weights, BatchNorm and stage-2 prompt SGD 0.01 (base.py; the script's weight_* and
    weight_vp_* = weight_*), 30 + 30 epochs, epoch cosine schedules, pad prompt 16 px on 224 px
    inputs, global threshold: base.py's.
"""

from vpns_jax.config import base
from vpns_jax.models import MODEL_NAMES


def get_config(model: str | None = None):
    """``model``: the ARG of ``--config=FILE.py:ARG``, one of MODEL_NAMES (none: base.py's resnet18)."""
    config = base.get_config()
    config.data.name = "oxford_iiit_pet"
    if model:
        if model not in MODEL_NAMES:
            raise ValueError(f"unknown model {model!r}: use one of {', '.join(MODEL_NAMES)} after the ':' "
                             "(none for resnet18)")
        config.model.name = model
    config.data.batch_size = 64
    config.data.eval_batch_size = 64
    config.stage1.scores = base.optimizer("sgd", 0.05)
    config.stage1.prompt = base.optimizer("sgd", 0.05)
    return config
