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
    and number of classes are read from the tensors and checked against ``--config-file``.

Files are read without running pickled code (``torch.load(weights_only=True)``,
safetensors, or for ``.pkl`` the restricted unpickler of ``hrnet_d2.safe_load``).  Usage::

    python -m hrnet_d2.convert hrnetv2_w32_imagenet_pretrained.pth pretrained/hrnetv2_w32_imagenet_d2.pth \\
        --config-file configs/COCO-Detection/faster_rcnn_hrnetv2p_w32_1x.yaml
    python -m hrnet_d2.convert mask_rcnn_hrnetv2p_w32_1x_coco_20200207-b29f616e.pth mask_rcnn_w32_1x.pth \\
        --config-file configs/COCO-InstanceSegmentation/mask_rcnn_hrnetv2p_w32_1x_mmdet.yaml
"""

import argparse
import os
import pickle
import re
import sys
import zipfile
from collections import Counter, OrderedDict
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from .arch import ARCHITECTURES, StageSpec
from .errors import UserError, add_debug_argument, debug_enabled
from .safe_load import UnsafeFileError, load_pickle

__all__ = [
    "ConversionError",
    "Conversion",
    "Detector",
    "detect_detector",
    "load_state_dict",
    "unwrap_state_dict",
    "strip_module_prefix",
    "detect_stage_specs",
    "arch_name",
    "checkpoint_layout",
    "convert_state_dict",
    "describe_specs",
    "convert_file",
    "main",
]

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
# Detectron2 key prefix of the body, per MODEL.BACKBONE.NAME.
BODY_PREFIX = {
    "build_hrnetv2p_backbone": "backbone.bottom_up.",
    "build_hrnetv2p_with_body_backbone": "backbone.bottom_up.",
    "build_hrnet_fpn_backbone": "backbone.bottom_up.",
    "build_hrnet_backbone": "backbone.",
}
PYRAMID_PREFIX = "backbone."
# Top-level names of mmdetection detector heads (v2+: under roi_head.; v1/v0.x: at the top).
_HEAD_ROOTS = ("rpn_head", "roi_head", "bbox_head", "mask_head", "bbox_roi_extractor", "mask_roi_extractor")


# mmdetection head names (without "roi_head.") -> Detectron2 GeneralizedRCNN names; group 1 is the
# cascade stage ("2.") or None.  mmdetection's
# RPNHead / Shared2FCBBoxHead / FCNMaskHead are Detectron2's StandardRPNHead / FastRCNNConvFCHead
# (NUM_FC 2) + FastRCNNOutputLayers / MaskRCNNConvUpsampleHead (NUM_CONV 4) layer for layer.
_HEAD_RULES = [
    (re.compile(r"^rpn_head\.rpn_conv\.(weight|bias)$"), lambda m: f"proposal_generator.rpn_head.conv.{m[1]}"),
    (
        re.compile(r"^rpn_head\.rpn_cls\.(weight|bias)$"),
        lambda m: f"proposal_generator.rpn_head.objectness_logits.{m[1]}",
    ),
    (re.compile(r"^rpn_head\.rpn_reg\.(weight|bias)$"), lambda m: f"proposal_generator.rpn_head.anchor_deltas.{m[1]}"),
    (
        re.compile(r"^bbox_head\.(\d+\.)?shared_fcs\.([01])\.(weight|bias)$"),
        lambda m: f"roi_heads.box_head.{m[1] or ''}fc{int(m[2]) + 1}.{m[3]}",
    ),
    (
        re.compile(r"^bbox_head\.(\d+\.)?fc_cls\.(weight|bias)$"),
        lambda m: f"roi_heads.box_predictor.{m[1] or ''}cls_score.{m[2]}",
    ),
    (
        re.compile(r"^bbox_head\.(\d+\.)?fc_reg\.(weight|bias)$"),
        lambda m: f"roi_heads.box_predictor.{m[1] or ''}bbox_pred.{m[2]}",
    ),
    # one mask head per cascade stage -> MMDetCascadeROIHeads' StageMaskHeads (mask_head.heads.<stage>)
    (
        re.compile(r"^mask_head\.(\d+\.)?convs\.([0-3])\.conv\.(weight|bias)$"),
        lambda m: f"roi_heads.mask_head.{'heads.' + m[1] if m[1] else ''}mask_fcn{int(m[2]) + 1}.{m[3]}",
    ),
    (
        re.compile(r"^mask_head\.(\d+\.)?upsample\.(weight|bias)$"),
        lambda m: f"roi_heads.mask_head.{'heads.' + m[1] if m[1] else ''}deconv.{m[2]}",
    ),
    (
        re.compile(r"^mask_head\.(\d+\.)?conv_logits\.(weight|bias)$"),
        lambda m: f"roi_heads.mask_head.{'heads.' + m[1] if m[1] else ''}predictor.{m[2]}",
    ),
    # Hybrid Task Cascade (hrnet_d2/htc.py): HTCMaskHead's conv_res, FusedSemanticHead (ConvModules: conv + ReLU)
    (
        re.compile(r"^mask_head\.(\d+)\.conv_res\.conv\.(weight|bias)$"),
        lambda m: f"roi_heads.mask_head.heads.{m[1]}.conv_res.{m[2]}",
    ),
    (
        re.compile(r"^semantic_head\.((?:lateral_convs|convs)\.\d+|conv_embedding)\.conv\.(weight|bias)$"),
        lambda m: f"roi_heads.semantic_head.{m[1]}.{m[2]}",
    ),
    (
        re.compile(r"^semantic_head\.conv_logits\.(weight|bias)$"),
        lambda m: f"roi_heads.semantic_head.conv_logits.{m[1]}",
    ),
]
CASCADE_HEADS = ("CascadeROIHeads", "MMDetCascadeROIHeads", "HybridTaskCascadeROIHeads")
HTC_HEADS = "HybridTaskCascadeROIHeads"


class Detector(NamedTuple):
    """What the heads of an mmdetection checkpoint are (read from its tensors)."""

    num_classes: int
    cascade_stages: int  # 0: one box head (Faster / Mask R-CNN)
    mask_heads: int  # 0: no mask; Cascade Mask R-CNN has one per stage
    class_agnostic: bool  # box regression
    background_first: bool  # mmdetection v1.x / HRNet-Object-Detection class order
    conv_res_heads: int = 0  # Hybrid Task Cascade: mask heads taking the previous stage's features
    semantic_classes: int = 0  # Hybrid Task Cascade: FusedSemanticHead's classes (0: none)

    @property
    def htc(self):
        return bool(self.conv_res_heads or self.semantic_classes)

    @property
    def kind(self):
        if self.htc:
            return "Hybrid Task Cascade"
        if self.cascade_stages:
            return "Cascade Mask R-CNN" if self.mask_heads else "Cascade R-CNN"
        return "Mask R-CNN" if self.mask_heads else "Faster R-CNN"

    def describe(self):
        parts = [self.kind, f"{self.num_classes} classes"]
        if self.cascade_stages:
            parts.append(f"{self.cascade_stages} stages")
        if self.mask_heads > 1:
            parts.append(f"{self.mask_heads} mask heads")
        if self.htc:
            parts.append(f"mask information flow into {self.conv_res_heads} heads")
            parts.append(
                f"semantic head of {self.semantic_classes} classes" if self.semantic_classes else "no semantic head"
            )
        parts.append("class-agnostic" if self.class_agnostic else "class-specific")
        parts[-1] += " box regression"
        layout = (
            "mmdetection v1.x layout (background class first)"
            if self.background_first
            else "mmdetection 2.x/3.x layout (background class last)"
        )
        return ", ".join(parts) + "; " + layout


class ConversionError(UserError, ValueError):
    """A checkpoint that cannot be converted; the message says why and names the file."""


def _describe(source):
    return f"{source}: " if source else ""


def load_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read a checkpoint without executing pickled code and return its flat state dict.

    Unwraps the usual containers (``state_dict``, ``model``, ``module.`` prefixes).
    """
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise ConversionError(f"{path}: the file is empty (truncated download?)")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            data = load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ConversionError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    elif path.endswith(".pkl"):  # Detectron2 / Caffe2 layout: numpy arrays
        try:
            data = load_pickle(path)
        except UnsafeFileError as e:
            raise ConversionError(str(e)) from None
        except Exception as e:  # truncated or not a pickle: UnpicklingError, EOFError, ValueError, ...
            raise ConversionError(f"{path}: not a readable pickle (truncated or corrupt?): {e}") from e
        data = _arrays_to_tensors(data)
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            blocked = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
            if blocked:  # weights_only refused a class/function reference: code would have run
                raise ConversionError(
                    f"{path}: holds pickled objects other than tensors and plain containers; refusing to "
                    "load it because unpickling could run arbitrary code. Re-save only the state dict "
                    f"(torch.save(model.state_dict(), ...)) or use safetensors. ({blocked[0]})"
                ) from e
            raise ConversionError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, AttributeError) as e:
            raise ConversionError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e
    return unwrap_state_dict(data, path)


def _arrays_to_tensors(data):
    if isinstance(data, dict):
        return type(data)((k, _arrays_to_tensors(v)) for k, v in data.items())
    return torch.from_numpy(data) if isinstance(data, np.ndarray) else data


def strip_module_prefix(key: str) -> str:
    """``key`` without the ``module.`` prefix that (Distributed)DataParallel adds."""
    return key[len("module.") :] if key.startswith("module.") else key


def unwrap_state_dict(data, source=""):
    """The flat state dict of tensors inside a loaded checkpoint (``state_dict`` / ``model``
    containers unwrapped, ``module.`` prefixes removed); ConversionError if there is none."""
    if isinstance(data, dict):
        for key in ("state_dict", "model", "model_state", "state_dict_ema"):
            if key in data and isinstance(data[key], dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not data:
        raise ConversionError(f"{_describe(source)}holds {type(data).__name__}, not a state dict of tensors")
    out = OrderedDict()
    for k, v in data.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ConversionError(
                f"{_describe(source)}entry {k!r} is a {type(v).__name__}, not a tensor: not a state dict"
            )
        out[strip_module_prefix(k)] = v
    return out


def _indices(keys, prefix):
    """Sorted distinct integers ``i`` of keys that start with ``prefix + 'i.'``."""
    found = set()
    for k in keys:
        if k.startswith(prefix):
            head = k[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _block_type(keys, prefix):
    return "BOTTLENECK" if f"{prefix}conv3.weight" in keys else "BASIC"


def detect_stage_specs(body: Dict[str, torch.Tensor], source="") -> Tuple[Tuple[StageSpec, ...], int]:
    """The architecture of an HRNet body state dict, read from its keys and shapes.

    Returns the stage specs and the stem width.  Raises ConversionError when the
    tensors are not those of an HRNet body.
    """
    needed = ["conv1.weight", "conv2.weight", "layer1.0.conv1.weight", "stage2.0.branches.0.0.conv1.weight"]
    missing = [k for k in needed if k not in body]
    if missing:
        sample = ", ".join(list(body)[:5])
        raise ConversionError(
            f"{_describe(source)}not an HRNet checkpoint: no {missing[0]!r} "
            f"(HRNet ImageNet/timm/mmdetection checkpoints have it). First keys: {sample}"
        )
    keys = set(body)
    specs = []
    b1 = _block_type(keys, "layer1.0.")
    specs.append(StageSpec(1, 1, b1, (len(_indices(keys, "layer1.")),), (body["layer1.0.conv1.weight"].shape[0],)))
    k = 2
    while f"stage{k}.0.branches.0.0.conv1.weight" in body:
        modules = _indices(keys, f"stage{k}.")
        branches = _indices(keys, f"stage{k}.0.branches.")
        block = _block_type(keys, f"stage{k}.0.branches.0.0.")
        blocks = tuple(len(_indices(keys, f"stage{k}.0.branches.{b}.")) for b in branches)
        channels = tuple(body[f"stage{k}.0.branches.{b}.0.conv1.weight"].shape[0] for b in branches)
        specs.append(StageSpec(len(modules), len(branches), block, blocks, channels))
        k += 1
    return tuple(specs), int(body["conv1.weight"].shape[0])


def arch_name(specs) -> Optional[str]:
    """The name in hrnet_d2.arch.ARCHITECTURES with these stage specs, or None."""
    for name, ref in ARCHITECTURES.items():
        if tuple(ref) == tuple(specs):
            return name
    return None


def describe_specs(specs):
    """E.g. ``w18_small_v1 (branch widths 16/32/64/128)``."""
    name = arch_name(specs)
    widths = "/".join(str(c) for c in specs[-1].num_channels)
    return (
        f"{name} (branch widths {widths})"
        if name
        else f"an HRNet not in the architecture table (branch widths {widths})"
    )


_MMDET_PARTS = ("neck.", "rpn_head.", "roi_head.", "bbox_head.", "mask_head.")


def checkpoint_layout(state_dict) -> Optional[str]:
    """Which convertible layout a state dict has, from its keys: ``"imagenet"`` (official
    HRNet-Image-Classification or timm: the body at the top level), ``"mmdetection"``
    (``backbone.`` body + ``neck.`` / ``*_head.``), or None (e.g. Detectron2's own names)."""
    if "conv1.weight" in state_dict and "layer1.0.conv1.weight" in state_dict:
        return "imagenet"
    if "backbone.layer1.0.conv1.weight" in state_dict and any(k.startswith(_MMDET_PARTS) for k in state_dict):
        return "mmdetection"
    return None


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
        self.detector: Optional[Detector] = None

    @property
    def arch(self):
        return arch_name(self.specs)

    def report(self) -> str:
        lines = [f"Detected: {self.source_format}, HRNet {describe_specs(self.specs)}, stem width {self.stem_channels}"]
        if self.detector:
            lines.append(f"Detector: {self.detector.describe()}")
        neck = sum(1 for src, _ in self.mapped if src.startswith("neck."))
        heads = Counter(
            dst.split(".")[0] for _, dst in self.mapped if dst.startswith(("proposal_generator.", "roi_heads."))
        )
        lines.append(f"Mapped {len(self.mapped)} tensors:")
        lines.append(f"  HRNet body ({len(self.mapped) - neck - sum(heads.values())}) -> {self.body_prefix}*")
        if neck:
            lines.append(f"  HRFPN neck ({neck}) -> {PYRAMID_PREFIX}reduction_conv.*, {PYRAMID_PREFIX}fpn_convs.*")
        if heads["proposal_generator"]:
            lines.append(f"  RPN head ({heads['proposal_generator']}) -> proposal_generator.rpn_head.*")
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


def _head_tensors(heads, source):
    """mmdetection head tensors -> (layout-free names without ``roi_head.``, background_first)."""
    v2 = any(k.startswith("roi_head.") for k in heads)
    v1 = any(k.startswith(("bbox_head.", "mask_head.")) for k in heads)
    if v1 and v2:
        raise ConversionError(
            f"{_describe(source)}mixes mmdetection 2.x/3.x head names (roi_head.*) with v1.x ones "
            "(bbox_head.* at the top)"
        )
    out = OrderedDict((k[len("roi_head.") :] if k.startswith("roi_head.") else k, v) for k, v in heads.items())
    return out, v1


def detect_detector(heads: Dict[str, torch.Tensor], background_first: bool, source="") -> Detector:
    """Kind, stages and number of classes of mmdetection heads (names without ``roi_head.``)."""
    keys = set(heads)
    rpn = ("rpn_head.rpn_conv.weight", "rpn_head.rpn_cls.weight", "rpn_head.rpn_reg.weight")
    missing_rpn = [k for k in rpn if k not in keys]
    if missing_rpn:
        raise ConversionError(
            f"{_describe(source)}incomplete RPN head: no {missing_rpn[0]!r} (an mmdetection RPNHead has "
            "rpn_conv, rpn_cls and rpn_reg)"
        )
    stages = _indices(keys, "bbox_head.")
    prefixes = [f"bbox_head.{i}." for i in stages] or ["bbox_head."]
    if stages and stages != list(range(len(stages))):
        raise ConversionError(
            f"{_describe(source)}cascade box heads bbox_head.{stages} are not numbered 0..{len(stages) - 1}"
        )
    num_classes, agnostic = None, None
    for prefix in prefixes:
        need = [prefix + n for n in ("shared_fcs.0.weight", "shared_fcs.1.weight", "fc_cls.weight", "fc_reg.weight")]
        absent = [k for k in need if k not in keys]
        if absent:
            raise ConversionError(
                f"{_describe(source)}no {absent[0]!r}: only mmdetection's Shared2FCBBoxHead (shared_fcs.0/1, fc_cls, "
                "fc_reg) is converted"
            )
        rows = heads[prefix + "fc_cls.weight"].shape[0]
        reg = heads[prefix + "fc_reg.weight"].shape[0]
        k = rows - 1  # + background
        stage_agnostic = reg == 4
        if not stage_agnostic and reg != 4 * (rows if background_first else k):
            raise ConversionError(
                f"{_describe(source)}{prefix}fc_reg has {reg} outputs: expected 4 (class-agnostic) or "
                f"{4 * (rows if background_first else k)} (4 per class) for {k} classes ({prefix}fc_cls has {rows} rows)"
            )
        if num_classes is not None and (k, stage_agnostic) != (num_classes, agnostic):
            raise ConversionError(
                f"{_describe(source)}cascade stages disagree: {prefix}fc_cls/fc_reg give {k} classes, "
                f"{'class-agnostic' if stage_agnostic else 'class-specific'} regression; stage 0 differs"
            )
        num_classes, agnostic = k, stage_agnostic
    mask_heads = 0
    if any(k.startswith("mask_head.") for k in keys):
        mask_stages = _indices(keys, "mask_head.")
        mprefixes = [f"mask_head.{i}." for i in mask_stages] or ["mask_head."]
        if mask_stages and len(mask_stages) != len(stages):
            raise ConversionError(f"{_describe(source)}{len(mask_stages)} mask heads for {len(stages)} cascade stages")
        for prefix in mprefixes:
            need = [prefix + f"convs.{i}.conv.weight" for i in range(4)] + [
                prefix + "upsample.weight",
                prefix + "conv_logits.weight",
            ]
            absent = [k for k in need if k not in keys]
            if absent:
                raise ConversionError(
                    f"{_describe(source)}no {absent[0]!r}: only mmdetection's FCNMaskHead with 4 convs, "
                    "deconv upsampling and conv_logits is converted"
                )
            channels = heads[prefix + "conv_logits.weight"].shape[0]
            if channels not in (1, num_classes + background_first):
                raise ConversionError(
                    f"{_describe(source)}{prefix}conv_logits has {channels} outputs, expected {num_classes + background_first} "
                    f"for the {num_classes} classes of the box head (or 1: class-agnostic masks)"
                )
        mask_heads = len(mprefixes)
    conv_res = sum(f"mask_head.{i}.conv_res.conv.weight" in keys for i in _indices(keys, "mask_head."))
    semantic = heads["semantic_head.conv_logits.weight"].shape[0] if "semantic_head.conv_logits.weight" in keys else 0
    if (conv_res or semantic) and not (stages and mask_heads):
        raise ConversionError(
            f"{_describe(source)}HTC layers (mask_head.*.conv_res / semantic_head) without cascade mask heads: not a "
            "Hybrid Task Cascade checkpoint"
        )
    return Detector(num_classes, len(stages), mask_heads, agnostic, background_first, conv_res, semantic)


def _fix_class_order(name, value, detector):
    """mmdetection v1.x (class 0 = background) -> background last, as 2.x/3.x and Detectron2 have it."""
    if not detector.background_first:
        return value
    if re.search(r"fc_cls\.(weight|bias)$", name):
        return torch.cat([value[1:], value[:1]])
    if re.search(r"fc_reg\.(weight|bias)$", name) and not detector.class_agnostic:
        return value[4:]  # the background's 4 deltas
    if re.search(r"conv_logits\.(weight|bias)$", name) and value.shape[0] == detector.num_classes + 1:
        return value[1:]
    return value


def _expected_body(specs, stem_channels):
    """Names and shapes of the tensors hrnet_d2.HRNet holds for these specs (FrozenBN)."""
    from .hrnet import HRNet

    with torch.device("meta"):
        model = HRNet(specs, norm="FrozenBN", stem_channels=stem_channels)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert_state_dict(
    state_dict: Dict[str, torch.Tensor],
    *,
    backbone: str = "build_hrnetv2p_backbone",
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
    if backbone not in BODY_PREFIX:
        raise ConversionError(f"backbone {backbone!r} is not one of {sorted(BODY_PREFIX)}")
    body_prefix = BODY_PREFIX[backbone]
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
            elif k.split(".")[0] in _HEAD_ROOTS:
                heads[k] = v
            else:
                conv.unexpected.append(k)
        else:
            body[k] = v

    specs, stem = detect_stage_specs(body, source)
    conv.specs, conv.stem_channels = specs, stem
    if expected_specs is not None and tuple(expected_specs) != specs:
        raise ConversionError(
            f"{_describe(source)}width mismatch: found HRNet {describe_specs(specs)} in the checkpoint, "
            f"expected {describe_specs(tuple(expected_specs))} from {expected_from or 'the target'}"
        )
    if expected_stem_channels is not None and expected_stem_channels != stem:
        raise ConversionError(
            f"{_describe(source)}stem width mismatch: the checkpoint's conv1 has {stem} channels, "
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
                    f"{_describe(source)}{k} has shape {tuple(v.shape)}, expected {expected[k]} for HRNet {describe_specs(specs)}"
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
            f"{_describe(source)}incomplete HRNet body: {len(absent)} tensors missing, e.g. {absent[:3]}"
        )

    pyramid_target = backbone == "build_hrnetv2p_backbone"
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
        _convert_heads(conv, heads, pyramid_target, expected_detector, source)
    return conv


def _convert_heads(conv, heads, target, expected, source):
    if not target:
        for k in heads:
            conv.dropped.append((k, "detector head: the target backbone has no HRNetV2p pyramid for it"))
        return
    named, background_first = _head_tensors(heads, source)
    detector = detect_detector(named, background_first, source)
    conv.detector = detector
    if expected is not None:
        expected(detector)
    original = dict(zip(named, heads))  # name without roi_head. -> checkpoint key
    for k, v in named.items():
        if k.endswith("num_batches_tracked"):
            conv.dropped.append((original[k], "BatchNorm step counter"))
            continue
        for pattern, repl in _HEAD_RULES:
            m = pattern.match(k)
            if m:
                dst = repl(m)
                conv.state_dict[dst] = _fix_class_order(k, v, detector)
                conv.mapped.append((original[k], dst))
                break
        else:
            raise ConversionError(
                f"{_describe(source)}{original[k]}: a head tensor with no Detectron2 counterpart (only RPNHead, "
                "Shared2FCBBoxHead, FCNMaskHead / HTCMaskHead and FusedSemanticHead layers convert); refusing to "
                "leave it out silently"
            )


def _target_from_config(config_file, opts):
    from .build import stage_specs_from_cfg
    from .config import get_hrnet_cfg

    cfg = get_hrnet_cfg(config_file, opts)
    name = cfg.MODEL.BACKBONE.NAME
    if name not in BODY_PREFIX:
        raise ConversionError(
            f"{config_file}: MODEL.BACKBONE.NAME = {name!r} is not an hrnet_d2 backbone; allowed: {sorted(BODY_PREFIX)}"
        )
    where = f"{config_file} (MODEL.HRNET.ARCH = {cfg.MODEL.HRNET.ARCH!r})"
    return cfg, name, stage_specs_from_cfg(cfg), cfg.MODEL.HRNET.STEM_CHANNELS, where


def _detector_check(cfg, config_file, source):
    """A callable refusing a :class:`Detector` that the config's model cannot hold."""
    m = cfg.MODEL

    def fail(what, found, expected, key):
        raise ConversionError(
            f"{_describe(source)}{what} mismatch: found {found} in the checkpoint, expected {expected} from "
            f"{config_file} ({key})"
        )

    def check(det):
        if m.META_ARCHITECTURE != "GeneralizedRCNN" or m.PROPOSAL_GENERATOR.NAME not in ("RPN", "MMDetRPN"):
            fail(
                "detector",
                det.kind,
                f"{m.META_ARCHITECTURE} with {m.PROPOSAL_GENERATOR.NAME}",
                "MODEL.META_ARCHITECTURE / MODEL.PROPOSAL_GENERATOR.NAME: need GeneralizedRCNN with RPN or MMDetRPN",
            )
        cascade = m.ROI_HEADS.NAME in CASCADE_HEADS
        stages = len(m.ROI_BOX_CASCADE_HEAD.IOUS) if cascade else 0
        if det.cascade_stages != stages:
            fail(
                "cascade",
                f"{det.kind} with {det.cascade_stages or 'no'} cascade stages",
                f"{stages or 'no'} cascade stages",
                f"MODEL.ROI_HEADS.NAME = {m.ROI_HEADS.NAME!r}"
                + (f", {stages} MODEL.ROI_BOX_CASCADE_HEAD.IOUS" if cascade else ""),
            )
        if bool(det.mask_heads) != m.MASK_ON:
            fail(
                "mask head",
                f"{det.kind} ({'with' if det.mask_heads else 'no'} mask head)",
                f"{'a' if m.MASK_ON else 'no'} mask head",
                f"MODEL.MASK_ON = {m.MASK_ON}",
            )
        if det.htc != (m.ROI_HEADS.NAME == HTC_HEADS):
            fail(
                "detector",
                det.kind,
                "Hybrid Task Cascade"
                if m.ROI_HEADS.NAME == HTC_HEADS
                else f"no Hybrid Task Cascade ({m.ROI_HEADS.NAME})",
                f"MODEL.ROI_HEADS.NAME = {m.ROI_HEADS.NAME!r}"
                + ("" if det.htc else f"; {HTC_HEADS!r} needs HTC heads"),
            )
        if det.mask_heads > 1 and m.ROI_HEADS.NAME not in ("MMDetCascadeROIHeads", HTC_HEADS):
            fail(
                "mask head",
                f"{det.mask_heads} mask heads (one per cascade stage, averaged by mmdetection)",
                "one mask head",
                f"MODEL.ROI_HEADS.NAME = {m.ROI_HEADS.NAME!r}; 'MMDetCascadeROIHeads' has one per stage",
            )
        if det.htc and bool(det.semantic_classes) != m.HTC.SEMANTIC.ON:
            fail(
                "semantic head",
                f"{det.kind} {'with' if det.semantic_classes else 'without'} a semantic head",
                f"{'a' if m.HTC.SEMANTIC.ON else 'no'} semantic head",
                f"MODEL.HTC.SEMANTIC.ON = {m.HTC.SEMANTIC.ON}",
            )
        if det.num_classes != m.ROI_HEADS.NUM_CLASSES:
            fail(
                "number of classes",
                f"{det.num_classes} classes",
                f"{m.ROI_HEADS.NUM_CLASSES} classes",
                f"MODEL.ROI_HEADS.NUM_CLASSES = {m.ROI_HEADS.NUM_CLASSES}",
            )
        if det.class_agnostic != m.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG:
            fail(
                "box regression",
                "class-agnostic" if det.class_agnostic else "class-specific",
                "class-agnostic" if m.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG else "class-specific",
                f"MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = {m.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG}",
            )

    return check


def _check_against_model(conv, cfg, config_file, source):
    """Every converted head tensor has its place, with its shape, in the config's model; no head tensor is left out."""
    from detectron2.modeling import META_ARCH_REGISTRY

    with torch.device("meta"):
        model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    heads = ("proposal_generator.", "roi_heads.")
    for k, v in conv.state_dict.items():
        if not k.startswith(heads):
            continue
        if k not in expected:
            raise ConversionError(f"{_describe(source)}{k}: the model of {config_file} has no such tensor")
        if tuple(v.shape) != expected[k]:
            raise ConversionError(
                f"{_describe(source)}{k}: found shape {tuple(v.shape)} in the checkpoint, expected {expected[k]} "
                f"from {config_file}"
            )
    absent = [k for k in expected if k.startswith(heads) and k not in conv.state_dict]
    if absent:
        raise ConversionError(
            f"{_describe(source)}the heads lack {len(absent)} tensors of the model of {config_file}, e.g. {absent[:3]}"
        )


def convert_file(src, dst, *, config_file=None, opts=(), arch=None, backbone=None) -> Conversion:
    """Convert ``src`` and write a Detectron2 checkpoint to ``dst``; see :func:`main`.

    With ``config_file``, an mmdetection detector's heads are checked against the model
    it describes (kind, cascade stages, MASK_ON, NUM_CLASSES, every tensor's shape).
    """
    target = backbone or "build_hrnetv2p_backbone"
    cfg, expected_specs, expected_stem, expected_from, expected_detector = None, None, None, "", None
    if config_file:
        cfg, cfg_backbone, expected_specs, expected_stem, expected_from = _target_from_config(config_file, opts)
        expected_detector = _detector_check(cfg, config_file, src)
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
        _check_against_model(conv, cfg, config_file, src)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    torch.save(
        {
            "model": {k: v.contiguous() for k, v in conv.state_dict.items()},
            "__author__": f"hrnet_d2.convert from {os.path.basename(src)}",
            "matching_heuristics": False,
        },
        dst,
    )
    return conv


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m hrnet_d2.convert",
        description="Convert an HRNet checkpoint (official ImageNet .pth, timm .pth/.safetensors, or "
        "mmdetection HRNet Faster/Mask/Cascade (Mask) R-CNN or Hybrid Task Cascade .pth) into a Detectron2 checkpoint for MODEL.WEIGHTS.",
    )
    p.add_argument("src", help="input checkpoint")
    p.add_argument("dst", help="output .pth (Detectron2 format)")
    p.add_argument(
        "--config-file",
        help="target config: its backbone and MODEL.HRNET width are checked, and for an mmdetection detector its "
        "kind, cascade stages, MODEL.MASK_ON, NUM_CLASSES and every head tensor's shape",
    )
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), help="expected architecture (checked)")
    p.add_argument(
        "--backbone",
        choices=sorted(BODY_PREFIX),
        help="target MODEL.BACKBONE.NAME (default: from --config-file, else build_hrnetv2p_backbone)",
    )
    p.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE", help="config overrides for --config-file")
    return add_debug_argument(p)


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.opts and not args.config_file:
        parser.error("--opts needs --config-file")
    try:
        conv = convert_file(
            args.src, args.dst, config_file=args.config_file, opts=args.opts, arch=args.arch, backbone=args.backbone
        )
    except UserError as e:  # ConversionError, or a config error of --config-file
        if args.debug or debug_enabled([]):
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(conv.report())
    print(f"Wrote {args.dst}; use it with MODEL.WEIGHTS {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
