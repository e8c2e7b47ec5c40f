"""The model: the architecture table, the HRNet body, the HRNetV2p pyramid, their builders in
Detectron2's ``BACKBONE_REGISTRY``, the heads with mmdetection's test-time conventions, Hybrid Task
Cascade's ROI heads, and Detectron2's FCOS as a YAML-buildable meta-architecture (``FCOSDetector``)."""

from .arch import ARCHITECTURES, StageSpec
from .fcos import FCOSDetector, FCOSDetectorHead
from .hrnet import HighResolutionModule, HRNet, build_hrnet_backbone
from .htc import HybridTaskCascadeROIHeads
from .mmdet_heads import MMDetCascadeROIHeads, MMDetROIHeads, MMDetRPN
from .pyramid import HRNetV2p, build_hrnet_fpn_backbone, build_hrnetv2p_backbone, build_hrnetv2p_with_body_backbone

__all__ = [
    "ARCHITECTURES",
    "StageSpec",
    "HRNet",
    "HighResolutionModule",
    "HRNetV2p",
    "build_hrnet_backbone",
    "build_hrnetv2p_backbone",
    "build_hrnetv2p_with_body_backbone",
    "build_hrnet_fpn_backbone",
    "MMDetRPN",
    "MMDetROIHeads",
    "MMDetCascadeROIHeads",
    "HybridTaskCascadeROIHeads",
    "FCOSDetector",
    "FCOSDetectorHead",
]
