"""HRNet backbones for Detectron2.

``import hrnet_d2`` registers ``build_hrnet_backbone``, ``build_hrnetv2p_backbone``,
``build_hrnetv2p_with_body_backbone`` and ``build_hrnet_fpn_backbone`` in Detectron2's
BACKBONE_REGISTRY, the heads with mmdetection's test-time conventions (``MMDetRPN``,
``MMDetROIHeads``, ``MMDetCascadeROIHeads``) for converted models, Hybrid Task Cascade's ROI heads
(``HybridTaskCascadeROIHeads``, ``HybridTaskCascade``), Detectron2's FCOS as a YAML-buildable
meta-architecture (``FCOSDetector``), and the ``hrnet_d2://``
weights names in Detectron2's PathManager.

The package mirrors Detectron2's own: ``modeling`` (the model), ``data``, ``config``,
``checkpoint`` (weights) and ``engine`` (training and inference); ``utils`` below them all.
"""

from .checkpoint import UnknownZooName, ZooDownloadError  # importing it registers hrnet_d2:// in PathManager
from .config import CONFIG_DIR, add_hrnet_config, get_config_file, get_hrnet_cfg
from .modeling import (
    ARCHITECTURES,
    FCOSDetector,
    FCOSDetectorHead,
    HighResolutionModule,
    HRNet,
    HRNetV2p,
    HybridTaskCascadeROIHeads,
    MMDetCascadeROIHeads,
    MMDetROIHeads,
    MMDetRPN,
    StageSpec,
    build_hrnet_backbone,
    build_hrnet_fpn_backbone,
    build_hrnetv2p_backbone,
    build_hrnetv2p_with_body_backbone,
)

__version__ = "0.1.0"

__all__ = [
    "UnknownZooName",
    "ZooDownloadError",
    "ARCHITECTURES",
    "StageSpec",
    "HRNet",
    "HighResolutionModule",
    "HRNetV2p",
    "add_hrnet_config",
    "get_config_file",
    "get_hrnet_cfg",
    "CONFIG_DIR",
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
