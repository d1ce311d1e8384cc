"""Shared values of every vpns_jax config: the authors' reference setting (docs/method.md, section 6).

Not a runnable config by itself: config files call ``vpns_jax.config.base.get_config()`` and
change what differs. The run-wide fields are listed here and every built-in
method adds its own sections with their defaults (``vpns_jax/methods/``), so
``--config.a.b=value`` overrides work on any config.
"""

import ml_collections

from vpns_jax import methods

# One parameter group's optimiser config, for the dataset configs (vpns_jax.methods.base.optimizer).
optimizer = methods.optimizer


def use_everywhere(config: ml_collections.ConfigDict, group: ml_collections.ConfigDict) -> None:
    """Gives every parameter group of both stages the same optimiser (the authors' Flowers102/Cars scripts)."""
    for stage, name in (("stage1", "scores"), ("stage1", "prompt"), ("stage2", "weights"), ("stage2", "bn"),
                        ("stage2", "prompt")):
        config[stage][name] = ml_collections.ConfigDict(group.to_dict())


def get_config() -> ml_collections.ConfigDict:
    """Every field with its default; config files change what differs."""
    config = ml_collections.ConfigDict()
    # vpns, or a baseline: hydra, bip, omp, lth, random, snip, grasp, synflow, dense, the "+ VP" variants
    # omp_vp, lth_vp, random_vp, and (with mask.granularity='channel') slim. See vpns_jax/methods/.
    config.method = "vpns"
    config.seed = 7
    # Keep ratios, one independent run each from the same initial state (the reference's list).
    config.densities = (1.0, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)

    config.model = _model()
    config.data = _data()
    config.source = _source()
    config.prompt = _prompt()
    config.mask = _mask()

    # Each method's own sections (stage1, stage2, vpns, structured, hydra, finetune, bip, oneshot, slim), with
    # their defaults and comments in the method's module under vpns_jax/methods/ (docs/methods.md).
    methods.add_sections(config)

    # Subnetwork transfer: take each density's masks (and prompt) from a finished run's workdir on another
    # dataset and only finetune here (give the same model.init_from that run pruned).
    config.transfer = ml_collections.ConfigDict()
    config.transfer.masks_from = ""

    config.eval = ml_collections.ConfigDict()
    config.eval.with_prompt = False  # the authors evaluate without the prompt
    # Also test after every N-th epoch of each stage (0: only at the end), for time-to-accuracy: each epoch's
    # record in metrics.jsonl then holds the test metrics beside its training seconds and optimiser steps.
    config.eval.every_epochs = 0

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 500  # iterations between checkpoints (and at every stage end)
    config.checkpoint.max_to_keep = 3

    config.log_every_steps = 50
    # A step whose loss or update is NaN/Inf never reaches the state; then 'stop' the run (its checkpoints
    # hold the state from before that step) or 'skip' the batch and go on (vpns_jax.core.health).
    config.on_nonfinite = "stop"
    config.compilation_cache_dir = ""  # '' = ~/.cache/vpns_jax/xla; 'none' disables the persistent cache
    return config


def _model() -> ml_collections.ConfigDict:
    """The network and its pretrained weights."""
    section = ml_collections.ConfigDict()
    section.name = "resnet18"
    section.width = 1.0
    section.stem = "imagenet"
    section.num_classes = 1000  # the source head that label mapping reads
    section.init_from = ""  # a torchvision .pth/.safetensors state dict, or a vpns_jax .npz (vpns_jax.convert)
    # Compute dtype of convs, matmuls and activations: 'float32' or 'bfloat16' (TPUs, recent GPUs). Parameters,
    # scores, masks, prompt and optimiser state stay float32; BatchNorm statistics, the loss and the threshold
    # search run in at least float32 (docs/performance.md, "Precision").
    section.dtype = "float32"
    # Kernels: 'auto' uses the CPU ones (im2col convs on maps of <= 4 px, the max-pool's argmax VJP) on the CPU
    # backend only and plain lax ops on GPU and TPU; 'lax' / 'im2col' and 'lax' / 'argmax' force one.
    section.conv_impl = "auto"
    section.pool_impl = "auto"
    # ViTs only (vit_b_16, vit_b_32, vit_l_16): each field overrides the named shape, 0 = the name's own; the
    # image side the position embedding is made for is prompt.output_size (the network's input).
    section.vit = ml_collections.ConfigDict(
        {"patch_size": 0, "num_layers": 0, "num_heads": 0, "hidden_dim": 0, "mlp_dim": 0})
    return section


def _data() -> ml_collections.ConfigDict:
    """The target task's dataset and loader."""
    section = ml_collections.ConfigDict()
    section.name = "cifar10"
    section.data_dir = ""  # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
    section.classes = ()  # () = every class; else this subset, relabelled 0..k-1 in order
    section.train_limit = 0  # 0 = every training example
    section.test_limit = 0
    section.batch_size = 256  # global, over all devices and processes
    section.eval_batch_size = 256
    section.num_threads = 4  # loader threads in this process, when there are no worker processes
    # Worker processes that decode and augment (the same batches either way): -1 = auto, none on the CPU
    # backend (training uses every core there), else one per CPU core but one, at most 16; 0 = none.
    section.workers = -1
    section.auto_prepare = True  # prepare offline-preparable datasets (fashion_mnist, digits) if missing
    return section


def _source() -> ml_collections.ConfigDict:
    """Dense pretraining of the source model on another task, cached in the workdir: the offline stand-in for
    ImageNet pretraining. Off for the paper configs."""
    section = ml_collections.ConfigDict()
    section.enabled = False
    section.dataset = ""
    section.classes = ()
    section.train_limit = 0
    section.epochs = 2
    section.batch_size = 64
    section.optimizer = optimizer("sgd", 0.05)
    return section


def _prompt() -> ml_collections.ConfigDict:
    """The visual prompt's kind and sizes."""
    section = ml_collections.ConfigDict()
    section.kind = "pad"
    section.input_size = 224
    section.output_size = 224
    section.pad_size = 16
    section.mask_size = 115
    return section


def _mask() -> ml_collections.ConfigDict:
    """What a mask's unit is and how its threshold is taken."""
    section = ml_collections.ConfigDict()
    section.scope = "global"  # 'global' (VPNs, the authors' HYDRA) or 'layer' (original HYDRA)
    # A mask's unit: 'weight' (unstructured), 'channel' (one score per conv output channel, ViT head or MLP unit),
    # or N:M such as '2:4' / '1:4' / '4:8': every M consecutive input entries of a kernel keep their N largest
    # (methods vpns, hydra, omp, omp_vp; densities=(N/M,)). docs/method.md, section 4.6.
    section.granularity = "weight"
    # Layer floor: every prunable layer (channel group) keeps at least ceil(f * n) of its n entries, so the
    # global threshold cannot empty one; the density becomes a lower bound. 0.0 = the authors' rule.
    section.min_layer_density = 0.0
    return section
