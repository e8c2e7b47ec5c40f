"""mmdetection's ``FCOSHead`` -> :class:`hrnet_d2.modeling.FCOSDetectorHead` names: what the head is (read
from its tensors), the name rules, and the check of the head against the target config.

mmdetection 2.x/3.x ``FCOSHead`` (``bbox_head.*`` at the top of the checkpoint):

==========================================  ================================================
``bbox_head.cls_convs.<i>.conv.*``           ``head.cls_subnet.<3i>.*`` (``<2i>`` without norm)
``bbox_head.cls_convs.<i>.gn.*``             ``head.cls_subnet.<3i+1>.*`` (GroupNorm)
``bbox_head.reg_convs.<i>.{conv,gn}.*``      ``head.bbox_subnet.*`` (the same)
``bbox_head.conv_cls.*``                     ``head.cls_score.*``
``bbox_head.conv_reg.*``                     ``head.bbox_pred.*``
``bbox_head.conv_centerness.*``              ``head.ctrness.*``
``bbox_head.scales.<l>.scale``               ``head.scales.<l>`` (one per level)
==========================================  ================================================

What the tensors cannot tell (``norm_on_bbox``, ``centerness_on_reg``, the test-time settings) is the
config's: ``configs/Base-FCOS-HRNetV2p-mmdet.yaml`` has the values of mmdetection's HRNet FCOS.
"""

import re
from typing import Dict, NamedTuple

import torch

from .layouts import ConversionError, describe_source, key_indices

__all__ = [
    "FCOS_META_ARCHITECTURE",
    "FCOSHeadSpec",
    "is_fcos_head",
    "detect_fcos_head",
    "convert_fcos_head",
    "fcos_check",
]

FCOS_META_ARCHITECTURE = "FCOSDetector"
_TOWERS = {"cls_convs": "cls_subnet", "reg_convs": "bbox_subnet"}
_PREDICTORS = {"conv_cls": "cls_score", "conv_reg": "bbox_pred", "conv_centerness": "ctrness"}
_TOWER = re.compile(r"^bbox_head\.(cls_convs|reg_convs)\.(\d+)\.(conv|gn)\.(weight|bias)$")
_PREDICTOR = re.compile(r"^bbox_head\.(conv_cls|conv_reg|conv_centerness)\.(weight|bias)$")
_SCALE = re.compile(r"^bbox_head\.scales\.(\d+)\.scale$")


class FCOSHeadSpec(NamedTuple):
    """What an mmdetection ``FCOSHead`` is (read from its tensors)."""

    num_classes: int
    num_convs: int  # per tower
    group_norm: bool  # GN after each tower conv
    conv_bias: bool  # bias in the tower convs
    num_scales: int  # learnable per-level scales (0: none)

    kind = "FCOS"
    mask_heads = 0
    background_first = False

    def describe(self):
        norm = "GN" if self.group_norm else "no norm"
        bias = "with" if self.conv_bias else "without"
        scales = f"{self.num_scales} level scales" if self.num_scales else "no level scales"
        return (
            f"FCOS, {self.num_classes} classes, {self.num_convs} convs per tower ({norm}, {bias} bias), {scales}; "
            "mmdetection 2.x/3.x FCOSHead"
        )


def is_fcos_head(heads: Dict[str, torch.Tensor]) -> bool:
    """Whether mmdetection head tensors are an ``FCOSHead`` (its centerness branch sets it apart)."""
    return any(k.startswith("bbox_head.conv_centerness.") for k in heads)


def detect_fcos_head(heads: Dict[str, torch.Tensor], source="") -> FCOSHeadSpec:
    """The :class:`FCOSHeadSpec` of mmdetection ``FCOSHead`` tensors; ConversionError when a part is missing."""
    keys = set(heads)
    where = describe_source(source)
    for name in _PREDICTORS:
        if f"bbox_head.{name}.weight" not in keys:
            raise ConversionError(
                f"{where}incomplete FCOS head: no 'bbox_head.{name}.weight' (FCOSHead has conv_cls, conv_reg, conv_centerness)"
            )
    towers = {t: key_indices(keys, f"bbox_head.{t}.") for t in _TOWERS}
    if towers["cls_convs"] != towers["reg_convs"] or towers["cls_convs"] != list(range(len(towers["cls_convs"]))):
        raise ConversionError(
            f"{where}FCOS towers differ or are not numbered 0..n-1: cls_convs {towers['cls_convs']}, reg_convs {towers['reg_convs']}"
        )
    num_convs = len(towers["cls_convs"])
    if num_convs == 0:
        raise ConversionError(
            f"{where}FCOS head without tower convs (bbox_head.cls_convs.*): not an mmdetection FCOSHead"
        )
    scales = key_indices(keys, "bbox_head.scales.")
    if scales != list(range(len(scales))):
        raise ConversionError(f"{where}bbox_head.scales.{scales} are not numbered 0..{len(scales) - 1}")
    reg, ctr = heads["bbox_head.conv_reg.weight"].shape[0], heads["bbox_head.conv_centerness.weight"].shape[0]
    if reg != 4 or ctr != 1:
        raise ConversionError(
            f"{where}bbox_head.conv_reg / conv_centerness have {reg} / {ctr} outputs, expected 4 / 1 (FCOSHead, one point per location)"
        )
    return FCOSHeadSpec(
        num_classes=int(heads["bbox_head.conv_cls.weight"].shape[0]),
        num_convs=num_convs,
        group_norm="bbox_head.cls_convs.0.gn.weight" in keys,
        conv_bias="bbox_head.cls_convs.0.conv.bias" in keys,
        num_scales=len(scales),
    )


def _rename(key, spec):
    m = _TOWER.match(key)
    if m:
        tower, i, part, param = m.groups()
        step = 3 if spec.group_norm else 2  # [conv, norm, relu] or [conv, relu] per conv
        return f"head.{_TOWERS[tower]}.{int(i) * step + (part == 'gn')}.{param}"
    m = _PREDICTOR.match(key)
    if m:
        return f"head.{_PREDICTORS[m[1]]}.{m[2]}"
    m = _SCALE.match(key)
    if m:
        return f"head.scales.{m[1]}"
    return None


def convert_fcos_head(conv, heads: Dict[str, torch.Tensor], expected, source=""):
    """Map an mmdetection ``FCOSHead`` into ``conv`` (a ``Conversion``); ``expected`` (a callable taking the
    :class:`FCOSHeadSpec`) refuses a head the target config cannot hold.  A tensor no rule maps stops the conversion."""
    spec = detect_fcos_head(heads, source)
    conv.detector = spec
    if expected is not None:
        expected(spec)
    for k, v in heads.items():
        dst = _rename(k, spec)
        if dst is None:
            raise ConversionError(
                f"{describe_source(source)}{k}: an FCOS head tensor with no Detectron2 counterpart (only FCOSHead's towers, "
                "GN, conv_cls / conv_reg / conv_centerness and scales convert); refusing to leave it out silently"
            )
        if k.startswith("bbox_head.scales.") and v.dim() != 0:
            raise ConversionError(
                f"{describe_source(source)}{k} has shape {tuple(v.shape)}, expected a scalar (mmcv Scale)"
            )
        conv.state_dict[dst] = v
        conv.mapped.append((k, dst))


def fcos_check(cfg, config_file, source=""):
    """A callable refusing an :class:`FCOSHeadSpec` that the config's ``FCOSDetector`` cannot hold (one line each)."""
    m, f = cfg.MODEL, cfg.MODEL.FCOS

    def fail(what, found, expected, key):
        raise ConversionError(
            f"{describe_source(source)}{what} mismatch: found {found} in the checkpoint, expected {expected} from "
            f"{config_file} ({key})"
        )

    def check(spec):
        if m.META_ARCHITECTURE != FCOS_META_ARCHITECTURE:
            fail("detector", "FCOS", m.META_ARCHITECTURE, f"MODEL.META_ARCHITECTURE: need {FCOS_META_ARCHITECTURE!r}")
        if spec.num_classes != f.NUM_CLASSES:
            fail(
                "number of classes",
                f"{spec.num_classes} classes",
                f"{f.NUM_CLASSES}",
                f"MODEL.FCOS.NUM_CLASSES = {f.NUM_CLASSES}",
            )
        if spec.num_convs != f.NUM_CONVS:
            fail(
                "tower depth",
                f"{spec.num_convs} convs per tower",
                f"{f.NUM_CONVS}",
                f"MODEL.FCOS.NUM_CONVS = {f.NUM_CONVS}",
            )
        if spec.group_norm != (f.NORM == "GN"):
            fail("tower norm", "GN" if spec.group_norm else "no norm", repr(f.NORM), f"MODEL.FCOS.NORM = {f.NORM!r}")
        if spec.conv_bias != f.CONV_BIAS:
            fail(
                "tower conv bias",
                "bias" if spec.conv_bias else "no bias",
                f"CONV_BIAS {f.CONV_BIAS}",
                f"MODEL.FCOS.CONV_BIAS = {f.CONV_BIAS}",
            )
        want = len(f.IN_FEATURES) if f.LEVEL_SCALES else 0
        if spec.num_scales != want:
            fail(
                "level scales",
                f"{spec.num_scales} scales",
                f"{want}",
                f"MODEL.FCOS.LEVEL_SCALES = {f.LEVEL_SCALES}, {len(f.IN_FEATURES)} MODEL.FCOS.IN_FEATURES",
            )

    return check
