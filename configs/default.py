"""python -m vpns_jax.main --config=configs/default.py
python -m vpns_jax.main --config=configs/default.py:hydra

The offline default: VPNs (or the method the ARG after ':' names) on real data that is available without
network, in about 3 minutes on 2 CPU cores. Writes workdir/default, or workdir/default_<ARG> with an ARG
(workdir/default_hydra above), unless --workdir says otherwise.

ARG: a method name (config.method; the list is vpns_jax.methods.names(): vpns, hydra, bip, omp, lth,
random, snip, grasp, synflow, dense, the "+ VP" variants omp_vp, lth_vp, random_vp, ...) on the same task,
each at this file's scaled-down epochs below. 'slim' only exists at channel granularity and gets
mask.granularity='channel' too; 'vpns_channel' is structured VPNs (method vpns, mask.granularity='channel').
No ARG: unstructured VPNs. An unknown ARG stops the run with a one-line error that lists the methods.

Source task (the offline analogue of ImageNet pretraining): a dense ResNet-18 at
width 1/4 (ImageNet stem) trained for 2 epochs on Fashion-MNIST classes 0-4
(30,000 images), cached in the workdir. Target task: Fashion-MNIST classes 5-9
(2,000 training images, all 5,000 test images), read through the 5-way source
head by frequency label mapping, then pruned with VPNs at densities 0.5, 0.1,
0.05 and 0.02. Fashion-MNIST 10-way -> scikit-learn digits saturates (every
method lands at 97-99 %), the class split separates methods at high sparsity.
Images are 28 px upsampled to 32, grey replicated to 3 channels; the pad prompt
is 4 px wide (the 16/224 frame scaled). With ~60x fewer optimiser steps than the
paper, stage 1 uses Adam lr 3e-3 for scores and prompt instead of 1e-4.
Produces results.json / results.csv (density, sparsity, test accuracy, wall
time) and the final masks, weights and prompt per density in the workdir.
"""

from configs import base


# ARGs that run at channel granularity, and the method each sets.
CHANNEL_ARGS = {"slim": "slim", "vpns_channel": "vpns"}


def get_config(method: str | None = None):
    """The offline default; ``method`` (the ARG of ``--config=configs/default.py:ARG``) picks the method.

    An unknown name is left to vpns_jax.config_checks.validate, which lists the methods (this file does not
    import the method registry).
    """
    config = base.get_config()
    if method in CHANNEL_ARGS:
        config.method = CHANNEL_ARGS[method]
        config.mask.granularity = "channel"
    elif method:
        config.method = method
    config.densities = (0.5, 0.1, 0.05, 0.02)

    config.model.width = 0.25
    config.model.num_classes = 5

    config.data.name = "fashion_mnist"
    config.data.classes = (5, 6, 7, 8, 9)
    config.data.train_limit = 2000
    config.data.batch_size = 64
    config.data.eval_batch_size = 200  # divides over 1, 2, 4 or 8 devices
    config.data.num_threads = 2

    config.source.enabled = True
    config.source.dataset = "fashion_mnist"
    config.source.classes = (0, 1, 2, 3, 4)
    config.source.epochs = 2
    config.source.batch_size = 64

    config.prompt.input_size = 32
    config.prompt.output_size = 32
    config.prompt.pad_size = 4

    config.stage1.epochs = 3
    config.stage1.scores = base.optimizer("adam", 3e-3)
    config.stage1.prompt = base.optimizer("adam", 3e-3)
    config.stage2.epochs = 3

    # Baselines at the same scale: the paper's epochs x 0.1 (VPNs 30 + 30 two-stream epochs -> 3 + 3), so
    # HYDRA 60 + 60 -> 6 + 6, BiP 60 -> 6, the finetunes 120 -> 12. Score optimisers as VPNs' stage 1 here
    # (Adam 3e-3): with ~60x fewer steps than the paper, the reference's SGD 0.01 barely moves the scores,
    # and the same optimiser isolates what the prompt and the two streams add.
    config.hydra.prune_epochs = 6
    config.hydra.finetune_epochs = 6
    config.hydra.scores = base.optimizer("adam", 3e-3)
    config.bip.epochs = 6
    config.bip.scores = base.optimizer("adam", 3e-3)
    config.finetune.epochs = 12
    config.finetune.dense_epochs = 12
    config.structured.warmup_epochs = 1
    config.structured.prune_epochs = 1
    config.structured.finetune_epochs = 6
    config.slim.epochs = 2

    config.checkpoint.every_steps = 100
    config.log_every_steps = 10
    return config
