"""Backbone builders registered in Detectron2's ``BACKBONE_REGISTRY``.

``MODEL.BACKBONE.NAME``:
  * ``build_hrnet_backbone``    — the HRNet body (hr2..hr5, optional hrv2)
  * ``build_hrnetv2p_backbone`` — body + HRNetV2p pyramid (p2..p6), what detectors use
  * ``build_hrnet_fpn_backbone`` — body + Detectron2's FPN, for comparison with HRNetV2p

Config values are validated before any weights or data are touched, each key in one
place, and every error names the config key, the bad value and what is allowed.  The
builders check the backbone's own keys (``HRNet`` and ``HRNetV2p`` check the feature
names they are given against what they produce); ``validate_config`` (called by
``Trainer.build_model``) also checks that the heads and anchors fit the backbone's
``output_shape()``, which the builders cannot do: a backbone is also built alone, with
Detectron2's default head keys.
"""

import torch

from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from ..utils.errors import ConfigError, ConfigValueError, check_feature_names
from .arch import ARCHITECTURES, BLOCK_TYPES, FUSE_METHODS, StageSpec
from .blocks import BLOCKS
from .hrnet import HRNet
from .layers import NORMS as HRNET_NORMS
from .layers import get_norm
from .pyramid import AUTOCAST_DTYPES, HRNetV2p

__all__ = [
    "build_hrnet_backbone",
    "build_hrnetv2p_backbone",
    "build_hrnetv2p_with_body_backbone",
    "build_hrnet_fpn_backbone",
    "check_choice",
    "check_device",
    "check_pixel_stats",
    "stage_specs_from_cfg",
]

UPSAMPLE_MODES = ("nearest", "bilinear")


def _fail(key, value, allowed):
    raise ConfigValueError(key, value, allowed)


def _available_devices():
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def check_device(device, key="MODEL.DEVICE"):
    """Stop (ConfigError naming ``key``) when ``device`` does not exist on this machine,
    e.g. ``cuda`` where torch sees no CUDA device, before anything is built."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        _fail(key, device, f"not a torch device; available here: {_available_devices()}")
    available = _available_devices()
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            _fail(key, device, f"no CUDA device here (torch.cuda.is_available() is False); available: {available}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            _fail(key, device, f"this machine has {torch.cuda.device_count()} CUDA device(s); available: {available}")
    elif dev.type != "cpu" and str(dev) not in available and dev.type not in available:
        _fail(key, device, f"not available here; available: {available}")


def _check_positive_int(key, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigValueError(key, value, "must be a positive integer")


ALLOWED_NORMS = ("BN", "SyncBN", "FrozenBN", *HRNET_NORMS, "GN", "nnSyncBN", "naiveSyncBN", "LN")


def _check_norm(key, norm, allow_none, widths=(64,), what=""):
    """A Detectron2 ``get_norm`` name (or ours, :data:`layers.NORMS`) that can normalise every one
    of ``widths`` channels (GN: 32 groups, so multiples of 32); "" (no norm) only where ``allow_none``."""
    allowed = ("''", *ALLOWED_NORMS) if allow_none else ALLOWED_NORMS
    if norm == "" and allow_none:
        return
    try:
        if get_norm(norm, 64) is None:
            raise ValueError(norm)
    except (KeyError, ValueError, AssertionError):
        raise ConfigValueError(key, norm, f"allowed: {', '.join(allowed)}") from None
    for width in sorted(set(widths)):
        try:
            get_norm(norm, width)
        except (ValueError, AssertionError) as e:
            _fail(key, norm, f"cannot normalise the {width} channels of {what} ({e}); widths: {sorted(set(widths))}")


def _body_widths(specs, stem_channels):
    """Every channel count the HRNet body normalises."""
    widths = {stem_channels, 64}
    for s in specs:
        for c in s.num_channels:
            widths |= {c, c * BLOCKS[s.block].expansion}
    return widths


def check_choice(key, value, allowed):
    if value not in allowed:
        raise ConfigValueError(key, value, f"allowed: {list(allowed)}")


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
        check_choice("MODEL.HRNET.ARCH", h.ARCH, sorted(ARCHITECTURES) + ["''  (explicit MODEL.HRNET.STAGE1..4)"])
        if _stage_keys_used(h):
            raise ConfigError(
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
            raise ConfigValueError(
                f"{key}.NUM_BRANCHES/NUM_MODULES",
                (s.NUM_BRANCHES, s.NUM_MODULES),
                "stage 1 has exactly 1 branch and 1 module",
            )
        if s.NUM_BRANCHES < prev_branches:
            raise ConfigValueError(
                f"{key}.NUM_BRANCHES",
                s.NUM_BRANCHES,
                f"must be >= MODEL.HRNET.STAGE{k - 1}.NUM_BRANCHES = {prev_branches} (stages only add branches)",
            )
        check_choice(f"{key}.BLOCK", s.BLOCK, BLOCK_TYPES)
        check_choice(f"{key}.FUSE_METHOD", s.FUSE_METHOD, FUSE_METHODS)
        for field in ("NUM_BLOCKS", "NUM_CHANNELS"):
            values = list(getattr(s, field))
            if len(values) != s.NUM_BRANCHES:
                raise ConfigValueError(
                    f"{key}.{field}", values, f"needs one entry per branch ({key}.NUM_BRANCHES = {s.NUM_BRANCHES})"
                )
            for v in values:
                _check_positive_int(f"{key}.{field}", v)
        specs.append(
            StageSpec(s.NUM_MODULES, s.NUM_BRANCHES, s.BLOCK, tuple(s.NUM_BLOCKS), tuple(s.NUM_CHANNELS), s.FUSE_METHOD)
        )
        prev_branches = s.NUM_BRANCHES
    return tuple(specs)


def _num_freezable_stages(specs):
    return len(specs) + 1  # stem + each stage


def check_pixel_stats(cfg):
    mean, std = list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD)
    if len(mean) != 3:
        raise ConfigValueError("MODEL.PIXEL_MEAN", mean, "HRNet takes 3-channel input: needs 3 values")
    if len(std) != 3 or not all(v > 0 for v in std):
        raise ConfigValueError("MODEL.PIXEL_STD", std, "needs 3 positive values (the input is divided by them)")


def _check_body_keys(cfg):
    """MODEL.HRNET* (but OUT_FEATURES, which HRNet checks against what it produces) and
    MODEL.BACKBONE.FREEZE_AT; returns the stage specs."""
    h = cfg.MODEL.HRNET
    specs = stage_specs_from_cfg(cfg)
    _check_positive_int("MODEL.HRNET.STEM_CHANNELS", h.STEM_CHANNELS)
    _check_norm(
        "MODEL.HRNET.NORM", h.NORM, False, _body_widths(specs, h.STEM_CHANNELS), f"HRNet {h.ARCH or 'STAGE1..4'}"
    )
    check_choice("MODEL.HRNET.FUSE_UPSAMPLE_MODE", h.FUSE_UPSAMPLE_MODE, UPSAMPLE_MODES)
    check_choice("MODEL.HRNET.HRV2_UPSAMPLE_MODE", h.HRV2_UPSAMPLE_MODE, UPSAMPLE_MODES)
    freeze_at = cfg.MODEL.BACKBONE.FREEZE_AT
    if (
        not isinstance(freeze_at, int)
        or isinstance(freeze_at, bool)
        or not 0 <= freeze_at <= _num_freezable_stages(specs)
    ):
        raise ConfigValueError(
            "MODEL.BACKBONE.FREEZE_AT",
            freeze_at,
            f"allowed: 0..{_num_freezable_stages(specs)} (0 none, 1 stem, 2 +stage1, 3 +stage2, 4 +stage3, 5 all)",
        )
    return specs


def _check_pyramid_keys(cfg):
    """MODEL.HRNET_PYRAMID* (but IN_FEATURES and POOLING, which HRNetV2p checks)."""
    p = cfg.MODEL.HRNET_PYRAMID
    _check_positive_int("MODEL.HRNET_PYRAMID.OUT_CHANNELS", p.OUT_CHANNELS)
    _check_positive_int("MODEL.HRNET_PYRAMID.NUM_LEVELS", p.NUM_LEVELS)
    check_choice("MODEL.HRNET_PYRAMID.UPSAMPLE_MODE", p.UPSAMPLE_MODE, UPSAMPLE_MODES)
    _check_norm("MODEL.HRNET_PYRAMID.NORM", p.NORM, True, (p.OUT_CHANNELS,), "MODEL.HRNET_PYRAMID.OUT_CHANNELS")
    check_choice("MODEL.HRNET.INFERENCE_AUTOCAST", cfg.MODEL.HRNET.INFERENCE_AUTOCAST, ["", *AUTOCAST_DTYPES])


@BACKBONE_REGISTRY.register()
def build_hrnet_backbone(cfg, input_shape: ShapeSpec):
    """The HRNet body (:class:`HRNet`) from MODEL.HRNET.* and MODEL.BACKBONE.FREEZE_AT.

    Args:
        cfg (CfgNode): a Detectron2 config with :func:`add_hrnet_config`'s keys.
        input_shape (ShapeSpec): the input; HRNet takes 3 channels.
    """
    h = cfg.MODEL.HRNET
    specs = _check_body_keys(cfg)
    if input_shape.channels != 3:
        raise ConfigValueError(
            "MODEL.PIXEL_MEAN", list(cfg.MODEL.PIXEL_MEAN), "HRNet takes 3-channel input: needs 3 values"
        )
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
        training_fuse=h.TRAINING_FUSE,
        channels_last=h.CHANNELS_LAST,
    )


@BACKBONE_REGISTRY.register()
def build_hrnetv2p_backbone(cfg, input_shape: ShapeSpec, keep_body_outputs=False):
    """The HRNet body + the HRNetV2p pyramid (:class:`HRNetV2p`, p2..p6 by default), what
    the detectors use; MODEL.HRNET_PYRAMID.* on top of :func:`build_hrnet_backbone`'s keys.

    Args:
        cfg (CfgNode): a Detectron2 config with :func:`add_hrnet_config`'s keys.
        input_shape (ShapeSpec): the input; HRNet takes 3 channels.
        keep_body_outputs (bool): also return the body's outputs (see
            :func:`build_hrnetv2p_with_body_backbone`).
    """
    p = cfg.MODEL.HRNET_PYRAMID
    _check_pyramid_keys(cfg)
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
        inference_autocast=cfg.MODEL.HRNET.INFERENCE_AUTOCAST,
    )


@BACKBONE_REGISTRY.register()
def build_hrnetv2p_with_body_backbone(cfg, input_shape: ShapeSpec):
    """HRNetV2p (same keys, same checks) whose outputs also include the body's, so Panoptic
    FPN's semantic head can read the HRNetV2 representation (``hrv2``) while the R-CNN heads
    read p2..p6.  Args as :func:`build_hrnetv2p_backbone`."""
    return build_hrnetv2p_backbone(cfg, input_shape, keep_body_outputs=True)


@BACKBONE_REGISTRY.register()
def build_hrnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """The HRNet body under Detectron2's own FPN (MODEL.FPN.*), for comparison with HRNetV2p.
    Args as :func:`build_hrnet_backbone`."""
    bottom_up = build_hrnet_backbone(cfg, input_shape)
    # Detectron2's FPN only asserts; say what to set (its default [] fits no HRNet)
    check_feature_names(
        "MODEL.FPN.IN_FEATURES",
        cfg.MODEL.FPN.IN_FEATURES,
        bottom_up.output_shape(),
        "the HRNet body (MODEL.HRNET.OUT_FEATURES)",
    )
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
