"""Mask R-CNN on HRNetV2p as a LazyConfig model: Detectron2's common/models/mask_rcnn_fpn.py
with the ResNet-FPN backbone replaced by HRNet + HRNetV2p, the same model that
configs/Base-RCNN-HRNetV2p.yaml builds (tests/test_lazy_configs.py checks it)."""

from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from hrnet_d2.config.lazy import stage_specs
from hrnet_d2.modeling.hrnet import HRNet
from hrnet_d2.modeling.pyramid import HRNetV2p

model = get_config("common/models/mask_rcnn_fpn.py").model
model.backbone = L(HRNetV2p)(
    bottom_up=L(HRNet)(
        stages=L(stage_specs)(arch="w32"),
        norm="BNEval",  # frozen BN statistics, trained weight/bias (as the YAMLs, see their base)
        out_features=["hr2", "hr3", "hr4", "hr5"],
        freeze_at=0,  # nothing frozen, like HRNet-Object-Detection
        upsample_mode="nearest",
        hrv2_upsample_mode="bilinear",
        stem_channels=64,
        activation_checkpoint=False,
    ),
    in_features="${.bottom_up.out_features}",
    out_channels=256,
    num_levels=5,  # p2..p6
    pooling="AVG",
    share_conv=False,
    norm="",
    upsample_mode="bilinear",
)
# the official HRNet ImageNet weights take RGB, normalised with ImageNet mean/std
model.input_format = "RGB"
model.pixel_mean = [123.675, 116.28, 103.53]
model.pixel_std = [58.395, 57.12, 57.375]
