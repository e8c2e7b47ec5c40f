"""Backbone builders registered in Detectron2's ``BACKBONE_REGISTRY``.

``MODEL.BACKBONE.NAME``:
  * ``build_hrnet_backbone``    — the HRNet body (hr2..hr5, optional hrv2)
  * ``build_hrnetv2p_backbone`` — body + HRNetV2p pyramid (p2..p6), what detectors use
  * ``build_hrnet_fpn_backbone`` — body + Detectron2's FPN (in ``fpn.py``)

All config values are validated here, before any weights or data are touched, and
every error names the config key, the bad value and what is allowed.  The builders
check the backbone's own keys; ``validate_config`` (called by ``Trainer.build_model``)
also checks that the heads and anchors fit what the backbone produces, which the
builders cannot do: a backbone is also built alone, with Detectron2's default head keys.
"""
import math
from collections.abc import Sequence

import torch

from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling.backbone import BACKBONE_REGISTRY, build_backbone

from .arch import ARCHITECTURES, BLOCK_TYPES, FUSE_METHODS, StageSpec
from .data.resize import RESIZE_BACKENDS
from .hrnet import HRV2_NAME, HRNet, branch_name
from .pyramid import POOLING_TYPES, HRNetV2p

__all__ = ["build_hrnet_backbone", "build_hrnetv2p_backbone", "stage_specs_from_cfg", "validate_config"]

UPSAMPLE_MODES = ("nearest", "bilinear")


def _fail(key, value, allowed):
    raise ValueError(f"{key} = {value!r} is invalid: {allowed}")


def _check_positive_int(key, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        _fail(key, value, "must be a positive integer")


def _check_norm(key, norm):
    if norm == "":
        return
    try:
        get_norm(norm, 64)
    except (KeyError, ValueError, AssertionError):
        _fail(key, norm, "allowed: '', BN, SyncBN, FrozenBN, GN, nnSyncBN, naiveSyncBN, LN")


def _check_choice(key, value, allowed):
    if value not in allowed:
        _fail(key, value, f"allowed: {list(allowed)}")


def _stage_keys_used(h):
    return any(
        getattr(h, f"STAGE{k}").NUM_MODULES
        or getattr(h, f"STAGE{k}").NUM_BRANCHES
        or getattr(h, f"STAGE{k}").NUM_BLOCKS
        or getattr(h, f"STAGE{k}").NUM_CHANNELS
        for k in range(1, 5)
    )


def stage_specs_from_cfg(cfg):
    """The four StageSpecs: from the architecture table, or the explicit STAGE keys."""
    h = cfg.MODEL.HRNET
    if h.ARCH:
        _check_choice("MODEL.HRNET.ARCH", h.ARCH, sorted(ARCHITECTURES) + ["''  (explicit MODEL.HRNET.STAGE1..4)"])
        if _stage_keys_used(h):
            raise ValueError(
                f"MODEL.HRNET.ARCH = {h.ARCH!r} and explicit MODEL.HRNET.STAGE* keys are both set; "
                "set MODEL.HRNET.ARCH '' to use the explicit stage specs"
            )
        return ARCHITECTURES[h.ARCH]
    specs = []
    prev_branches = 0
    for k in range(1, 5):
        key = f"MODEL.HRNET.STAGE{k}"
        s = getattr(h, f"STAGE{k}")
        _check_positive_int(f"{key}.NUM_MODULES", s.NUM_MODULES)
        _check_positive_int(f"{key}.NUM_BRANCHES", s.NUM_BRANCHES)
        if k == 1 and (s.NUM_BRANCHES != 1 or s.NUM_MODULES != 1):
            _fail(f"{key}.NUM_BRANCHES/NUM_MODULES", (s.NUM_BRANCHES, s.NUM_MODULES), "stage 1 has exactly 1 branch and 1 module")
        if s.NUM_BRANCHES < prev_branches:
            _fail(
                f"{key}.NUM_BRANCHES",
                s.NUM_BRANCHES,
                f"must be >= MODEL.HRNET.STAGE{k - 1}.NUM_BRANCHES = {prev_branches} (stages only add branches)",
            )
        _check_choice(f"{key}.BLOCK", s.BLOCK, BLOCK_TYPES)
        _check_choice(f"{key}.FUSE_METHOD", s.FUSE_METHOD, FUSE_METHODS)
        for field in ("NUM_BLOCKS", "NUM_CHANNELS"):
            values = list(getattr(s, field))
            if len(values) != s.NUM_BRANCHES:
                _fail(f"{key}.{field}", values, f"needs one entry per branch ({key}.NUM_BRANCHES = {s.NUM_BRANCHES})")
            for v in values:
                _check_positive_int(f"{key}.{field}", v)
        specs.append(
            StageSpec(
                s.NUM_MODULES, s.NUM_BRANCHES, s.BLOCK, tuple(s.NUM_BLOCKS), tuple(s.NUM_CHANNELS), s.FUSE_METHOD
            )
        )
        prev_branches = s.NUM_BRANCHES
    return tuple(specs)


def _num_freezable_stages(specs):
    return len(specs) + 1  # stem + each stage


def _check_feature_names(key, names, available, what):
    names = list(names)
    if not names:
        _fail(key, names, f"needs at least one of {sorted(available)} ({what})")
    for name in names:
        if name not in available:
            _fail(key, names, f"{name!r} is not produced by {what}; it produces {sorted(available)}")
    if len(set(names)) != len(names):
        _fail(key, names, "lists a feature twice")


def _body_outputs(specs):
    """Names and strides the body can produce (before MODEL.HRNET.OUT_FEATURES selects)."""
    out = {branch_name(i): 4 * 2**i for i in range(specs[-1].num_branches)}
    out[HRV2_NAME] = 4
    return out


def _check_pixel_stats(cfg):
    mean, std = list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD)
    if len(mean) != 3:
        _fail("MODEL.PIXEL_MEAN", mean, "HRNet takes 3-channel input: needs 3 values")
    if len(std) != 3 or not all(v > 0 for v in std):
        _fail("MODEL.PIXEL_STD", std, "needs 3 positive values (the input is divided by them)")


def validate_backbone_config(cfg):
    """Check MODEL.HRNET*, FREEZE_AT and the pixel statistics; return the stage specs."""
    h = cfg.MODEL.HRNET
    specs = stage_specs_from_cfg(cfg)
    _check_norm("MODEL.HRNET.NORM", h.NORM)
    _check_choice("MODEL.HRNET.FUSE_UPSAMPLE_MODE", h.FUSE_UPSAMPLE_MODE, UPSAMPLE_MODES)
    _check_choice("MODEL.HRNET.HRV2_UPSAMPLE_MODE", h.HRV2_UPSAMPLE_MODE, UPSAMPLE_MODES)
    _check_positive_int("MODEL.HRNET.STEM_CHANNELS", h.STEM_CHANNELS)
    _check_feature_names("MODEL.HRNET.OUT_FEATURES", h.OUT_FEATURES, _body_outputs(specs), "the HRNet body")
    freeze_at = cfg.MODEL.BACKBONE.FREEZE_AT
    if not isinstance(freeze_at, int) or isinstance(freeze_at, bool) or not 0 <= freeze_at <= _num_freezable_stages(specs):
        _fail(
            "MODEL.BACKBONE.FREEZE_AT",
            freeze_at,
            f"allowed: 0..{_num_freezable_stages(specs)} (0 none, 1 stem, 2 +stage1, 3 +stage2, 4 +stage3, 5 all)",
        )
    _check_pixel_stats(cfg)
    return specs


def validate_pyramid_config(cfg):
    p = cfg.MODEL.HRNET_PYRAMID
    _check_positive_int("MODEL.HRNET_PYRAMID.OUT_CHANNELS", p.OUT_CHANNELS)
    _check_positive_int("MODEL.HRNET_PYRAMID.NUM_LEVELS", p.NUM_LEVELS)
    _check_choice("MODEL.HRNET_PYRAMID.POOLING", p.POOLING, sorted(POOLING_TYPES))
    _check_choice("MODEL.HRNET_PYRAMID.UPSAMPLE_MODE", p.UPSAMPLE_MODE, UPSAMPLE_MODES)
    _check_norm("MODEL.HRNET_PYRAMID.NORM", p.NORM)
    _check_feature_names(
        "MODEL.HRNET_PYRAMID.IN_FEATURES", p.IN_FEATURES, list(cfg.MODEL.HRNET.OUT_FEATURES), "MODEL.HRNET.OUT_FEATURES"
    )


@BACKBONE_REGISTRY.register()
def build_hrnet_backbone(cfg, input_shape: ShapeSpec):
    h = cfg.MODEL.HRNET
    specs = validate_backbone_config(cfg)
    if input_shape.channels != 3:
        _fail("MODEL.PIXEL_MEAN", list(cfg.MODEL.PIXEL_MEAN), "HRNet takes 3-channel input")
    return HRNet(
        specs,
        norm=h.NORM,
        out_features=list(h.OUT_FEATURES),
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        upsample_mode=h.FUSE_UPSAMPLE_MODE,
        hrv2_upsample_mode=h.HRV2_UPSAMPLE_MODE,
        stem_channels=h.STEM_CHANNELS,
        activation_checkpoint=h.ACTIVATION_CHECKPOINT,
        inference_fuse=h.INFERENCE_FUSE,
        channels_last=h.CHANNELS_LAST,
    )


@BACKBONE_REGISTRY.register()
def build_hrnetv2p_backbone(cfg, input_shape: ShapeSpec, keep_body_outputs=False):
    p = cfg.MODEL.HRNET_PYRAMID
    validate_backbone_config(cfg)
    validate_pyramid_config(cfg)
    bottom_up = build_hrnet_backbone(cfg, input_shape)
    return HRNetV2p(
        bottom_up,
        in_features=list(p.IN_FEATURES),
        out_channels=p.OUT_CHANNELS,
        num_levels=p.NUM_LEVELS,
        pooling=p.POOLING,
        share_conv=p.SHARE_CONV,
        norm=p.NORM,
        upsample_mode=p.UPSAMPLE_MODE,
        keep_body_outputs=keep_body_outputs,
        activation_checkpoint=cfg.MODEL.HRNET.ACTIVATION_CHECKPOINT,
    )


@BACKBONE_REGISTRY.register()
def build_hrnetv2p_with_body_backbone(cfg, input_shape: ShapeSpec):
    """HRNetV2p (same keys, same checks) whose outputs also include the body's, so Panoptic
    FPN's semantic head can read the HRNetV2 representation (``hrv2``) while the R-CNN heads
    read p2..p6."""
    return build_hrnetv2p_backbone(cfg, input_shape, keep_body_outputs=True)


# ---------------------------------------------------------------------------------
# Whole-model checks: heads and anchors against what the backbone produces.

INPUT_FORMATS = ("RGB", "BGR", "YUV-BT.601")  # 3-channel formats of detection_utils.read_image
_USES_RPN = ("GeneralizedRCNN", "ProposalNetwork", "PanopticFPN")
_USES_ROI_HEADS = ("GeneralizedRCNN", "PanopticFPN")
_USES_SEM_SEG_HEAD = ("SemanticSegmentor", "PanopticFPN")


def _backbone_output_shapes(cfg):
    """The backbone's output names and strides: computed for our two base builders,
    otherwise from a backbone built on the meta device (no memory, no weights)."""
    name = cfg.MODEL.BACKBONE.NAME
    if name in ("build_hrnet_backbone", "build_hrnetv2p_backbone", "build_hrnet_fpn_backbone"):
        specs = validate_backbone_config(cfg)
        body = {k: v for k, v in _body_outputs(specs).items() if k in cfg.MODEL.HRNET.OUT_FEATURES}
        if name == "build_hrnet_backbone":
            return {k: ShapeSpec(stride=v) for k, v in body.items()}
        if name == "build_hrnetv2p_backbone":
            validate_pyramid_config(cfg)
            p = cfg.MODEL.HRNET_PYRAMID
            base = min(body[f] for f in p.IN_FEATURES)
            first = int(math.log2(base))
            return {f"p{first + i}": ShapeSpec(channels=p.OUT_CHANNELS, stride=base * 2**i) for i in range(p.NUM_LEVELS)}
        _check_feature_names(
            "MODEL.FPN.IN_FEATURES", cfg.MODEL.FPN.IN_FEATURES, body, "the HRNet body (MODEL.HRNET.OUT_FEATURES)"
        )
    with torch.device("meta"):
        return build_backbone(cfg).output_shape()


def _check_anchor_list(key, values, num_features, in_features_key):
    values = list(values)
    if not values:
        _fail(key, values, "must not be empty")
    per_level = values if isinstance(values[0], Sequence) else [values]
    if len(per_level) not in (1, num_features):
        _fail(
            key,
            values,
            f"needs 1 entry (shared by all levels) or one per level of {in_features_key} ({num_features} levels)",
        )
    for entry in per_level:
        if not isinstance(entry, Sequence) or not entry or not all(isinstance(v, (int, float)) and v > 0 for v in entry):
            _fail(key, values, "each level needs a non-empty list of positive numbers")


def _check_anchors(cfg, in_features_key, in_features):
    a = cfg.MODEL.ANCHOR_GENERATOR
    _check_anchor_list("MODEL.ANCHOR_GENERATOR.SIZES", a.SIZES, len(in_features), in_features_key)
    _check_anchor_list("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", a.ASPECT_RATIOS, len(in_features), in_features_key)


def _check_consecutive_levels(key, names, shapes):
    """ROIPooler assigns boxes to levels log2(stride): the levels must be consecutive."""
    strides = sorted(shapes[n].stride for n in names)
    for s in strides:
        if s <= 0 or not math.log2(s).is_integer():
            _fail(key, list(names), f"feature strides {strides} must be powers of 2")
    if any(b != 2 * a for a, b in zip(strides, strides[1:])):
        _fail(key, list(names), f"pooled features must be consecutive levels; their strides are {strides}")


def validate_config(cfg):
    """Check every key hrnet_d2 models use, before anything is built or read.

    Raises ValueError naming the key, the value and what is allowed.
    """
    _check_choice("INPUT.FORMAT", cfg.INPUT.FORMAT, INPUT_FORMATS)
    _check_choice("INPUT.RESIZE_BACKEND", cfg.INPUT.RESIZE_BACKEND, RESIZE_BACKENDS)
    _check_pixel_stats(cfg)
    shapes = _backbone_output_shapes(cfg)
    what = f"the backbone ({cfg.MODEL.BACKBONE.NAME})"
    meta = cfg.MODEL.META_ARCHITECTURE
    if meta in _USES_RPN and cfg.MODEL.PROPOSAL_GENERATOR.NAME in ("RPN", "RRPN", "MMDetRPN"):
        _check_feature_names("MODEL.RPN.IN_FEATURES", cfg.MODEL.RPN.IN_FEATURES, shapes, what)
        _check_anchors(cfg, "MODEL.RPN.IN_FEATURES", cfg.MODEL.RPN.IN_FEATURES)
    if meta in _USES_ROI_HEADS:
        _check_feature_names("MODEL.ROI_HEADS.IN_FEATURES", cfg.MODEL.ROI_HEADS.IN_FEATURES, shapes, what)
        _check_consecutive_levels("MODEL.ROI_HEADS.IN_FEATURES", cfg.MODEL.ROI_HEADS.IN_FEATURES, shapes)
    if meta == "RetinaNet":
        _check_feature_names("MODEL.RETINANET.IN_FEATURES", cfg.MODEL.RETINANET.IN_FEATURES, shapes, what)
        _check_anchors(cfg, "MODEL.RETINANET.IN_FEATURES", cfg.MODEL.RETINANET.IN_FEATURES)
    if meta in _USES_SEM_SEG_HEAD:
        _check_feature_names("MODEL.SEM_SEG_HEAD.IN_FEATURES", cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES, shapes, what)
    return shapes
