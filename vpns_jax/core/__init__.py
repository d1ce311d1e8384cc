"""The functional core: pure functions over pytrees that a fork builds its own loop from.

masking (scores, thresholds, straight-through masks), structured (channel masks),
prompts, label_mapping, optim (stage-partitioned optimisers), phases (what a
stage trains and the ``Iteration`` that feeds it), steps (the jitted training
and evaluation steps over an explicit ``TrainState``), dense (plain
dense training), health (non-finite steps) and parallel (the device mesh).
Nothing here reads a config, a file or the clock.
"""
