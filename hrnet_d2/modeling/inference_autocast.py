"""MODEL.HRNET.INFERENCE_AUTOCAST for the heads: the R-CNN heads' heavy layers in the low dtype.

The backbone (:class:`~hrnet_d2.pyramid.HRNetV2p`) runs itself under autocast and hands fp32
features on.  :func:`autocast_heads` does the same for the convolutions and fully-connected
layers of the heads, and only for them:

* the RPN head's 3x3 conv (``rpn_head.conv``; its 1x1 objectness / anchor-delta convs stay fp32);
* the box head's FC layers (``roi_heads.box_head``, every cascade stage; the box predictor,
  whose outputs are the class logits and the box deltas, stays fp32);
* the mask head's convs and deconv (every child of ``roi_heads.mask_head`` but its 1x1
  ``predictor``, which stays fp32).

Every wrapped module gets fp32 in and gives fp32 out (its outputs are cast back), so anchors,
box deltas, decoding, clipping, ROIAlign, NMS and mask pasting stay fp32: bf16 has 8
significant bits, a box coordinate near 1000 px would move in steps of 4-8 px.  Only eval
mode is affected; training and scripting run the plain modules.

The switch is applied by ``hrnet_d2.engine.Trainer.build_model`` (``train_net.py
--eval-only``), ``demo.py`` and the tools; a model built by a bare Detectron2 ``build_model``
(e.g. inside ``DefaultPredictor``) gets the backbone part only: call
``autocast_heads(model, cfg.MODEL.HRNET.INFERENCE_AUTOCAST)`` on it.
"""

import torch
from torch import nn

from detectron2.structures import Instances

from .pyramid import AUTOCAST_DTYPES

__all__ = ["autocast_heads", "head_modules", "set_inference_autocast", "to_fp32"]


def to_fp32(obj):
    """``obj`` with every floating tensor (also inside lists, tuples, dicts and Instances) as fp32."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() and obj.dtype != torch.float32 else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_fp32(v) for v in obj)
    if isinstance(obj, dict):
        return {k: to_fp32(v) for k, v in obj.items()}
    if isinstance(obj, Instances):
        for k, v in obj.get_fields().items():
            if isinstance(v, torch.Tensor):
                obj.set(k, to_fp32(v))
        return obj
    return obj


class _AutocastHook:
    """Forward pre-hook + forward hook (``always_call``) that run a module under autocast in
    eval mode and cast its outputs to fp32; the hooks are the only state, the module is unchanged."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.contexts = []

    def enter(self, module, args):
        if module.training or torch.jit.is_scripting() or torch.jit.is_tracing():
            self.contexts.append(None)
            return
        device = next(module.parameters()).device.type
        ctx = torch.autocast(device, dtype=self.dtype)
        ctx.__enter__()
        self.contexts.append(ctx)

    def exit(self, module, args, output):
        ctx = self.contexts.pop() if self.contexts else None
        if ctx is None:
            return None
        ctx.__exit__(None, None, None)
        return to_fp32(output)


def _each(module):
    return list(module) if isinstance(module, nn.ModuleList) else [module]


def head_modules(model):
    """{name: module}: the head layers :func:`autocast_heads` runs in the low dtype (see the module docstring)."""
    found = {}
    rpn_head = getattr(getattr(model, "proposal_generator", None), "rpn_head", None)
    if isinstance(getattr(rpn_head, "conv", None), nn.Module):
        found["proposal_generator.rpn_head.conv"] = rpn_head.conv
    roi_heads = getattr(model, "roi_heads", None)
    if isinstance(getattr(roi_heads, "box_head", None), nn.Module):
        for i, head in enumerate(_each(roi_heads.box_head)):
            found[f"roi_heads.box_head.{i}"] = head
    if isinstance(getattr(roi_heads, "mask_head", None), nn.Module):
        for i, head in enumerate(_each(roi_heads.mask_head)):
            for heads in _each(getattr(head, "heads", head)):  # StageMaskHeads holds one mask head per stage
                for name, child in heads.named_children():
                    if name != "predictor" and any(True for _ in child.parameters()):
                        found[f"roi_heads.mask_head.{i}.{name}"] = child
    return found


def autocast_heads(model, dtype):
    """Run the heads' conv / FC layers of ``model`` (a GeneralizedRCNN, plain or cascade) under
    autocast ``dtype`` ("bf16" / "fp16") in eval mode, fp32 in and out; "" turns it off again.
    Returns the wrapped modules' names.  Applying it again replaces the earlier dtype."""
    if dtype and dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast dtype {dtype!r}: allowed {list(AUTOCAST_DTYPES)}")
    names = []
    for name, module in head_modules(model).items():
        for handle in module.__dict__.pop("_hrnet_autocast_handles", ()):  # applied before: replaced
            handle.remove()
        if not dtype:
            continue
        hook = _AutocastHook(AUTOCAST_DTYPES[dtype])
        module._hrnet_autocast_handles = (
            module.register_forward_pre_hook(hook.enter),
            module.register_forward_hook(hook.exit, always_call=True),
        )
        names.append(name)
    return names


def set_inference_autocast(model, dtype):
    """``MODEL.HRNET.INFERENCE_AUTOCAST`` on a built model ("" = fp32): the HRNetV2p backbone's switch
    (where the backbone has one) and the heads' hooks (:func:`autocast_heads`)."""
    if hasattr(model.backbone, "inference_autocast"):
        model.backbone.inference_autocast = dtype
    return autocast_heads(model, dtype)
