"""The pruning methods, as plug-ins: one module per method or family, and a registry that maps names to them.

Built in: vpns (vpns.py), hydra (hydra.py), bip (bip.py), omp/lth and their
"+ VP" variants (magnitude.py), random/snip/grasp/synflow (prune_at_init.py),
dense (finetune.py) and slim (slim.py); transfer.py checks the masks taken
from another run. The one-shot importance and selection they share are
``vpns_jax.core.saliency`` and ``vpns_jax.core.selection``.
A method is a ``base.Method``; ``register`` adds a new one (see
``experiments/custom_method.py`` and docs/methods.md).
"""

from vpns_jax.methods.base import (STAGE2, LearnedScores, Method, MethodContext, Plan, Section, Unit,
                                   finetune_phase, finetune_plan, optimizer, weights_groups)
from vpns_jax.methods.bip import BiP
from vpns_jax.methods.finetune import Dense, MaskThenFinetune
from vpns_jax.methods.hydra import Hydra
from vpns_jax.methods.magnitude import LTH, OMP, lth_densities
from vpns_jax.methods.prune_at_init import SNIP, GraSP, Random, SynFlow
from vpns_jax.methods.registry import (add_sections, check_config, check_pattern, get_method, initial_scores,
                                       make_plan, names, nm_methods, register, sections, unit_start)
from vpns_jax.methods.slim import Slim
from vpns_jax.methods.vpns import VPNs

for _method in (
    VPNs(),
    Hydra(),
    BiP(),
    OMP("omp", "dense finetune, global magnitude mask, rewind, finetune"),
    OMP("omp_vp", "OMP finetuned with a prompt", finetune_prompt=True),
    LTH("lth", "iterative magnitude pruning, 20% per round, rewind"),
    LTH("lth_vp", "LTH finetuned with a prompt", finetune_prompt=True),
    Random("random", "per-layer uniform random mask, finetune"),
    Random("random_vp", "random mask finetuned with a prompt", finetune_prompt=True),
    SNIP("snip", "SNIP |g*W| at the pretrained weights, finetune"),
    GraSP("grasp", "GraSP W*Hg at the pretrained weights, finetune"),
    SynFlow("synflow", "iterative SynFlow at the pretrained weights, finetune"),
    Dense("dense", "full finetune, no mask"),
    Slim(),
):
    register(_method, builtin=True)

__all__ = ["STAGE2", "BiP", "Dense", "GraSP", "Hydra", "LTH", "LearnedScores", "MaskThenFinetune", "Method",
           "MethodContext", "OMP", "Plan", "Random", "SNIP", "Section", "Slim", "SynFlow", "Unit", "VPNs",
           "add_sections", "check_config", "check_pattern", "finetune_phase", "finetune_plan", "get_method",
           "initial_scores", "lth_densities", "make_plan", "names", "nm_methods", "optimizer", "register", "sections",
           "unit_start", "weights_groups"]
