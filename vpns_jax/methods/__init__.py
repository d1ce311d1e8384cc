"""The pruning methods (temporary: re-exports plans during the relayout)."""
from vpns_jax.methods.plans import *  # noqa: F401,F403
from vpns_jax.methods.plans import METHODS, LEARNED, ONE_SHOT, Method, Plan, Unit, get_method, make_plan, lth_densities  # noqa: F401
