"""FCOS on HRNetV2p-W18 as a LazyConfig model, with mmdetection's conventions: the model that
configs/COCO-Detection/fcos_hrnetv2p_w18_1x_mmdet.yaml builds (tests/test_lazy_configs.py checks it), for
mmdetection's converted fcos_hrnetv2p-w18-gn-head_4xb4-1x_coco checkpoint.  Every argument says mmdetection's
value in configs/Base-FCOS-HRNetV2p-mmdet.yaml."""

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from hrnet_d2.config.lazy import stage_specs
from hrnet_d2.modeling.fcos import FCOSDetector, FCOSDetectorHead
from hrnet_d2.modeling.hrnet import HRNet
from hrnet_d2.modeling.pyramid import HRNetV2p

STRIDES = [8, 16, 32, 64, 128]

model = L(FCOSDetector)(
    backbone=L(HRNetV2p)(
        bottom_up=L(HRNet)(
            stages=L(stage_specs)(arch="w18"),
            norm="BNEval",
            out_features=["hr2", "hr3", "hr4", "hr5"],
            freeze_at=0,
            upsample_mode="nearest",
            hrv2_upsample_mode="bilinear",
            stem_channels=64,
            activation_checkpoint=False,
        ),
        in_features="${.bottom_up.out_features}",
        out_channels=256,
        num_levels=5,
        pooling="AVG",
        share_conv=False,
        norm="",
        upsample_mode="bilinear",
        conv_stride=2,  # HRFPN stride=2: p3..p7
    ),
    head=L(FCOSDetectorHead)(
        input_shape=[ShapeSpec(channels=256, stride=s) for s in STRIDES],
        num_classes="${..num_classes}",
        num_convs=4,
        norm="GN",
        conv_bias=False,
        prior_prob=0.01,
        centerness_on_reg=False,
        level_scales=True,
        reg_activation="exp",
    ),
    head_in_features=["p3", "p4", "p5", "p6", "p7"],
    num_classes=80,
    center_sampling_radius=0.0,
    focal_loss_alpha=0.25,
    focal_loss_gamma=2.0,
    test_score_thresh=0.05,
    test_topk_candidates=1000,
    test_nms_thresh=0.5,
    max_detections_per_image=100,
    # BGR kept, mean / std in BGR order (mmdetection's HRNet FCOS feeds BGR to the RGB-pretrained body)
    pixel_mean=[103.53, 116.28, 123.675],
    pixel_std=[57.375, 57.12, 58.395],
    anchor_offset=0.5,
    test_convention="mmdetection",
)
