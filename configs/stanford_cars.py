"""python -m vpns_jax.main --config=configs/stanford_cars.py --config.model.init_from=resnet18.npz
python -m vpns_jax.main --config=configs/stanford_cars.py:resnet50 --config.model.init_from=resnet50.npz

VPNs on Stanford Cars (196 classes) with an ImageNet-pretrained ResNet-18: the authors' setting.

ARG (after the ':'): the model, one of vpns_jax.models' resnet18 (no ARG), resnet50, vgg16 and
vgg16_bn, with every other value as below, the ResNet-18 ones; the paper's numbers below are
ResNet-18's. The run writes workdir/stanford_cars, or workdir/stanford_cars_<ARG> with an ARG
(workdir/stanford_cars_resnet50 above), unless --workdir says otherwise.

Produces results.json / results.csv in the workdir: test top-1 accuracy (without the prompt,
read through the pretrained 1000-way ImageNet head by frequency label mapping) and sparsity at
each of base.py's densities (1.0, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1: 0-90 % sparsity), one
independent run each from the same pretrained state, with the final masks, weights and prompt
per density. The official train / test split (TFDS cars196), the one behind the authors' Kaggle
car_data/{train,test} folders. The paper's number for comparison (docs/method.md, section 9, mean
of seeds 7, 9, 17): VPNs 84.51 at 90 % sparsity, 86.02 at 80 %; dense 85.39. Other seeds:
--config.seed=9 / 17.

Needs:
  * Stanford Cars prepared as TFDS cars196 under --config.data.data_dir (else $TFDS_DATA_DIR or
    ~/tensorflow_datasets). TFDS's cars196 download URL is dead: prepare cars196 from a manual copy
    of the Stanford Cars archives (see the TFDS cars196 page), then copy the prepared cars196/
    directory into the data dir.
  * ImageNet-pretrained weights of the model, passed as --config.model.init_from=PATH: the
    torchvision .pth itself or the .npz that python -m vpns_jax.convert writes from it, e.g.
    python -m vpns_jax.convert --model=resnet18 --input=resnet18-f37072fd.pth --output=resnet18.npz
    (the authors' ResNet-18 weights: torchvision IMAGENET1K_V1; the other models':
    docs/method.md, section 6.1).

Values:
  * batch 128 (training and evaluation): the authors' StanfordCars batch size in
    get_model_dataset.py (docs/method.md, section 2.2);
  * Adam lr 1e-3 (weight decay 1e-4) for the stage-1 scores and the stage-2 weights and BatchNorm,
    from the authors' StanfordCars launch script (section 6.3); each stage's prompt follows its
    stage's model-side group (stage 1 = the scores', stage 2 = the weights'), because the
    scripts set score_vp_* = score_* and weight_vp_* = weight_*: Adam 1e-3 for both prompts;
  * 30 + 30 epochs, epoch cosine schedules, pad prompt 16 px on 224 px inputs, global threshold:
    base.py's.
"""

from vpns_jax.config import base
from vpns_jax.models import MODEL_NAMES


def get_config(model: str | None = None):
    """``model``: the ARG of ``--config=FILE.py:ARG``, one of MODEL_NAMES (none: base.py's resnet18)."""
    config = base.get_config()
    config.data.name = "stanford_cars"
    if model:
        if model not in MODEL_NAMES:
            raise ValueError(f"unknown model {model!r}: use one of {', '.join(MODEL_NAMES)} after the ':' "
                             "(none for resnet18)")
        config.model.name = model
    config.data.batch_size = 128
    config.data.eval_batch_size = 128
    base.use_everywhere(config, base.optimizer("adam", 1e-3))
    # Baselines on Cars (docs/method.md, section 7): HYDRA's scores Adam 1e-4, BiP Adam 1e-3 throughout.
    config.hydra.scores = base.optimizer("adam", 1e-4)
    config.bip.scores = base.optimizer("adam", 1e-3)
    return config
