"""The HRNet body under Detectron2's own FPN, for comparison with HRNetV2p."""
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from .build import _check_feature_names, build_hrnet_backbone

__all__ = ["build_hrnet_fpn_backbone"]


@BACKBONE_REGISTRY.register()
def build_hrnet_fpn_backbone(cfg, input_shape):
    bottom_up = build_hrnet_backbone(cfg, input_shape)
    # Detectron2's FPN only asserts; say what to set (its default [] fits no HRNet)
    _check_feature_names(
        "MODEL.FPN.IN_FEATURES", cfg.MODEL.FPN.IN_FEATURES, bottom_up.output_shape(), "the HRNet body (MODEL.HRNET.OUT_FEATURES)"
    )
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
