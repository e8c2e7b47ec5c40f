"""mmdetection detector heads -> Detectron2 names: what a checkpoint's heads are (kind, cascade
stages, mask heads, Hybrid Task Cascade's information flow and semantic head, classes, read from the tensors), the name rules, the class-order fix of
mmdetection v1.x files, and the checks of the heads against the target config's model."""

import re
from collections import OrderedDict
from typing import Dict, NamedTuple

import torch

from .fcos_rules import FCOSHeadSpec, convert_fcos_head, fcos_check, is_fcos_head
from .layouts import ConversionError, describe_source, key_indices

__all__ = [
    "CASCADE_HEADS",
    "HTC_HEADS",
    "HEAD_ROOTS",
    "Detector",
    "check_heads_against_model",
    "convert_heads",
    "detect_detector",
    "detector_check",
]

# Top-level names of mmdetection detector heads (v2+: under roi_head.; v1/v0.x: at the top).
HEAD_ROOTS = ("rpn_head", "roi_head", "bbox_head", "mask_head", "bbox_roi_extractor", "mask_roi_extractor")


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
    # Hybrid Task Cascade (hrnet_d2/modeling/htc.py): HTCMaskHead's conv_res and FusedSemanticHead, whose
    # mmcv ConvModules (conv + ReLU) are Detectron2 Conv2d's with the ReLU as activation
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
HTC_HEADS = "HybridTaskCascadeROIHeads"
CASCADE_HEADS = ("CascadeROIHeads", "MMDetCascadeROIHeads", HTC_HEADS)


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


def _head_tensors(heads, source):
    """mmdetection head tensors -> (layout-free names without ``roi_head.``, background_first)."""
    v2 = any(k.startswith("roi_head.") for k in heads)
    v1 = any(k.startswith(("bbox_head.", "mask_head.")) for k in heads)
    if v1 and v2:
        raise ConversionError(
            f"{describe_source(source)}mixes mmdetection 2.x/3.x head names (roi_head.*) with v1.x ones "
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
            f"{describe_source(source)}incomplete RPN head: no {missing_rpn[0]!r} (an mmdetection RPNHead has "
            "rpn_conv, rpn_cls and rpn_reg)"
        )
    stages = key_indices(keys, "bbox_head.")
    prefixes = [f"bbox_head.{i}." for i in stages] or ["bbox_head."]
    if stages and stages != list(range(len(stages))):
        raise ConversionError(
            f"{describe_source(source)}cascade box heads bbox_head.{stages} are not numbered 0..{len(stages) - 1}"
        )
    num_classes, agnostic = None, None
    for prefix in prefixes:
        need = [prefix + n for n in ("shared_fcs.0.weight", "shared_fcs.1.weight", "fc_cls.weight", "fc_reg.weight")]
        absent = [k for k in need if k not in keys]
        if absent:
            raise ConversionError(
                f"{describe_source(source)}no {absent[0]!r}: only mmdetection's Shared2FCBBoxHead (shared_fcs.0/1, fc_cls, "
                "fc_reg) is converted"
            )
        rows = heads[prefix + "fc_cls.weight"].shape[0]
        reg = heads[prefix + "fc_reg.weight"].shape[0]
        k = rows - 1  # + background
        stage_agnostic = reg == 4
        if not stage_agnostic and reg != 4 * (rows if background_first else k):
            raise ConversionError(
                f"{describe_source(source)}{prefix}fc_reg has {reg} outputs: expected 4 (class-agnostic) or "
                f"{4 * (rows if background_first else k)} (4 per class) for {k} classes ({prefix}fc_cls has {rows} rows)"
            )
        if num_classes is not None and (k, stage_agnostic) != (num_classes, agnostic):
            raise ConversionError(
                f"{describe_source(source)}cascade stages disagree: {prefix}fc_cls/fc_reg give {k} classes, "
                f"{'class-agnostic' if stage_agnostic else 'class-specific'} regression; stage 0 differs"
            )
        num_classes, agnostic = k, stage_agnostic
    mask_heads = 0
    if any(k.startswith("mask_head.") for k in keys):
        mask_stages = key_indices(keys, "mask_head.")
        mprefixes = [f"mask_head.{i}." for i in mask_stages] or ["mask_head."]
        if mask_stages and len(mask_stages) != len(stages):
            raise ConversionError(
                f"{describe_source(source)}{len(mask_stages)} mask heads for {len(stages)} cascade stages"
            )
        for prefix in mprefixes:
            need = [prefix + f"convs.{i}.conv.weight" for i in range(4)] + [
                prefix + "upsample.weight",
                prefix + "conv_logits.weight",
            ]
            absent = [k for k in need if k not in keys]
            if absent:
                raise ConversionError(
                    f"{describe_source(source)}no {absent[0]!r}: only mmdetection's FCNMaskHead with 4 convs, "
                    "deconv upsampling and conv_logits is converted"
                )
            channels = heads[prefix + "conv_logits.weight"].shape[0]
            if channels not in (1, num_classes + background_first):
                raise ConversionError(
                    f"{describe_source(source)}{prefix}conv_logits has {channels} outputs, expected {num_classes + background_first} "
                    f"for the {num_classes} classes of the box head (or 1: class-agnostic masks)"
                )
        mask_heads = len(mprefixes)
    conv_res = sum(f"mask_head.{i}.conv_res.conv.weight" in keys for i in key_indices(keys, "mask_head."))
    semantic = heads["semantic_head.conv_logits.weight"].shape[0] if "semantic_head.conv_logits.weight" in keys else 0
    if (conv_res or semantic) and not (stages and mask_heads):
        raise ConversionError(
            f"{describe_source(source)}Hybrid Task Cascade layers (mask_head.<stage>.conv_res / semantic_head) "
            "without cascade box and mask heads: not a convertible HTC checkpoint"
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


def convert_heads(conv, heads, target, expected, source):
    if not target:
        for k in heads:
            conv.dropped.append((k, "detector head: the target backbone has no HRNetV2p pyramid for it"))
        return
    if is_fcos_head(heads):
        convert_fcos_head(conv, heads, expected, source)
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
                f"{describe_source(source)}{original[k]}: a head tensor with no Detectron2 counterpart (only RPNHead, "
                "Shared2FCBBoxHead, FCNMaskHead / HTCMaskHead and FusedSemanticHead layers convert); refusing to "
                "leave it out silently"
            )


def detector_check(cfg, config_file, source):
    """A callable refusing a :class:`Detector` that the config's model cannot hold."""
    m = cfg.MODEL

    def fail(what, found, expected, key):
        raise ConversionError(
            f"{describe_source(source)}{what} mismatch: found {found} in the checkpoint, expected {expected} from "
            f"{config_file} ({key})"
        )

    fcos = fcos_check(cfg, config_file, source)

    def check(det):
        if isinstance(det, FCOSHeadSpec):
            return fcos(det)
        if m.META_ARCHITECTURE not in ("GeneralizedRCNN", "HybridTaskCascade") or m.PROPOSAL_GENERATOR.NAME not in (
            "RPN",
            "MMDetRPN",
        ):
            fail(
                "detector",
                det.kind,
                f"{m.META_ARCHITECTURE} with {m.PROPOSAL_GENERATOR.NAME}",
                "MODEL.META_ARCHITECTURE / MODEL.PROPOSAL_GENERATOR.NAME: need GeneralizedRCNN (or HybridTaskCascade) "
                "with RPN or MMDetRPN",
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
                "a Hybrid Task Cascade" if m.ROI_HEADS.NAME == HTC_HEADS else "no Hybrid Task Cascade",
                f"MODEL.ROI_HEADS.NAME = {m.ROI_HEADS.NAME!r}" + (f"; HTC needs {HTC_HEADS!r}" if det.htc else ""),
            )
        if det.mask_heads > 1 and m.ROI_HEADS.NAME not in ("MMDetCascadeROIHeads", HTC_HEADS):
            fail(
                "mask head",
                f"{det.mask_heads} mask heads (one per cascade stage, averaged by mmdetection)",
                "one mask head",
                f"MODEL.ROI_HEADS.NAME = {m.ROI_HEADS.NAME!r}; 'MMDetCascadeROIHeads' has one per stage",
            )
        if det.htc and bool(det.semantic_classes) != m.HTC.SEMANTIC_ON:
            fail(
                "semantic head",
                f"{det.kind} {'with' if det.semantic_classes else 'without'} a semantic head",
                f"{'a' if m.HTC.SEMANTIC_ON else 'no'} semantic head",
                f"MODEL.HTC.SEMANTIC_ON = {m.HTC.SEMANTIC_ON}",
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


def check_heads_against_model(conv, cfg, config_file, source):
    """Every converted head tensor has its place, with its shape, in the config's model; no head tensor is left out."""
    from detectron2.modeling import META_ARCH_REGISTRY

    with torch.device("meta"):
        model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    heads = ("proposal_generator.", "roi_heads.", "head.")  # head.: FCOSDetector
    for k, v in conv.state_dict.items():
        if not k.startswith(heads):
            continue
        if k not in expected:
            raise ConversionError(f"{describe_source(source)}{k}: the model of {config_file} has no such tensor")
        if tuple(v.shape) != expected[k]:
            raise ConversionError(
                f"{describe_source(source)}{k}: found shape {tuple(v.shape)} in the checkpoint, expected {expected[k]} "
                f"from {config_file}"
            )
    absent = [k for k in expected if k.startswith(heads) and k not in conv.state_dict]
    if absent:
        raise ConversionError(
            f"{describe_source(source)}the heads lack {len(absent)} tensors of the model of {config_file}, e.g. {absent[:3]}"
        )
