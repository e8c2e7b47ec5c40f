"""Backbone builders registered in Detectron2's ``BACKBONE_REGISTRY``.

``MODEL.BACKBONE.NAME``:
  * ``build_hrnet_backbone``    — the HRNet body (hr2..hr5, optional hrv2)
  * ``build_hrnetv2p_backbone`` — body + HRNetV2p pyramid (p2..p6), what detectors use
  * ``build_hrnet_fpn_backbone`` — body + Detectron2's FPN (in ``fpn.py``)

All config values are validated here, before any weights or data are touched, and
every error names the config key, the bad value and what is allowed.
"""
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling.backbone import BACKBONE_REGISTRY

from .arch import ARCHITECTURES, BLOCK_TYPES, FUSE_METHODS, StageSpec
from .hrnet import HRNet
from .pyramid import POOLING_TYPES, HRNetV2p

__all__ = ["build_hrnet_backbone", "build_hrnetv2p_backbone", "stage_specs_from_cfg"]

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


@BACKBONE_REGISTRY.register()
def build_hrnet_backbone(cfg, input_shape: ShapeSpec):
    h = cfg.MODEL.HRNET
    specs = stage_specs_from_cfg(cfg)
    _check_norm("MODEL.HRNET.NORM", h.NORM)
    _check_choice("MODEL.HRNET.FUSE_UPSAMPLE_MODE", h.FUSE_UPSAMPLE_MODE, UPSAMPLE_MODES)
    _check_choice("MODEL.HRNET.HRV2_UPSAMPLE_MODE", h.HRV2_UPSAMPLE_MODE, UPSAMPLE_MODES)
    _check_positive_int("MODEL.HRNET.STEM_CHANNELS", h.STEM_CHANNELS)
    freeze_at = cfg.MODEL.BACKBONE.FREEZE_AT
    if not isinstance(freeze_at, int) or not 0 <= freeze_at <= _num_freezable_stages(specs):
        _fail(
            "MODEL.BACKBONE.FREEZE_AT",
            freeze_at,
            f"allowed: 0..{_num_freezable_stages(specs)} (0 none, 1 stem, 2 +stage1, 3 +stage2, 4 +stage3, 5 all)",
        )
    if input_shape.channels != 3:
        _fail("MODEL.PIXEL_MEAN", list(cfg.MODEL.PIXEL_MEAN), "HRNet takes 3-channel input")
    return HRNet(
        specs,
        norm=h.NORM,
        out_features=list(h.OUT_FEATURES),
        freeze_at=freeze_at,
        upsample_mode=h.FUSE_UPSAMPLE_MODE,
        hrv2_upsample_mode=h.HRV2_UPSAMPLE_MODE,
        stem_channels=h.STEM_CHANNELS,
        activation_checkpoint=h.ACTIVATION_CHECKPOINT,
    )


@BACKBONE_REGISTRY.register()
def build_hrnetv2p_backbone(cfg, input_shape: ShapeSpec):
    p = cfg.MODEL.HRNET_PYRAMID
    _check_positive_int("MODEL.HRNET_PYRAMID.OUT_CHANNELS", p.OUT_CHANNELS)
    _check_positive_int("MODEL.HRNET_PYRAMID.NUM_LEVELS", p.NUM_LEVELS)
    _check_choice("MODEL.HRNET_PYRAMID.POOLING", p.POOLING, sorted(POOLING_TYPES))
    _check_choice("MODEL.HRNET_PYRAMID.UPSAMPLE_MODE", p.UPSAMPLE_MODE, UPSAMPLE_MODES)
    _check_norm("MODEL.HRNET_PYRAMID.NORM", p.NORM)
    if not p.IN_FEATURES:
        _fail("MODEL.HRNET_PYRAMID.IN_FEATURES", list(p.IN_FEATURES), "needs at least one body output")
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
    )
