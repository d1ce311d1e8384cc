"""python -m vpns_jax.main --config=configs/stanford_cars.py --workdir=workdir/stanford_cars --config.model.init_from=PATH

VPNs on Stanford Cars (196 classes) with an ImageNet-pretrained ResNet-18: the authors' setting.

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
  * ImageNet-pretrained ResNet-18 weights (torchvision IMAGENET1K_V1, as the authors used)
    passed as --config.model.init_from=PATH: the torchvision .pth itself (e.g. resnet18-f37072fd.pth)
    or the .npz that python -m vpns_jax.convert writes from it.

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

from configs import base


def get_config():
    config = base.get_config()
    config.data.name = "stanford_cars"
    config.data.batch_size = 128
    config.data.eval_batch_size = 128
    base.use_everywhere(config, base.optimizer("adam", 1e-3))
    # Baselines on Cars (docs/method.md, section 7): HYDRA's scores Adam 1e-4, BiP Adam 1e-3 throughout.
    config.hydra.scores = base.optimizer("adam", 1e-4)
    config.bip.scores = base.optimizer("adam", 1e-3)
    return config
