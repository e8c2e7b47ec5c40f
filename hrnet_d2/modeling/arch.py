"""The HRNet architecture table.

Every published HRNet is four stages described by the same six numbers per stage;
keeping them as data (not code) makes the table the single source of truth for the
body, the converter's width detection and the README.  Values are those of the
official HRNet-Image-Classification ``experiments/*.yaml`` (identical to timm's
``cfg_cls``).
"""

from dataclasses import dataclass
from typing import Dict, Tuple

__all__ = ["StageSpec", "ARCHITECTURES", "BLOCK_TYPES", "FUSE_METHODS"]

BLOCK_TYPES = ("BASIC", "BOTTLENECK")
FUSE_METHODS = ("SUM",)


@dataclass(frozen=True)
class StageSpec:
    num_modules: int
    num_branches: int
    block: str
    num_blocks: Tuple[int, ...]
    num_channels: Tuple[int, ...]
    fuse_method: str = "SUM"


def _standard(width: int) -> Tuple[StageSpec, ...]:
    """W18 ... W64 differ only in the base width C of the stride-4 branch."""
    c = width
    return (
        StageSpec(1, 1, "BOTTLENECK", (4,), (64,)),
        StageSpec(1, 2, "BASIC", (4, 4), (c, 2 * c)),
        StageSpec(4, 3, "BASIC", (4, 4, 4), (c, 2 * c, 4 * c)),
        StageSpec(3, 4, "BASIC", (4, 4, 4, 4), (c, 2 * c, 4 * c, 8 * c)),
    )


ARCHITECTURES: Dict[str, Tuple[StageSpec, ...]] = {
    # timm: hrnet_w18_small; official: hrnet_w18_small_model_v1
    "w18_small_v1": (
        StageSpec(1, 1, "BOTTLENECK", (1,), (32,)),
        StageSpec(1, 2, "BASIC", (2, 2), (16, 32)),
        StageSpec(1, 3, "BASIC", (2, 2, 2), (16, 32, 64)),
        StageSpec(1, 4, "BASIC", (2, 2, 2, 2), (16, 32, 64, 128)),
    ),
    # timm: hrnet_w18_small_v2; official: hrnet_w18_small_model_v2
    "w18_small_v2": (
        StageSpec(1, 1, "BOTTLENECK", (2,), (64,)),
        StageSpec(1, 2, "BASIC", (2, 2), (18, 36)),
        StageSpec(3, 3, "BASIC", (2, 2, 2), (18, 36, 72)),
        StageSpec(2, 4, "BASIC", (2, 2, 2, 2), (18, 36, 72, 144)),
    ),
    **{f"w{w}": _standard(w) for w in (18, 30, 32, 40, 44, 48, 64)},
}
