"""Whole-config and whole-model checks, before any weights or data are touched.

``validate_config`` (YAML configs) and ``validate_model`` (models built from a LazyConfig)
check that the heads and anchors fit the backbone's ``output_shape()``, which the backbone
builders cannot do: a backbone is also built alone, with Detectron2's default head keys.
Every error names the key (``MODEL.…`` or ``model.…``), the bad value and what is allowed.
"""

import math
from collections.abc import Sequence

import torch

from detectron2.modeling.backbone import build_backbone

from ..data.resize import RESIZE_BACKENDS
from ..modeling.build import check_choice, check_device, check_pixel_stats
from ..utils.errors import ConfigValueError, check_feature_names

__all__ = ["validate_config", "validate_model", "INPUT_FORMATS"]

# ---------------------------------------------------------------------------------
# Whole-model checks: heads and anchors against what the backbone produces.

INPUT_FORMATS = ("RGB", "BGR", "YUV-BT.601")  # 3-channel formats of detection_utils.read_image
_USES_RPN = ("GeneralizedRCNN", "ProposalNetwork", "PanopticFPN")
_USES_ROI_HEADS = ("GeneralizedRCNN", "PanopticFPN")
_USES_SEM_SEG_HEAD = ("SemanticSegmentor", "PanopticFPN")


def _backbone_output_shapes(cfg):
    """The backbone's ``output_shape()``, from a backbone built on the meta device (no memory,
    no weights); building it runs the builder's own checks of the backbone keys."""
    with torch.device("meta"):
        return build_backbone(cfg).output_shape()


def _check_anchor_list(key, values, num_features, in_features_key):
    values = list(values)
    if not values:
        raise ConfigValueError(key, values, "must not be empty")
    per_level = values if isinstance(values[0], Sequence) else [values]
    if len(per_level) not in (1, num_features):
        raise ConfigValueError(
            key,
            values,
            f"needs 1 entry (shared by all levels) or one per level of {in_features_key} ({num_features} levels)",
        )
    for entry in per_level:
        if (
            not isinstance(entry, Sequence)
            or not entry
            or not all(isinstance(v, (int, float)) and v > 0 for v in entry)
        ):
            raise ConfigValueError(key, values, "each level needs a non-empty list of positive numbers")


def _check_anchors(cfg, in_features_key, in_features):
    a = cfg.MODEL.ANCHOR_GENERATOR
    _check_anchor_list("MODEL.ANCHOR_GENERATOR.SIZES", a.SIZES, len(in_features), in_features_key)
    _check_anchor_list("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", a.ASPECT_RATIOS, len(in_features), in_features_key)


def _check_consecutive_levels(key, names, shapes):
    """ROIPooler assigns boxes to levels log2(stride): the levels must be consecutive."""
    strides = sorted(shapes[n].stride for n in names)
    for s in strides:
        if s <= 0 or not math.log2(s).is_integer():
            raise ConfigValueError(key, list(names), f"feature strides {strides} must be powers of 2")
    if any(b != 2 * a for a, b in zip(strides, strides[1:])):
        raise ConfigValueError(
            key, list(names), f"pooled features must be consecutive levels; their strides are {strides}"
        )


def validate_config(cfg):
    """Check every key hrnet_d2 models use, before anything is built or read.

    Raises ConfigError (a ValueError) naming the key, the value and what is allowed.
    """
    check_device(cfg.MODEL.DEVICE)
    check_choice("INPUT.FORMAT", cfg.INPUT.FORMAT, INPUT_FORMATS)
    check_choice("INPUT.RESIZE_BACKEND", cfg.INPUT.RESIZE_BACKEND, RESIZE_BACKENDS)
    check_pixel_stats(cfg)
    ims = cfg.TEST.IMS_PER_BATCH
    if not isinstance(ims, int) or isinstance(ims, bool) or ims < 1:
        raise ConfigValueError(
            "TEST.IMS_PER_BATCH", ims, "must be a positive integer (images per forward in evaluation)"
        )
    shapes = _backbone_output_shapes(cfg)
    what = f"the backbone ({cfg.MODEL.BACKBONE.NAME})"
    meta = cfg.MODEL.META_ARCHITECTURE
    if meta in _USES_RPN and cfg.MODEL.PROPOSAL_GENERATOR.NAME in ("RPN", "RRPN", "MMDetRPN"):
        check_feature_names("MODEL.RPN.IN_FEATURES", cfg.MODEL.RPN.IN_FEATURES, shapes, what)
        _check_anchors(cfg, "MODEL.RPN.IN_FEATURES", cfg.MODEL.RPN.IN_FEATURES)
    if meta in _USES_ROI_HEADS:
        check_feature_names("MODEL.ROI_HEADS.IN_FEATURES", cfg.MODEL.ROI_HEADS.IN_FEATURES, shapes, what)
        _check_consecutive_levels("MODEL.ROI_HEADS.IN_FEATURES", cfg.MODEL.ROI_HEADS.IN_FEATURES, shapes)
    if meta == "RetinaNet":
        check_feature_names("MODEL.RETINANET.IN_FEATURES", cfg.MODEL.RETINANET.IN_FEATURES, shapes, what)
        _check_anchors(cfg, "MODEL.RETINANET.IN_FEATURES", cfg.MODEL.RETINANET.IN_FEATURES)
    if meta in _USES_SEM_SEG_HEAD:
        check_feature_names("MODEL.SEM_SEG_HEAD.IN_FEATURES", cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES, shapes, what)
    return shapes


def validate_model(model):
    """What ``validate_config`` checks, on a model built from a LazyConfig (whose heads
    are given explicit strides and scales): the heads read features the backbone
    produces, anchors and poolers use those features' strides, the input is 3-channel.

    Raises ValueError naming the LazyConfig key (``model.…``), the value and what is allowed.
    """
    if hasattr(model, "input_format"):
        check_choice("model.input_format", model.input_format, INPUT_FORMATS)
    if hasattr(model, "pixel_mean"):
        mean, std = model.pixel_mean.flatten().tolist(), model.pixel_std.flatten().tolist()
        if len(mean) != 3:
            raise ConfigValueError("model.pixel_mean", mean, "HRNet takes 3-channel input: needs 3 values")
        if len(std) != 3 or not all(v > 0 for v in std):
            raise ConfigValueError("model.pixel_std", std, "needs 3 positive values (the input is divided by them)")
    shapes = model.backbone.output_shape()
    what = f"the backbone ({type(model.backbone).__name__})"
    heads = [(f"model.{n}", getattr(model, n, None)) for n in ("proposal_generator", "roi_heads")]
    rpn_key, rpn = heads[0]
    if rpn is not None and hasattr(rpn, "in_features") and hasattr(rpn, "anchor_generator"):
        check_feature_names(f"{rpn_key}.in_features", rpn.in_features, shapes, what)
        strides = [shapes[f].stride for f in rpn.in_features]
        if list(rpn.anchor_generator.strides) != strides:
            raise ConfigValueError(f"{rpn_key}.anchor_generator.strides", list(rpn.anchor_generator.strides),
                  f"must be the strides of {rpn_key}.in_features {list(rpn.in_features)}: {strides}")  # fmt: skip
    roi_key, roi = heads[1]
    for part in ("box", "mask", "keypoint"):
        names, pooler = getattr(roi, f"{part}_in_features", None), getattr(roi, f"{part}_pooler", None)
        if names is None or pooler is None:
            continue
        key = f"{roi_key}.{part}_in_features"
        check_feature_names(key, names, shapes, what)
        _check_consecutive_levels(key, names, shapes)
        scales = [p.spatial_scale for p in pooler.level_poolers]
        wanted = [1 / shapes[n].stride for n in names]
        if sorted(scales, reverse=True) != sorted(wanted, reverse=True):
            raise ConfigValueError(
                f"{roi_key}.{part}_pooler.scales", scales, f"must be 1/stride of {key} {list(names)}: {wanted}"
            )
