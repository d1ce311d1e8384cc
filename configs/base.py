"""Shared values of every vpns_jax config: the authors' reference setting (vpns-method.md section 4).

Not a runnable config by itself: dataset configs call ``get_config()`` here and
change what differs. Every field is listed here, so ``--config.a.b=value``
overrides work on any config.
"""

import ml_collections


def optimizer(name: str, lr: float, weight_decay: float = 1e-4, momentum: float = 0.9) -> ml_collections.ConfigDict:
    """One parameter group's torch-style optimiser (see vpns_jax.optim.GroupOptimizer)."""
    return ml_collections.ConfigDict({"optimizer": name, "lr": lr, "weight_decay": weight_decay, "momentum": momentum})


def use_everywhere(config: ml_collections.ConfigDict, group: ml_collections.ConfigDict) -> None:
    """Gives every parameter group of both stages the same optimiser (the authors' Flowers102/Cars scripts)."""
    for stage, name in (("stage1", "scores"), ("stage1", "prompt"), ("stage2", "weights"), ("stage2", "bn"),
                        ("stage2", "prompt")):
        config[stage][name] = ml_collections.ConfigDict(group.to_dict())


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
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

    config.stage1 = ml_collections.ConfigDict()
    config.stage1.epochs = 30
    config.stage1.scores = optimizer("adam", 1e-4)
    config.stage1.prompt = optimizer("adam", 1e-4)

    config.stage2 = ml_collections.ConfigDict()
    config.stage2.epochs = 30
    config.stage2.weights = optimizer("sgd", 0.01)  # conv/dense kernels and biases
    config.stage2.bn = optimizer("sgd", 0.01)  # BatchNorm affine
    config.stage2.prompt = optimizer("sgd", 0.01)

    config.eval = ml_collections.ConfigDict()
    config.eval.with_prompt = False  # the authors evaluate without the prompt

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 500  # iterations between checkpoints (and at every stage end)
    config.checkpoint.max_to_keep = 3

    config.log_every_steps = 50
    config.compilation_cache_dir = ""  # '' = ~/.cache/vpns_jax/xla; 'none' disables the persistent cache
    return config
