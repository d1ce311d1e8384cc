"""python -m vpns_jax.main --config=configs/default.py
python -m vpns_jax.main --config=configs/default.py:hydra

The offline default: VPNs (or the method the ARG after ':' names) on real data that is available without
network, in about 3 minutes on 2 CPU cores. Writes workdir/default, or workdir/default_<ARG> with an ARG
(workdir/default_hydra above), unless --workdir says otherwise.

ARG: a method name (config.method; the list is vpns_jax.methods.names(): vpns, hydra, bip, omp, lth,
random, snip, grasp, synflow, dense, the "+ VP" variants omp_vp, lth_vp, random_vp, ...) on the same task,
each at scaled-down epochs. 'slim' only exists at channel granularity and gets mask.granularity='channel'
too; 'vpns_channel' is structured VPNs (method vpns, mask.granularity='channel'). No ARG: unstructured VPNs.
An unknown ARG stops the run with a one-line error that lists the methods.

The task (a dense ResNet-18 at width 1/4 pretrained on Fashion-MNIST classes 0-4, then pruned on classes 5-9)
and every value it sets are in vpns_jax/config/offline.py, shared with configs/default_vit.py.
"""

from vpns_jax.config import offline


def get_config(method: str | None = None):
    """The offline default; ``method`` (the ARG of ``--config=configs/default.py:ARG``) picks the method."""
    return offline.resnet(method)
