"""Every check of a config, in one place, before any weights or data are touched.

``validate_config`` (YAML configs) checks each key hrnet_d2 models read, builds the backbone on
the meta device (no memory, no weights) to learn its ``output_shape()``, and checks that the
heads and anchors fit it.  ``validate_model`` does the same for a model built from a LazyConfig.
The modules (``HRNet``, ``HRNetV2p``) check their own arguments and name them
(:class:`ArgumentValueError`), as Detectron2's modules do; this step reports such an error under
the key that gave the argument: ``MODEL.HRNET.OUT_FEATURES`` for a YAML config,
``model.backbone.bottom_up.out_features`` for a LazyConfig.  Every error names the key, the bad
value and what is allowed, in one line.
"""

import math
from collections.abc import Sequence
from contextlib import contextmanager

import torch

from detectron2.modeling.backbone import build_backbone

from ..data.resize import RESIZE_BACKENDS
from ..modeling.arch import ARCHITECTURES, BLOCK_TYPES, FUSE_METHODS
from ..modeling.blocks import BLOCKS
from ..modeling.build import BACKBONES
from ..modeling.fcos import REG_ACTIVATIONS, TEST_CONVENTIONS
from ..modeling.hrnet import stage_specs_from_cfg as read_stage_specs
from ..modeling.htc import MASK_TEST_STAGES, SEMANTIC_FUSION
from ..modeling.layers import NORMS as HRNET_NORMS
from ..modeling.layers import get_norm
from ..utils.errors import ArgumentValueError, ConfigError, ConfigValueError, check_feature_names

__all__ = [
    "INPUT_FORMATS",
    "argument_errors_as_keys",
    "check_choice",
    "check_device",
    "check_world_size",
    "lazy_argument_errors",
    "stage_specs_from_cfg",
    "validate_config",
    "validate_model",
]

INPUT_FORMATS = ("RGB", "BGR", "YUV-BT.601")  # 3-channel formats of detection_utils.read_image
UPSAMPLE_MODES = ("nearest", "bilinear")
ALLOWED_NORMS = ("BN", "SyncBN", "FrozenBN", *HRNET_NORMS, "GN", "nnSyncBN", "naiveSyncBN", "LN")
_USES_RPN = ("GeneralizedRCNN", "ProposalNetwork", "PanopticFPN", "HybridTaskCascade")
_USES_ROI_HEADS = ("GeneralizedRCNN", "PanopticFPN", "HybridTaskCascade")
_USES_SEM_SEG_HEAD = ("SemanticSegmentor", "PanopticFPN")

# (module, argument) -> the YAML key the builders pass as that argument
ARGUMENT_KEYS = {
    ("HRNet", "out_features"): "MODEL.HRNET.OUT_FEATURES",
    ("HRNetV2p", "in_features"): "MODEL.HRNET_PYRAMID.IN_FEATURES",
    ("HRNetV2p", "pooling"): "MODEL.HRNET_PYRAMID.POOLING",
    ("HRNetV2p", "inference_autocast"): "MODEL.HRNET.INFERENCE_AUTOCAST",
    ("HRNetV2p", "conv_stride"): "MODEL.HRNET_PYRAMID.CONV_STRIDE",
    ("FPN", "in_features"): "MODEL.FPN.IN_FEATURES",
}


# ---------------------------------------------------------------------------------
# Single values


def _fail(key, value, allowed):
    raise ConfigValueError(key, value, allowed)


def check_choice(key, value, allowed):
    if value not in allowed:
        raise ConfigValueError(key, value, f"allowed: {list(allowed)}")


def _check_positive_int(key, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigValueError(key, value, "must be a positive integer")


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


def check_world_size(cfg, num_workers):
    """SOLVER.REFERENCE_WORLD_SIZE / IMS_PER_BATCH against the ``num_workers`` training processes,
    where Detectron2's ``DefaultTrainer.auto_scale_workers`` only asserts."""
    ref, batch = cfg.SOLVER.REFERENCE_WORLD_SIZE, cfg.SOLVER.IMS_PER_BATCH
    if not isinstance(ref, int) or ref < 0 or (ref not in (0, num_workers) and batch % ref):
        raise ConfigValueError(
            "SOLVER.REFERENCE_WORLD_SIZE",
            ref,
            f"must be 0 (no scaling) or a number of processes that divides SOLVER.IMS_PER_BATCH = {batch} "
            f"(for a smaller batch than the recipe's, also set SOLVER.REFERENCE_WORLD_SIZE 0)",
        )
    if not ref and batch % num_workers:
        raise ConfigValueError(
            "SOLVER.IMS_PER_BATCH", batch, f"must be divisible by the number of training processes ({num_workers})"
        )


def _check_pixels(mean_key, mean, std_key, std):
    """The input normalisation: HRNet takes 3-channel images."""
    if len(mean) != 3:
        raise ConfigValueError(mean_key, mean, "HRNet takes 3-channel input: needs 3 values")
    if len(std) != 3 or not all(v > 0 for v in std):
        raise ConfigValueError(std_key, std, "needs 3 positive values (the input is divided by them)")


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


# ---------------------------------------------------------------------------------
# The backbone's keys


def _stage_keys_used(h):
    return any(
        getattr(h, f"STAGE{k}").NUM_MODULES
        or getattr(h, f"STAGE{k}").NUM_BRANCHES
        or getattr(h, f"STAGE{k}").NUM_BLOCKS
        or getattr(h, f"STAGE{k}").NUM_CHANNELS
        for k in range(1, 5)
    )


def stage_specs_from_cfg(cfg):
    """The four StageSpecs of MODEL.HRNET (the architecture table's ``ARCH`` or the explicit
    STAGE1..4 keys), after checking those keys."""
    h = cfg.MODEL.HRNET
    if h.ARCH:
        check_choice("MODEL.HRNET.ARCH", h.ARCH, sorted(ARCHITECTURES) + ["''  (explicit MODEL.HRNET.STAGE1..4)"])
        if _stage_keys_used(h):
            raise ConfigError(
                f"MODEL.HRNET.ARCH = {h.ARCH!r} and explicit MODEL.HRNET.STAGE* keys are both set; "
                "set MODEL.HRNET.ARCH '' to use the explicit stage specs"
            )
        return read_stage_specs(cfg)
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
        prev_branches = s.NUM_BRANCHES
    return read_stage_specs(cfg)


def _body_widths(specs, stem_channels):
    """Every channel count the HRNet body normalises."""
    widths = {stem_channels, 64}
    for s in specs:
        for c in s.num_channels:
            widths |= {c, c * BLOCKS[s.block].expansion}
    return widths


def _check_body_keys(cfg):
    """MODEL.HRNET* and MODEL.BACKBONE.FREEZE_AT (OUT_FEATURES: HRNet checks it against what it produces)."""
    h = cfg.MODEL.HRNET
    specs = stage_specs_from_cfg(cfg)
    _check_positive_int("MODEL.HRNET.STEM_CHANNELS", h.STEM_CHANNELS)
    _check_norm(
        "MODEL.HRNET.NORM", h.NORM, False, _body_widths(specs, h.STEM_CHANNELS), f"HRNet {h.ARCH or 'STAGE1..4'}"
    )
    check_choice("MODEL.HRNET.FUSE_UPSAMPLE_MODE", h.FUSE_UPSAMPLE_MODE, UPSAMPLE_MODES)
    check_choice("MODEL.HRNET.HRV2_UPSAMPLE_MODE", h.HRV2_UPSAMPLE_MODE, UPSAMPLE_MODES)
    freeze_at = cfg.MODEL.BACKBONE.FREEZE_AT
    stages = len(specs) + 1  # HRNet.stage_modules: the stem, then each stage
    if not isinstance(freeze_at, int) or isinstance(freeze_at, bool) or not 0 <= freeze_at <= stages:
        raise ConfigValueError(
            "MODEL.BACKBONE.FREEZE_AT",
            freeze_at,
            f"allowed: 0..{stages} (0 none, 1 stem, 2 +stage1, 3 +stage2, 4 +stage3, 5 all)",
        )


def _check_pyramid_keys(cfg):
    """MODEL.HRNET_PYRAMID* (IN_FEATURES, POOLING and MODEL.HRNET.INFERENCE_AUTOCAST: HRNetV2p checks them)."""
    p = cfg.MODEL.HRNET_PYRAMID
    _check_positive_int("MODEL.HRNET_PYRAMID.OUT_CHANNELS", p.OUT_CHANNELS)
    _check_positive_int("MODEL.HRNET_PYRAMID.NUM_LEVELS", p.NUM_LEVELS)
    check_choice("MODEL.HRNET_PYRAMID.UPSAMPLE_MODE", p.UPSAMPLE_MODE, UPSAMPLE_MODES)
    _check_norm("MODEL.HRNET_PYRAMID.NORM", p.NORM, True, (p.OUT_CHANNELS,), "MODEL.HRNET_PYRAMID.OUT_CHANNELS")


@contextmanager
def argument_errors_as_keys(key_of):
    """Within: a module's :class:`ArgumentValueError` becomes a ConfigValueError naming
    ``key_of(error)`` (the key that gave the argument), where that is known."""
    try:
        yield
    except ArgumentValueError as e:
        key = key_of(e)
        if key is None:
            raise
        raise ConfigValueError(key, e.value, e.allowed) from e


def _lazy_path(node, owner, path):
    """The path of the first LazyCall in ``node`` whose target is named ``owner``, or None."""
    if not hasattr(node, "items"):
        return None
    target = node.get("_target_") if hasattr(node, "get") else None
    if target is not None and getattr(target, "__name__", str(target).rsplit(".", 1)[-1]) == owner:
        return path
    for k, v in node.items():
        found = None if k == "_target_" else _lazy_path(v, owner, f"{path}.{k}")
        if found:
            return found
    return None


def lazy_argument_errors(model_cfg, path="model"):
    """:func:`argument_errors_as_keys` for ``instantiate(model_cfg)`` of a LazyConfig: a module's
    argument error names the LazyConfig path (``model.backbone.bottom_up.out_features``)."""

    def key_of(e):
        node = _lazy_path(model_cfg, e.owner, path)
        return None if node is None else f"{node}.{e.argument}"

    return argument_errors_as_keys(key_of)


# ---------------------------------------------------------------------------------
# Whole-model checks: heads and anchors against what the backbone produces.


def _backbone_output_shapes(cfg):
    """The backbone's ``output_shape()``, from a backbone built on the meta device (no memory,
    no weights); its modules' argument errors name the keys that gave them."""
    with argument_errors_as_keys(lambda e: ARGUMENT_KEYS.get((e.owner, e.argument))), torch.device("meta"):
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


def _check_htc(cfg, shapes, what):
    """MODEL.HTC (hrnet_d2/modeling/htc.py): one loss weight per stage (MODEL.ROI_BOX_CASCADE_HEAD's), a known test mode, semantic levels
    the backbone produces, an embedding as wide as the RoI features it is added to."""
    h = cfg.MODEL.HTC
    c = cfg.MODEL.ROI_BOX_CASCADE_HEAD
    if c.STAGE_LOSS_WEIGHTS and len(c.STAGE_LOSS_WEIGHTS) != len(c.IOUS):
        raise ConfigValueError(
            "MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS",
            c.STAGE_LOSS_WEIGHTS,
            f"needs one weight per stage ({len(c.IOUS)}: MODEL.ROI_BOX_CASCADE_HEAD.IOUS), or [] for 1 each",
        )
    check_choice("MODEL.HTC.MASK_TEST_STAGES", h.MASK_TEST_STAGES, MASK_TEST_STAGES)
    s = h.SEMANTIC
    if not h.SEMANTIC_ON:
        return
    check_feature_names("MODEL.HTC.SEMANTIC.IN_FEATURES", s.IN_FEATURES, shapes, what)
    if s.FUSION_FEATURE not in s.IN_FEATURES:
        raise ConfigValueError(
            "MODEL.HTC.SEMANTIC.FUSION_FEATURE",
            s.FUSION_FEATURE,
            f"must be one of MODEL.HTC.SEMANTIC.IN_FEATURES {list(s.IN_FEATURES)}",
        )
    channels = shapes[cfg.MODEL.ROI_HEADS.IN_FEATURES[0]].channels
    if s.CONV_DIM != channels:
        raise ConfigValueError(
            "MODEL.HTC.SEMANTIC.CONV_DIM",
            s.CONV_DIM,
            f"must be the RoI features' channels ({channels}): it is added to them",
        )
    if not s.FUSION or any(f not in SEMANTIC_FUSION for f in s.FUSION):
        raise ConfigValueError(
            "MODEL.HTC.SEMANTIC.FUSION", list(s.FUSION), f"a non-empty subset of {list(SEMANTIC_FUSION)}"
        )


def _check_fcos_keys(cfg, shapes):
    """Raise :class:`ConfigValueError` (one line: key, value, what is allowed) for a ``MODEL.FCOS`` key that cannot
    work with a backbone producing ``shapes`` (its ``output_shape()``)."""
    f = cfg.MODEL.FCOS
    check_feature_names("MODEL.FCOS.IN_FEATURES", f.IN_FEATURES, shapes, f"the backbone ({cfg.MODEL.BACKBONE.NAME})")
    channels = [shapes[k].channels for k in f.IN_FEATURES]
    if len(set(channels)) != 1:
        raise ConfigValueError(
            "MODEL.FCOS.IN_FEATURES",
            list(f.IN_FEATURES),
            f"the levels need equal channels (one shared head): {channels}",
        )
    strides = [shapes[k].stride for k in f.IN_FEATURES]
    if any(s <= 0 or s & (s - 1) for s in strides):
        raise ConfigValueError("MODEL.FCOS.IN_FEATURES", list(f.IN_FEATURES), f"strides {strides} must be powers of 2")
    for key, value, allowed in (
        ("REG_ACTIVATION", f.REG_ACTIVATION, REG_ACTIVATIONS),
        ("TEST_CONVENTION", f.TEST_CONVENTION, TEST_CONVENTIONS),
    ):
        if value not in allowed:
            raise ConfigValueError(f"MODEL.FCOS.{key}", value, f"allowed: {list(allowed)}")
    for key in ("NUM_CLASSES", "NUM_CONVS", "TOPK_CANDIDATES_TEST"):
        value = getattr(f, key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigValueError(f"MODEL.FCOS.{key}", value, "must be a positive integer")
    if not 0.0 <= f.ANCHOR_OFFSET < 1.0:
        raise ConfigValueError("MODEL.FCOS.ANCHOR_OFFSET", f.ANCHOR_OFFSET, "must be in [0, 1)")
    if f.CENTER_SAMPLING_RADIUS < 0:
        raise ConfigValueError("MODEL.FCOS.CENTER_SAMPLING_RADIUS", f.CENTER_SAMPLING_RADIUS, "must be >= 0 (0: off)")
    if not 0.0 < f.PRIOR_PROB < 1.0:
        raise ConfigValueError("MODEL.FCOS.PRIOR_PROB", f.PRIOR_PROB, "must be in (0, 1)")


_validated = {}  # the MODEL and INPUT keys of the last config validate_config passed -> output shapes


def validate_config(cfg):
    """Check every key hrnet_d2 models use, before anything is built or read; returns the
    backbone's ``output_shape()``.

    A config is checked once per process: called again with the same MODEL.*, INPUT.* and TEST.* keys (all
    it reads; e.g. ``Trainer.build_model`` after ``train_net.py``'s early check, also on the copy whose
    SOLVER keys ``auto_scale_workers`` scaled), it returns the first call's result.

    Raises ConfigError (a ValueError) naming the key, the value and what is allowed.
    """
    dump = cfg.MODEL.dump() + cfg.INPUT.dump() + cfg.TEST.dump()
    if dump in _validated:
        return dict(_validated[dump])
    check_device(cfg.MODEL.DEVICE)
    check_choice("INPUT.FORMAT", cfg.INPUT.FORMAT, INPUT_FORMATS)
    check_choice("INPUT.RESIZE_BACKEND", cfg.INPUT.RESIZE_BACKEND, RESIZE_BACKENDS)
    _check_pixels("MODEL.PIXEL_MEAN", list(cfg.MODEL.PIXEL_MEAN), "MODEL.PIXEL_STD", list(cfg.MODEL.PIXEL_STD))
    ims = cfg.TEST.IMS_PER_BATCH
    if not isinstance(ims, int) or isinstance(ims, bool) or ims < 1:
        raise ConfigValueError(
            "TEST.IMS_PER_BATCH", ims, "must be a positive integer (images per forward in evaluation)"
        )
    backbone = BACKBONES.get(cfg.MODEL.BACKBONE.NAME)
    if backbone is not None:  # one of ours (a ResNet config keeps Detectron2's own checks)
        _check_body_keys(cfg)
        if backbone.hrnetv2p:
            _check_pyramid_keys(cfg)
    shapes = _backbone_output_shapes(cfg)
    what = f"the backbone ({cfg.MODEL.BACKBONE.NAME})"
    meta = cfg.MODEL.META_ARCHITECTURE
    if meta in _USES_RPN and cfg.MODEL.PROPOSAL_GENERATOR.NAME in ("RPN", "RRPN", "MMDetRPN"):
        check_feature_names("MODEL.RPN.IN_FEATURES", cfg.MODEL.RPN.IN_FEATURES, shapes, what)
        _check_anchors(cfg, "MODEL.RPN.IN_FEATURES", cfg.MODEL.RPN.IN_FEATURES)
    if meta in _USES_ROI_HEADS:
        check_feature_names("MODEL.ROI_HEADS.IN_FEATURES", cfg.MODEL.ROI_HEADS.IN_FEATURES, shapes, what)
        _check_consecutive_levels("MODEL.ROI_HEADS.IN_FEATURES", cfg.MODEL.ROI_HEADS.IN_FEATURES, shapes)
        if cfg.MODEL.ROI_HEADS.NAME == "HybridTaskCascadeROIHeads":
            _check_htc(cfg, shapes, what)
    if meta == "RetinaNet":
        check_feature_names("MODEL.RETINANET.IN_FEATURES", cfg.MODEL.RETINANET.IN_FEATURES, shapes, what)
        _check_anchors(cfg, "MODEL.RETINANET.IN_FEATURES", cfg.MODEL.RETINANET.IN_FEATURES)
    if meta in _USES_SEM_SEG_HEAD:
        check_feature_names("MODEL.SEM_SEG_HEAD.IN_FEATURES", cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES, shapes, what)
    if meta == "FCOSDetector":
        _check_fcos_keys(cfg, shapes)
    _validated.clear()
    _validated[dump] = dict(shapes)
    return shapes


def validate_model(model):
    """What ``validate_config`` checks, on a model built from a LazyConfig (whose heads
    are given explicit strides and scales): the heads read features the backbone
    produces, anchors and poolers use those features' strides, the input is 3-channel.
    (The modules' own arguments are checked as they are built: see :func:`lazy_argument_errors`.)

    Raises ValueError naming the LazyConfig key (``model.…``), the value and what is allowed.
    """
    if hasattr(model, "input_format"):
        check_choice("model.input_format", model.input_format, INPUT_FORMATS)
    if hasattr(model, "pixel_mean"):
        mean, std = model.pixel_mean.flatten().tolist(), model.pixel_std.flatten().tolist()
        _check_pixels("model.pixel_mean", mean, "model.pixel_std", std)
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
