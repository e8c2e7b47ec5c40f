"""Convert HRNet checkpoints into Detectron2 checkpoints for ``MODEL.WEIGHTS``.

Accepted inputs (the format is detected from the keys, the width from tensor shapes):
  * official HRNet-Image-Classification ImageNet checkpoints (``hrnetv2_w32_imagenet_pretrained.pth``,
    ``hrnet_w18_small_model_v1.pth``, ...): a plain state dict;
  * timm ``hrnet_*`` state dicts (``.pth`` or ``.safetensors``), which use the same names;
  * mmdetection HRNet detection checkpoints: Faster R-CNN, Mask R-CNN, Cascade R-CNN,
    Cascade Mask R-CNN and Hybrid Task Cascade, whole (body, HRFPN neck -> HRNetV2p, RPN head,
    shared-2fc box head(s), mask head(s) with HTC's conv_res, HTC's fused semantic head), from mmdetection 2.x/3.x (``roi_head.*`` keys, background last)
    and from mmdetection v1.x / HRNet-Object-Detection (``bbox_head.*`` keys, background
    first: moved last, its regression and mask channels dropped).  The detector kind, stages
    and number of classes are read from the tensors and checked against ``--config-file``;
  * mmdetection HRNet FCOS checkpoints (``bbox_head.conv_centerness``: body, HRFPN neck, FCOSHead ->
    ``FCOSDetector``'s ``head.*``; ``fcos_rules.py``).

Files are read without running pickled code (``torch.load(weights_only=True)``,
safetensors, or for ``.pkl`` the restricted unpickler of ``hrnet_d2.utils.safe_load``).  Usage::

    python -m hrnet_d2.convert hrnetv2_w32_imagenet_pretrained.pth pretrained/hrnetv2_w32_imagenet_d2.pth \\
        --config-file configs/COCO-Detection/faster_rcnn_hrnetv2p_w32_1x.yaml
    python -m hrnet_d2.convert mask_rcnn_hrnetv2p_w32_1x_coco_20200207-b29f616e.pth mask_rcnn_w32_1x.pth \\
        --config-file configs/COCO-InstanceSegmentation/mask_rcnn_hrnetv2p_w32_1x_mmdet.yaml
"""

import os
import re
from collections import Counter, OrderedDict
from typing import Dict, List, Optional, Tuple, Union

import torch

from ..modeling.arch import ARCHITECTURES
from ..modeling.build import BACKBONES, DETECTOR_BACKBONE
from ..utils.file_io import atomic_write
from .fcos_rules import FCOSHeadSpec
from .layouts import ConversionError, arch_name, describe_source, describe_specs, detect_stage_specs, load_state_dict
from .mmdet_rules import HEAD_ROOTS, Detector, check_heads_against_model, convert_heads, detector_check

__all__ = ["PYRAMID_PREFIX", "Conversion", "convert_state_dict", "convert_file"]

# Parts of the HRNet body (what hrnet_d2.HRNet holds).
_BODY = re.compile(r"^(conv1|bn1|conv2|bn2|layer1|transition\d+|stage\d+)\.")
# Parts only the ImageNet classifier uses (official / timm).
_CLASSIFICATION_ONLY = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.", "head.", "fc.")
# mmdetection HRFPN neck (v0.x HRNet-Object-Detection, v1 and v2+ layouts) -> HRNetV2p names.
_NECK_RULES = [
    (re.compile(r"^reduction_conv\.(?:0\.|conv\.)?(weight|bias)$"), r"reduction_conv.\1"),
    (re.compile(r"^reduction_conv\.(?:bn|gn|norm)\.(.+)$"), r"reduction_conv.norm.\1"),
    (re.compile(r"^fpn_convs?\.(\d+)\.(?:conv\.)?(weight|bias)$"), r"fpn_convs.\1.\2"),
    (re.compile(r"^fpn_convs?\.(\d+)\.(?:bn|gn|norm)\.(.+)$"), r"fpn_convs.\1.norm.\2"),
    (re.compile(r"^fpn_conv\.(weight|bias)$"), r"fpn_convs.0.\1"),  # share_conv=True
]
PYRAMID_PREFIX = "backbone."


class Conversion:
    """What a conversion produced: the Detectron2 state dict and a report of every key."""

    def __init__(self):
        self.state_dict = OrderedDict()
        self.mapped: List[Tuple[str, str]] = []
        self.dropped: List[Tuple[str, str]] = []  # (key, reason)
        self.unexpected: List[str] = []
        self.specs = None
        self.stem_channels = None
        self.source_format = ""
        self.body_prefix = ""
        self.detector: Optional[Union[Detector, FCOSHeadSpec]] = None

    @property
    def arch(self):
        return arch_name(self.specs)

    def report(self) -> str:
        lines = [f"Detected: {self.source_format}, HRNet {describe_specs(self.specs)}, stem width {self.stem_channels}"]
        if self.detector:
            lines.append(f"Detector: {self.detector.describe()}")
        neck = sum(1 for src, _ in self.mapped if src.startswith("neck."))
        heads = Counter(
            dst.split(".")[0]
            for _, dst in self.mapped
            if dst.startswith(("proposal_generator.", "roi_heads.", "head."))
        )
        lines.append(f"Mapped {len(self.mapped)} tensors:")
        lines.append(f"  HRNet body ({len(self.mapped) - neck - sum(heads.values())}) -> {self.body_prefix}*")
        if neck:
            lines.append(f"  HRFPN neck ({neck}) -> {PYRAMID_PREFIX}reduction_conv.*, {PYRAMID_PREFIX}fpn_convs.*")
        if heads["proposal_generator"]:
            lines.append(f"  RPN head ({heads['proposal_generator']}) -> proposal_generator.rpn_head.*")
        if heads["head"]:
            lines.append(f"  FCOS head ({heads['head']}) -> head.cls_subnet*, head.bbox_subnet*, head.cls_score*, ...")
        if heads["roi_heads"]:
            lines.append(
                f"  ROI heads ({heads['roi_heads']}) -> roi_heads.box_head*, roi_heads.box_predictor*"
                + (", roi_heads.mask_head*" if self.detector and self.detector.mask_heads else "")
                + (", roi_heads.semantic_head*" if self.detector and self.detector.semantic_classes else "")
            )
        if self.detector and self.detector.background_first:
            lines.append(
                "  class order: background moved from first to last (cls_score); its box regression "
                "and mask channels dropped"
            )
            lines.append(
                "Note: mmdetection v1 inference conventions (+1 box widths, legacy anchors and RoIAlign) "
                "have no exact Detectron2 equivalent: README 'Converting mmdetection detectors' gives "
                "the closest settings"
            )
        lines.append(f"Dropped {len(self.dropped)} tensors:")
        for (group, reason), n in sorted(Counter((_group(k), r) for k, r in self.dropped).items()):
            lines.append(f"  {group} ({n}): {reason}")
        lines.append(
            f"Unexpected (not HRNet, left out) {len(self.unexpected)} tensors" + (":" if self.unexpected else "")
        )
        for group, n in sorted(Counter(_group(k) for k in self.unexpected).items()):
            lines.append(f"  {group} ({n})")
        return "\n".join(lines)


def _group(key):
    """A short pattern for a set of keys in the report."""
    if key.endswith("num_batches_tracked"):
        return "*.num_batches_tracked"
    parts = key.split(".")
    depth = 2 if parts[0] in ("backbone", "neck", "roi_head", "rpn_head") and len(parts) > 2 else 1
    return ".".join(parts[:depth]) + ".*"


def _expected_body(specs, stem_channels):
    """Names and shapes of the tensors hrnet_d2.HRNet holds for these specs (FrozenBN)."""
    from ..modeling.hrnet import HRNet

    with torch.device("meta"):
        model = HRNet(specs, norm="FrozenBN", stem_channels=stem_channels)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert_state_dict(
    state_dict: Dict[str, torch.Tensor],
    *,
    backbone: str = DETECTOR_BACKBONE,
    expected_specs=None,
    expected_stem_channels: Optional[int] = None,
    expected_from: str = "",
    expected_detector=None,
    source: str = "",
) -> Conversion:
    """Map an HRNet classification / timm / mmdetection state dict to Detectron2 names.

    ``backbone`` is the target MODEL.BACKBONE.NAME: it decides where the body lives
    ("backbone.bottom_up." for HRNetV2p/FPN, "backbone." for the bare body) and whether
    an mmdetection HRFPN neck has somewhere to go.  With ``expected_specs`` the
    checkpoint's width must match it; ``expected_from`` names where the expectation
    came from (a config key) for the error message.  ``expected_detector`` (a callable taking
    the :class:`Detector` read from the heads) raises ConversionError when the heads do not fit
    the target config.
    """
    if backbone not in BACKBONES:
        raise ConversionError(f"backbone {backbone!r} is not one of {sorted(BACKBONES)}")
    body_prefix = BACKBONES[backbone].body_prefix
    conv = Conversion()
    conv.body_prefix = body_prefix
    mmdet = any(k.startswith("backbone.") for k in state_dict)
    conv.source_format = "mmdetection detection checkpoint" if mmdet else "HRNet ImageNet (official/timm) checkpoint"
    body, neck, heads = OrderedDict(), OrderedDict(), OrderedDict()
    for k, v in state_dict.items():
        if mmdet:
            if k.startswith("backbone."):
                body[k[len("backbone.") :]] = v
            elif k.startswith("neck."):
                neck[k[len("neck.") :]] = v
            elif k.split(".")[0] in HEAD_ROOTS:
                heads[k] = v
            else:
                conv.unexpected.append(k)
        else:
            body[k] = v

    specs, stem = detect_stage_specs(body, source)
    conv.specs, conv.stem_channels = specs, stem
    if expected_specs is not None and tuple(expected_specs) != specs:
        raise ConversionError(
            f"{describe_source(source)}width mismatch: found HRNet {describe_specs(specs)} in the checkpoint, "
            f"expected {describe_specs(tuple(expected_specs))} from {expected_from or 'the target'}"
        )
    if expected_stem_channels is not None and expected_stem_channels != stem:
        raise ConversionError(
            f"{describe_source(source)}stem width mismatch: the checkpoint's conv1 has {stem} channels, "
            f"but MODEL.HRNET.STEM_CHANNELS = {expected_stem_channels}"
        )

    expected = _expected_body(specs, stem)
    for k, v in body.items():
        if k.endswith("num_batches_tracked"):
            conv.dropped.append((("backbone." if mmdet else "") + k, "BatchNorm step counter (FrozenBN has none)"))
        elif _BODY.match(k):
            if k not in expected:
                conv.unexpected.append(("backbone." if mmdet else "") + k)
                continue
            if tuple(v.shape) != expected[k]:
                raise ConversionError(
                    f"{describe_source(source)}{k} has shape {tuple(v.shape)}, expected {expected[k]} for HRNet {describe_specs(specs)}"
                )
            dst = body_prefix + k
            conv.state_dict[dst] = v
            conv.mapped.append((k, dst))
        elif k.startswith(_CLASSIFICATION_ONLY):
            conv.dropped.append((k, "ImageNet classification head (not used by detectors)"))
        else:
            conv.unexpected.append(("backbone." if mmdet else "") + k)
    absent = [k for k in expected if body_prefix + k not in conv.state_dict]
    if absent:
        raise ConversionError(
            f"{describe_source(source)}incomplete HRNet body: {len(absent)} tensors missing, e.g. {absent[:3]}"
        )

    pyramid_target = BACKBONES[backbone].hrnetv2p
    for k, v in neck.items():
        if k.endswith("num_batches_tracked"):
            conv.dropped.append(("neck." + k, "BatchNorm step counter"))
            continue
        for pattern, repl in _NECK_RULES:
            if pattern.match(k):
                if pyramid_target:
                    dst = PYRAMID_PREFIX + pattern.sub(repl, k)
                    conv.state_dict[dst] = v
                    conv.mapped.append(("neck." + k, dst))
                else:
                    conv.dropped.append(("neck." + k, "HRFPN neck: the target backbone has no HRNetV2p pyramid"))
                break
        else:
            conv.unexpected.append("neck." + k)

    if heads:
        convert_heads(conv, heads, pyramid_target, expected_detector, source)
    return conv


def _target_from_config(config_file, opts):
    from ..config import get_hrnet_cfg
    from ..config.validate import stage_specs_from_cfg

    cfg = get_hrnet_cfg(config_file, opts)
    name = cfg.MODEL.BACKBONE.NAME
    if name not in BACKBONES:
        raise ConversionError(
            f"{config_file}: MODEL.BACKBONE.NAME = {name!r} is not an hrnet_d2 backbone; allowed: {sorted(BACKBONES)}"
        )
    where = f"{config_file} (MODEL.HRNET.ARCH = {cfg.MODEL.HRNET.ARCH!r})"
    return cfg, name, stage_specs_from_cfg(cfg), cfg.MODEL.HRNET.STEM_CHANNELS, where


def convert_file(src, dst, *, config_file=None, opts=(), arch=None, backbone=None) -> Conversion:
    """Convert ``src`` and write a Detectron2 checkpoint to ``dst``; see :func:`main`.

    With ``config_file``, an mmdetection detector's heads are checked against the model
    it describes (kind, cascade stages, MASK_ON, NUM_CLASSES, every tensor's shape).
    """
    target = backbone or DETECTOR_BACKBONE
    cfg, expected_specs, expected_stem, expected_from, expected_detector = None, None, None, "", None
    if config_file:
        cfg, cfg_backbone, expected_specs, expected_stem, expected_from = _target_from_config(config_file, opts)
        expected_detector = detector_check(cfg, config_file, src)
        if backbone is None:
            target = cfg_backbone
    if arch:
        if arch not in ARCHITECTURES:
            raise ConversionError(f"--arch {arch!r} is not one of {sorted(ARCHITECTURES)}")
        if expected_specs is not None and tuple(ARCHITECTURES[arch]) != tuple(expected_specs):
            raise ConversionError(f"--arch {arch} contradicts {expected_from}")
        expected_specs, expected_from = ARCHITECTURES[arch], expected_from or f"--arch {arch}"
    conv = convert_state_dict(
        load_state_dict(src),
        backbone=target,
        expected_specs=expected_specs,
        expected_stem_channels=expected_stem,
        expected_from=expected_from,
        expected_detector=expected_detector,
        source=src,
    )
    if conv.detector is not None and cfg is not None:
        check_heads_against_model(conv, cfg, config_file, src)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    data = {
        "model": {k: v.contiguous() for k, v in conv.state_dict.items()},
        "__author__": f"hrnet_d2.convert from {os.path.basename(src)}",
        "matching_heuristics": False,
    }
    atomic_write(dst, lambda f: torch.save(data, f))  # whole or not at all (hrnet_d2:// caches it)
    return conv
