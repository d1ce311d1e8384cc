"""The method registry: registering, the config sections methods bring, and the checks it runs for them."""

import ml_collections
import pytest

from vpns_jax.config import offline
from vpns_jax import config_checks, methods
from vpns_jax.methods import registry


class _Toy(methods.Method):
    name = "toy_registry_method"
    sections = (methods.Section("toy", lambda: ml_collections.ConfigDict({"epochs": 2}), epochs=("epochs",)),
                methods.STAGE2)

    def plan(self, config):
        return methods.finetune_plan(self, config, prompt=False, epochs=config.toy.epochs)


def test_builtin_methods_and_their_sections():
    assert methods.names()[:3] == ("vpns", "hydra", "bip") and "slim" in methods.names()
    names = [s.name for s in methods.sections(builtin_only=True)]
    assert len(names) == len(set(names))  # each section once, though several methods read it
    assert set(names) == {"stage1", "stage2", "vpns", "structured", "hydra", "finetune", "bip", "oneshot", "slim"}
    config = offline.resnet()
    assert all(name in config for name in names)  # vpns_jax/config/base.py adds every built-in section


def test_a_builtin_name_cannot_be_taken_and_a_new_method_can_be_replaced():
    with pytest.raises(ValueError, match="'hydra' is built in"):
        methods.register(type("Other", (_Toy,), {"name": "hydra"})())
    with pytest.raises(ValueError, match="Python identifier"):
        methods.register(type("Bad", (_Toy,), {"name": "not a name"})())
    first, second = methods.register(_Toy()), methods.register(_Toy())
    assert methods.get_method(_Toy.name) is second is not first
    assert "toy" not in [s.name for s in methods.sections(builtin_only=True)]


def test_a_registered_method_runs_its_sections_checks_and_plan():
    method = methods.register(_Toy())
    config = offline.resnet()
    config.method = method.name
    with pytest.raises(config_checks.ConfigError, match="config.toy is missing, but method 'toy_registry_method'"):
        config_checks.validate(config, num_devices=1)
    methods.add_sections(config, method)
    config_checks.validate(config, num_devices=1)
    plan = methods.make_plan(config)
    assert plan.method is method and plan.epochs == {2: 2} and [u.density for u in plan.units] == [0.5, 0.1, 0.05,
                                                                                                     0.02]
    config.toy.epochs = 0
    with pytest.raises(config_checks.ConfigError, match=r"config.toy.epochs=0 must be an integer >= 1"):
        config_checks.validate(config, num_devices=1)


def test_transfer_is_refused_for_methods_without_a_transfer_plan_and_lists_those_with_one():
    method = methods.register(_Toy())
    config = offline.resnet()
    methods.add_sections(config, method)
    config.method, config.transfer.masks_from = method.name, "workdir/a"
    with pytest.raises(config_checks.ConfigError, match="does not find a mask to transfer: use one of "
                                                        "vpns, hydra, bip, omp, omp_vp$"):
        registry.make_plan(config)
