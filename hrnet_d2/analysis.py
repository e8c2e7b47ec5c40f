"""Parameters and FLOPs (fvcore) of any hrnet_d2 config at a given input size
(``tools/analyze_model.py`` prints them, ``tools/model_zoo.py`` tabulates them).

Detectron2's ``tools/analyze_model.py`` counts FLOPs by running the whole model on
dataset images, so the ROI-head share depends on how many boxes the (random) model
proposes.  Here every part is counted on fixed shapes, which makes the number a
property of the config alone:

* backbone (HRNet body + pyramid) on one image of the given size, padded to
  ``size_divisibility`` as Detectron2 does (800x1333 -> 800x1344);
* RPN / RetinaNet / semantic heads on the resulting feature maps;
* box head + predictor (every cascade stage) on ``MODEL.RPN.POST_NMS_TOPK_TEST`` proposals;
* mask / keypoint head on ``TEST.DETECTIONS_PER_IMAGE`` detections.

fvcore counts one fused multiply-add as one FLOP; G = 1e9.  Parameters are
``model.parameters()`` (FrozenBN statistics and affine terms are buffers, not counted);
``norms=False`` also leaves out the weight/bias of trainable norms (BN, BNEval), as the
published HRNet #Params do.
"""

import math
from collections import OrderedDict

import torch
from torch import nn

from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from fvcore.nn import FlopCountAnalysis

from .config import get_hrnet_cfg
from .config.validate import validate_config

__all__ = ["load_model", "count_parameters", "parameter_groups", "norm_affine", "count_flops"]


def load_model(config_file, opts=(), device="cpu"):
    """cfg and model (random weights, eval mode) of a config; ``device="meta"`` builds
    without allocating weights, enough for parameter counting."""
    cfg = get_hrnet_cfg(config_file, list(opts) + ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    validate_config(cfg)  # a mistake in the config: one line naming the key
    cfg.MODEL.DEVICE = device
    if device == "meta":
        with torch.device("meta"):
            model = build_model(cfg)
    else:
        model = build_model(cfg)
    for m in model.modules():  # count the reference graph, not an inference-only fused fast path
        if hasattr(m, "inference_fuse"):
            m.inference_fuse = False
        if hasattr(m, "training_fuse"):
            m.training_fuse = False
    return cfg, model.eval()


_NORMS = (FrozenBatchNorm2d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def _params(module, norms=True):
    if norms:
        return sum(p.numel() for p in module.parameters())
    skip = {id(p) for m in module.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)}
    return sum(p.numel() for p in module.parameters() if id(p) not in skip)


def count_parameters(model, norms=True) -> int:
    """Elements of ``model.parameters()``; ``norms=False`` leaves out those of norm layers."""
    return _params(model, norms)


def parameter_groups(model, norms=True) -> "OrderedDict[str, int]":
    """Parameters per part: body, pyramid/FPN, then each head module (``norms`` as in
    :func:`count_parameters`)."""
    groups = OrderedDict()
    for name, child in model.named_children():
        if name == "backbone" and hasattr(child, "bottom_up"):
            groups["backbone.bottom_up"] = _params(child.bottom_up, norms)
            for sub, m in child.named_children():
                if sub != "bottom_up" and _params(m, norms):
                    groups[f"backbone.{sub}"] = _params(m, norms)
        elif name in ("roi_heads", "proposal_generator"):
            for sub, m in child.named_children():
                if _params(m, norms):
                    groups[f"{name}.{sub}"] = _params(m, norms)
        elif _params(child, norms):
            groups[name] = _params(child, norms)
    assert sum(groups.values()) == count_parameters(model, norms)
    return groups


def norm_affine(model) -> int:
    """Elements of the weight + bias of every norm layer: trainable parameters with BN /
    BNEval, buffers (so never in ``count_parameters``) with FrozenBN."""
    return sum(
        m.weight.numel() + m.bias.numel()
        for m in model.modules()
        if isinstance(m, _NORMS) and m.weight is not None and m.bias is not None
    )


_FLOP_CACHE = {}


def _fvcore(module, inputs, hook_module=None):
    """fvcore FLOPs of ``module(*inputs)``, memoised on the module structure and the
    input shapes (the zoo reuses heads and bodies across configs); also returns the
    output of ``hook_module`` (shapes are all that is needed of it)."""
    key = (repr(module), tuple(tuple(t.shape) for t in _flatten(inputs)))
    if key in _FLOP_CACHE and hook_module is None:
        return _FLOP_CACHE[key], None
    captured = {}
    handle = None
    if hook_module is not None:
        handle = hook_module.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    try:
        with torch.no_grad():
            analysis = FlopCountAnalysis(module, inputs)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            total = analysis.total()
    finally:
        if handle is not None:
            handle.remove()
    _FLOP_CACHE[key] = total
    return total, captured.get("out")


def _flatten(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for e in x for t in _flatten(e)]
    if isinstance(x, dict):
        return [t for e in x.values() for t in _flatten(e)]
    return []


def _zeros_like_shapes(features):
    return {k: torch.zeros(v.shape) for k, v in features.items()}


def count_flops(cfg, model, height=800, width=1333) -> "OrderedDict[str, float]":
    """FLOPs per part on fixed shapes (see the module docstring)."""
    d = max(getattr(model.backbone, "size_divisibility", 0), 1)
    padded = (math.ceil(height / d) * d, math.ceil(width / d) * d)
    image = torch.zeros(1, 3, *padded)
    parts = OrderedDict()
    key = (repr(model.backbone), (tuple(image.shape),))
    if key in _FEATURE_SHAPES:
        parts["backbone"], features = _FLOP_CACHE[key], _zeros_like_shapes(_FEATURE_SHAPES[key])
    else:
        parts["backbone"], out = _fvcore(model.backbone, (image,), hook_module=model.backbone)
        _FEATURE_SHAPES[key] = {k: v for k, v in out.items()}
        features = _zeros_like_shapes(out)

    rpn = getattr(model, "proposal_generator", None)
    if rpn is not None and hasattr(rpn, "rpn_head"):
        parts["proposal_generator.rpn_head"], _ = _fvcore(rpn.rpn_head, ([features[f] for f in rpn.in_features],))
    if hasattr(model, "head") and hasattr(model, "head_in_features"):  # RetinaNet
        parts["head"], _ = _fvcore(model.head, ([features[f] for f in model.head_in_features],))
    sem = getattr(model, "sem_seg_head", None)
    if sem is not None:
        parts["sem_seg_head"], _ = _fvcore(_SemSegLayers(sem), (features,))

    roi = getattr(model, "roi_heads", None)
    if roi is not None:
        n = cfg.MODEL.RPN.POST_NMS_TOPK_TEST
        dets = cfg.TEST.DETECTIONS_PER_IMAGE
        channels = features[roi.in_features[0]].shape[1]
        box_heads = roi.box_head if isinstance(roi.box_head, nn.ModuleList) else [roi.box_head]
        predictors = roi.box_predictor if isinstance(roi.box_predictor, nn.ModuleList) else [roi.box_predictor]
        r = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
        for i, (head, pred) in enumerate(zip(box_heads, predictors)):
            suffix = f".{i}" if len(box_heads) > 1 else ""
            parts[f"roi_heads.box_head{suffix}"], _ = _fvcore(head, (torch.zeros(n, channels, r, r),))
            parts[f"roi_heads.box_predictor{suffix}"], _ = _fvcore(pred, (torch.zeros(n, head.output_shape.channels),))
        if getattr(roi, "mask_on", False):
            r = cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION
            parts["roi_heads.mask_head"], _ = _fvcore(_Layers(roi.mask_head), (torch.zeros(dets, channels, r, r),))
        if getattr(roi, "keypoint_on", False):
            r = cfg.MODEL.ROI_KEYPOINT_HEAD.POOLER_RESOLUTION
            parts["roi_heads.keypoint_head"], _ = _fvcore(
                _Layers(roi.keypoint_head), (torch.zeros(dets, channels, r, r),)
            )
    return parts


_FEATURE_SHAPES = {}


class _Layers(nn.Module):
    """The tensor-in tensor-out part of a Detectron2 mask/keypoint head."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x):
        return self.head.layers(x)

    def __repr__(self):
        return f"_Layers({self.head!r})"


class _SemSegLayers(_Layers):
    def forward(self, features):
        return self.head.layers(features)
