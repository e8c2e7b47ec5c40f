"""The HRNet body under Detectron2's own FPN, for comparison with HRNetV2p."""
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from .build import build_hrnet_backbone

__all__ = ["build_hrnet_fpn_backbone"]


@BACKBONE_REGISTRY.register()
def build_hrnet_fpn_backbone(cfg, input_shape):
    bottom_up = build_hrnet_backbone(cfg, input_shape)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
