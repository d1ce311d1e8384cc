"""Shared values of every vpns_jax config: the authors' reference setting (docs/method.md, section 6).

Not a runnable config by itself: dataset configs call ``get_config()`` here and
change what differs. Every field is listed here, so ``--config.a.b=value``
overrides work on any config.
"""

import ml_collections


def optimizer(name: str, lr: float, weight_decay: float = 1e-4, momentum: float = 0.9,
              clip_value: float = 0.0) -> ml_collections.ConfigDict:
    """One parameter group's torch-style optimiser (see vpns_jax.core.optim.GroupOptimizer); clip_value 0 = no clipping."""
    return ml_collections.ConfigDict({"optimizer": name, "lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                                      "clip_value": clip_value})


def use_everywhere(config: ml_collections.ConfigDict, group: ml_collections.ConfigDict) -> None:
    """Gives every parameter group of both stages the same optimiser (the authors' Flowers102/Cars scripts)."""
    for stage, name in (("stage1", "scores"), ("stage1", "prompt"), ("stage2", "weights"), ("stage2", "bn"),
                        ("stage2", "prompt")):
        config[stage][name] = ml_collections.ConfigDict(group.to_dict())


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # vpns, or a baseline: hydra, bip, omp, lth, random, snip, grasp, synflow, dense, the "+ VP" variants
    # omp_vp, lth_vp, random_vp, and (with mask.granularity='channel') slim. See vpns_jax/methods.py.
    config.method = "vpns"
    config.seed = 7
    # Keep ratios, one independent run each from the same initial state (the reference's list).
    config.densities = (1.0, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)

    config.model = ml_collections.ConfigDict()
    config.model.name = "resnet18"
    config.model.width = 1.0
    config.model.stem = "imagenet"
    config.model.num_classes = 1000  # the source head that label mapping reads
    config.model.init_from = ""  # a torchvision .pth/.safetensors state dict, or a vpns_jax .npz (vpns_jax.convert)

    config.data = ml_collections.ConfigDict()
    config.data.name = "cifar10"
    config.data.data_dir = ""  # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
    config.data.classes = ()  # () = every class; else this subset, relabelled 0..k-1 in order
    config.data.train_limit = 0  # 0 = every training example
    config.data.test_limit = 0
    config.data.batch_size = 256  # global, over all devices and processes
    config.data.eval_batch_size = 256
    config.data.num_threads = 4
    config.data.auto_prepare = True  # prepare offline-preparable datasets (fashion_mnist, digits) if missing

    # Dense pretraining of the source model on another task, cached in the workdir: the
    # offline stand-in for ImageNet pretraining. Off for the paper configs.
    config.source = ml_collections.ConfigDict()
    config.source.enabled = False
    config.source.dataset = ""
    config.source.classes = ()
    config.source.train_limit = 0
    config.source.epochs = 2
    config.source.batch_size = 64
    config.source.optimizer = optimizer("sgd", 0.05)

    config.prompt = ml_collections.ConfigDict()
    config.prompt.kind = "pad"
    config.prompt.input_size = 224
    config.prompt.output_size = 224
    config.prompt.pad_size = 16
    config.prompt.mask_size = 115

    config.mask = ml_collections.ConfigDict()
    config.mask.scope = "global"  # 'global' (VPNs, the authors' HYDRA) or 'layer' (original HYDRA)
    config.mask.granularity = "weight"  # 'weight' (unstructured) or 'channel' (one score per conv output channel)

    config.stage1 = ml_collections.ConfigDict()
    config.stage1.epochs = 30
    config.stage1.scores = optimizer("adam", 1e-4)
    config.stage1.prompt = optimizer("adam", 1e-4)

    config.stage2 = ml_collections.ConfigDict()
    config.stage2.epochs = 30
    config.stage2.weights = optimizer("sgd", 0.01)  # conv/dense kernels and biases
    config.stage2.bn = optimizer("sgd", 0.01)  # BatchNorm affine
    config.stage2.prompt = optimizer("sgd", 0.01)

    # Ablations of unstructured VPNs (all else unchanged: optimisers, schedules, epochs). prompt_stages: the
    # stages that learn a prompt, (1, 2) as the paper, () for none (the state keeps the export format's zero
    # frame, never differentiated); streams: 'two' (prompted clean batch + plain augmented batch, the paper),
    # 'prompted' (the clean batch only, prompted in prompt_stages) or 'plain' (the augmented batch only).
    config.vpns = ml_collections.ConfigDict()
    config.vpns.prompt_stages = (1, 2)
    config.vpns.streams = "two"

    # Baselines (docs/method.md, section 7). Their weights, BatchNorm and "+ VP" prompt groups are stage2's.
    config.hydra = ml_collections.ConfigDict()
    config.hydra.prune_epochs = 60
    config.hydra.finetune_epochs = 60
    config.hydra.scores = optimizer("sgd", 0.01)

    config.bip = ml_collections.ConfigDict()
    config.bip.epochs = 60
    config.bip.scores = optimizer("adam", 1e-4)
    config.bip.bilevel_lr = 1e-4  # the implicit-gradient coefficient ('bil_lr')

    # The mask-then-finetune baselines: omp, lth, random, snip, grasp, synflow, dense and the "+ VP" variants.
    config.finetune = ml_collections.ConfigDict()
    config.finetune.epochs = 120
    config.finetune.dense_epochs = 120  # OMP's and LTH's dense finetune before the first mask
    config.finetune.lth_fraction = 0.2  # of the remaining weights, pruned per LTH round

    config.oneshot = ml_collections.ConfigDict()
    config.oneshot.batches = 10  # training batches (eval_batch_size each) SNIP and GraSP score on
    config.oneshot.grasp_temperature = 200.0
    config.oneshot.synflow_iterations = 100

    # Structured (mask.granularity='channel') VPNs: dense warm-up, pruning, finetune (the authors' D repo).
    config.structured = ml_collections.ConfigDict()
    config.structured.warmup_epochs = 5
    config.structured.prune_epochs = 5
    config.structured.finetune_epochs = 30
    config.structured.channel_max = 0.25  # at most this channel sparsity in the stem and the first stage
    config.structured.scores = optimizer("adam", 1.0, weight_decay=0.1, clip_value=0.25)
    config.structured.prompt = optimizer("adam", 1e-3)

    config.slim = ml_collections.ConfigDict()
    config.slim.l1 = 1e-4  # L1 on BatchNorm scales during the sparsity training
    config.slim.epochs = 10  # sparsity training; then each density prunes and finetunes structured.finetune_epochs

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
