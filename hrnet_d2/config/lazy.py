"""Helpers for LazyConfig (``configs/lazy/*.py``): Python configs call these by name."""

from ..modeling.arch import ARCHITECTURES

__all__ = ["stage_specs"]


def stage_specs(arch: str):
    """The StageSpecs of a named architecture, so a lazy config can say ``arch="w32"``
    (overridable on the command line) instead of spelling out four StageSpecs."""
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"model.backbone.bottom_up.stages.arch = {arch!r} is invalid: allowed: {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[arch]
