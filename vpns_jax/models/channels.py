"""A network's channel layout, as channel masks and the channel shrink read it: ``ChannelGroup`` and tree paths.

The models own this description (``core.structured`` builds the groups of each model and masks them;
``models.shrink`` removes what the masks prune), so the models never read the core.
"""

from __future__ import annotations

import dataclasses
from typing import Any

Path = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """One per-output-channel mask and everything it gates.

    ``convs`` are kernel paths whose output channels (last axis) the mask
    gates: the owning conv first, then followers (a block's downsample conv).
    ``bns`` are paths of the BatchNorm modules after those convs.
    ``consumers`` are kernel paths whose input channels (axis -2) read this
    output only through the mask.
    A unit (channel, attention head) spans ``unit_width`` consecutive entries
    of those axes, and the owning kernels' output axis holds ``blocks`` copies
    of the pattern (3 for a fused q|k|v projection).
    """

    name: str
    convs: tuple[Path, ...]
    bns: tuple[Path, ...]
    consumers: tuple[Path, ...]
    num_channels: int
    capped: bool
    unit_width: int = 1
    blocks: int = 1

    @property
    def owner(self) -> Path:
        """Kernel path of the conv that owns the scores."""
        return self.convs[0]


def at(tree: Any, path: Path) -> Any:
    """The entry of nested dicts (or lists) ``tree`` at ``path``: ``tree[path[0]][path[1]]...``."""
    for key in path:
        tree = tree[key]
    return tree


__all__ = ["ChannelGroup", "at"]
