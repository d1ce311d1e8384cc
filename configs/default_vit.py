"""python -m vpns_jax.main --config=configs/default_vit.py
python -m vpns_jax.main --config=configs/default_vit.py:hydra

The offline default (vpns_jax/config/offline.py: the same task, densities, prompt, epochs and optimisers) with a small
Vision Transformer in place of the ResNet-18: torchvision's vit_b_16 layout shrunk to 32 px inputs in 8 px
patches (16 patches and a class token), 4 pre-norm blocks of 4 heads, width 64, MLP 128. 8 px patches, not
4: 17 tokens instead of 65, so that its sweep (experiments/vit_suite.py) runs in about an hour on 2 CPU cores
rather than several (the step costs are in experiments/results/vit/README.md). Writes
workdir/default_vit, or workdir/default_vit_<ARG> with an ARG, unless --workdir says otherwise.

ARG: a method name, as for configs/default.py ('vpns_channel' is structured VPNs: one score per attention head
and per MLP hidden unit). 'slim' prunes BatchNorm scales, which a ViT has none of: it is refused.

What differs from the ResNet default, and why: the source model trains from scratch for 6 epochs with Adam
1e-3 (SGD 0.05, the ResNet's, leaves a ViT this small far below it after 2 epochs); everything after the
source model is the ResNet default's, so the two suites (experiments/results/sweep and
experiments/results/vit) differ by the network alone.
"""

from vpns_jax.config import offline


def get_config(method: str | None = None):
    """The ViT offline default; ``method`` (the ARG of ``--config=configs/default_vit.py:ARG``) picks the method."""
    return offline.vit(method)
