"""The backbones ``import hrnet_d2`` registers in Detectron2's ``BACKBONE_REGISTRY``, as a table.

``MODEL.BACKBONE.NAME``:
  * ``build_hrnet_backbone``    — the HRNet body (hr2..hr5, optional hrv2)
  * ``build_hrnetv2p_backbone`` — body + HRNetV2p pyramid (p2..p6), what detectors use
  * ``build_hrnetv2p_with_body_backbone`` — the same, also returning the body's outputs
  * ``build_hrnet_fpn_backbone`` — body + Detectron2's FPN, for comparison with HRNetV2p

Each builder sits beside its module (``hrnet.py``, ``pyramid.py``) and, as Detectron2's
``build_resnet_backbone``, only reads the config and passes plain arguments; the config keys
are checked once, before anything is built, by :mod:`hrnet_d2.config.validate`.
"""

from typing import NamedTuple

from detectron2.modeling.backbone import FPN

from .hrnet import HRNet, build_hrnet_backbone
from .pyramid import HRNetV2p, build_hrnet_fpn_backbone, build_hrnetv2p_backbone, build_hrnetv2p_with_body_backbone

__all__ = [
    "BACKBONES",
    "BackboneKind",
    "DETECTOR_BACKBONE",
    "backbone_name",
    "build_hrnet_backbone",
    "build_hrnetv2p_backbone",
    "build_hrnetv2p_with_body_backbone",
    "build_hrnet_fpn_backbone",
]


class BackboneKind(NamedTuple):
    """What a registered hrnet_d2 backbone holds, as the checkpoint wing needs to know it."""

    body_prefix: str  # where the HRNet body's tensors sit in a detector's state dict
    hrnetv2p: bool  # whether it has the HRNetV2p pyramid (``backbone.reduction_conv`` / ``fpn_convs``)


# MODEL.BACKBONE.NAME -> what it builds; one entry per registered builder.
BACKBONES = {
    "build_hrnet_backbone": BackboneKind("backbone.", hrnetv2p=False),
    "build_hrnetv2p_backbone": BackboneKind("backbone.bottom_up.", hrnetv2p=True),
    "build_hrnetv2p_with_body_backbone": BackboneKind("backbone.bottom_up.", hrnetv2p=True),
    "build_hrnet_fpn_backbone": BackboneKind("backbone.bottom_up.", hrnetv2p=False),
}
DETECTOR_BACKBONE = "build_hrnetv2p_backbone"  # what the detectors use (the converter's default target)


def backbone_name(backbone):
    """The ``BACKBONES`` name that builds a model's ``backbone`` module, or None when it is none of ours."""
    if isinstance(backbone, HRNet):
        return "build_hrnet_backbone"
    if isinstance(backbone, HRNetV2p) and isinstance(backbone.bottom_up, HRNet):
        return "build_hrnetv2p_with_body_backbone" if backbone.keep_body_outputs else "build_hrnetv2p_backbone"
    if isinstance(backbone, FPN) and isinstance(backbone.bottom_up, HRNet):
        return "build_hrnet_fpn_backbone"
    return None
