"""Helpers for LazyConfig (``configs/lazy/*.py``): Python configs call these by name."""

from ..modeling.arch import ARCHITECTURES
from ..utils.errors import ArgumentValueError

__all__ = ["stage_specs"]


def stage_specs(arch: str):
    """The StageSpecs of a named architecture, so a lazy config can say ``arch="w32"``
    (overridable on the command line) instead of spelling out four StageSpecs.  A wrong name
    is reported under its LazyConfig path (``model.backbone.bottom_up.stages.arch``) by
    :func:`hrnet_d2.config.validate.lazy_argument_errors`."""
    if arch not in ARCHITECTURES:
        raise ArgumentValueError("stage_specs", "arch", arch, f"allowed: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch]
