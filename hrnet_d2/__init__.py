"""HRNet backbones for Detectron2.

``import hrnet_d2`` registers ``build_hrnet_backbone``, ``build_hrnetv2p_backbone``,
``build_hrnetv2p_with_body_backbone`` and ``build_hrnet_fpn_backbone`` in Detectron2's
BACKBONE_REGISTRY, and the heads with mmdetection's test-time conventions (``MMDetRPN``,
``MMDetROIHeads``, ``MMDetCascadeROIHeads``: ``mmdet_heads.py``) for converted models, and
Detectron2's FCOS as a YAML-buildable meta-architecture (``FCOSDetector``: ``fcos.py``).
"""

from .arch import ARCHITECTURES, StageSpec
from .build import (
    build_hrnet_backbone,
    build_hrnet_fpn_backbone,
    build_hrnetv2p_backbone,
    build_hrnetv2p_with_body_backbone,
)
from .catalog import UnknownZooName, ZooDownloadError  # importing it registers hrnet_d2:// in Detectron2's PathManager
from .config import CONFIG_DIR, add_hrnet_config, get_config_file, get_hrnet_cfg
from .fcos import FCOSDetector, FCOSDetectorHead
from .hrnet import HighResolutionModule, HRNet
from .mmdet_heads import MMDetCascadeROIHeads, MMDetROIHeads, MMDetRPN
from .pyramid import HRNetV2p

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
    "FCOSDetector",
    "FCOSDetectorHead",
]
