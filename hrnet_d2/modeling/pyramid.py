"""HRNetV2p: the HRNet feature pyramid used by detectors (HRFPN in mmdetection).

All body branches are upsampled to the finest one and concatenated (HRNetV2), a 1x1
conv reduces the concatenation, pooling makes one level per stride, and a 3x3 conv
per level (optionally shared) produces p2..p{k} — the same names and strides as
Detectron2's FPN, so stock RPN / ROI heads / RetinaNet configs consume it unchanged.

Module names ``reduction_conv`` / ``fpn_convs`` mirror mmdetection's HRFPN so its
detection checkpoints map by a plain rename.
"""

import math
from typing import Dict, List

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from detectron2.layers import Conv2d
from detectron2.modeling.backbone import Backbone

from ..utils.errors import ConfigValueError, check_feature_names
from .layers import checkpointing, get_norm, recompute_context, upsample_to

__all__ = ["HRNetV2p", "POOLING_TYPES", "AUTOCAST_DTYPES"]

POOLING_TYPES = ("AVG", "MAX")
# MODEL.HRNET.INFERENCE_AUTOCAST values ("" = fp32)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class HRNetV2p(Backbone):
    """HRNetV2p: the body's branches upsampled to the finest and concatenated, reduced by a
    1x1 conv, pooled into one level per stride, each level through a 3x3 conv (p2, p3, ...)."""

    def __init__(
        self,
        bottom_up: Backbone,
        in_features,
        out_channels=256,
        num_levels=5,
        pooling="AVG",
        share_conv=False,
        norm="",
        upsample_mode="bilinear",
        keep_body_outputs=False,
        activation_checkpoint=False,
        inference_autocast="",
    ):
        """
        Args:
            bottom_up (Backbone): the HRNet body (or any backbone with strided outputs).
            in_features (list[str]): body outputs to concatenate (MODEL.HRNET_PYRAMID.IN_FEATURES);
                all are resized to the finest of them, whose stride becomes the first level's.
            out_channels (int): channels of the reduction conv and of every level.
            num_levels (int): levels p{k}..: the finest stride, then each pooled 2x further.
            pooling (str): "AVG" or "MAX", the pooling that makes the coarser levels.
            share_conv (bool): one 3x3 conv shared by all levels instead of one per level.
            norm (str): a ``layers.get_norm`` name (Detectron2's names and BNEval) for the pyramid's convs; "" for none
                (then the convs have a bias).
            upsample_mode (str): "nearest" or "bilinear", how inputs are resized to the finest.
            keep_body_outputs (bool): also return the body's outputs (e.g. ``hrv2`` for the
                semantic head of Panoptic FPN), computed once and shared with the pyramid.
            activation_checkpoint (bool): in training, recompute the upsample + concat +
                reduction in backward instead of keeping the stride-4 concatenation (sum of
                all branch widths, the largest activation of the detector).
            inference_autocast (str): MODEL.HRNET.INFERENCE_AUTOCAST: "bf16" or "fp16" runs body
                and pyramid under ``torch.autocast`` in eval mode (the outputs are cast back to
                fp32, so the heads run in fp32); "" keeps fp32.  Training is never affected.
        """
        super().__init__()
        shapes = bottom_up.output_shape()
        check_feature_names(
            "MODEL.HRNET_PYRAMID.IN_FEATURES", in_features, shapes, "the HRNet body (MODEL.HRNET.OUT_FEATURES)"
        )
        if pooling not in POOLING_TYPES:
            raise ConfigValueError("MODEL.HRNET_PYRAMID.POOLING", pooling, f"allowed: {list(POOLING_TYPES)}")
        self.bottom_up = bottom_up
        self.in_features = list(in_features)
        self.upsample_mode = upsample_mode
        self.pooling = pooling
        base_stride = min(shapes[f].stride for f in self.in_features)
        # every input is resized to the finest one (the first at the smallest stride)
        self._finest = [shapes[f].stride for f in self.in_features].index(base_stride)
        in_channels = sum(shapes[f].channels for f in self.in_features)
        use_bias = norm == ""
        self.reduction_conv = Conv2d(in_channels, out_channels, 1, bias=use_bias, norm=get_norm(norm, out_channels))

        def level_conv():
            return Conv2d(out_channels, out_channels, 3, padding=1, bias=use_bias, norm=get_norm(norm, out_channels))

        self.share_conv = share_conv
        self.fpn_convs = nn.ModuleList([level_conv() for _ in range(1 if share_conv else num_levels)])
        # mmdetection's HRFPN init, for the pyramid's own convs only (not the body below it)
        for m in [*self.reduction_conv.modules(), *self.fpn_convs.modules()]:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

        first = int(math.log2(base_stride))
        self.levels = [f"p{first + i}" for i in range(num_levels)]
        self._out_features = list(self.levels)
        self._out_feature_strides = {f: base_stride * 2**i for i, f in enumerate(self._out_features)}
        self._out_feature_channels = {f: out_channels for f in self._out_features}
        self.keep_body_outputs = keep_body_outputs
        if keep_body_outputs:
            self._out_features = list(shapes) + self._out_features
            self._out_feature_strides.update({k: v.stride for k, v in shapes.items()})
            self._out_feature_channels.update({k: v.channels for k, v in shapes.items()})
        self._size_divisibility = bottom_up.size_divisibility
        self.activation_checkpoint = activation_checkpoint
        if inference_autocast and inference_autocast not in AUTOCAST_DTYPES:
            raise ConfigValueError(
                "MODEL.HRNET.INFERENCE_AUTOCAST", inference_autocast, f"allowed: {['', *AUTOCAST_DTYPES]}"
            )
        self.inference_autocast = inference_autocast

    @property
    def size_divisibility(self):
        return self._size_divisibility

    def _pool(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Non-overlapping k x k pooling, floor mode as the reference (and exactly exportable:
        ONNX Runtime averages ceil-mode border windows differently).  A map smaller than the
        window (input smaller than the level's stride) gets one ceil-mode cell instead of an error."""
        ceil_mode = False
        if x.shape[-2] < k or x.shape[-1] < k:  # a plain bool also while tracing
            ceil_mode = True
        if self.pooling == "MAX":
            return F.max_pool2d(x, kernel_size=k, stride=k, ceil_mode=ceil_mode)
        return F.avg_pool2d(x, kernel_size=k, stride=k, ceil_mode=ceil_mode)

    def _reduce(self, xs: List[torch.Tensor]) -> torch.Tensor:
        """HRNetV2 (all inputs at the finest resolution, concatenated), reduced by the 1x1 conv."""
        finest = xs[self._finest]
        return self.reduction_conv(torch.cat([upsample_to(t, finest, self.upsample_mode) for t in xs], 1))

    @torch.jit.unused
    def _reduce_eager(self, xs: List[torch.Tensor]) -> torch.Tensor:
        """``_reduce``, recomputed in backward under MODEL.HRNET.ACTIVATION_CHECKPOINT."""
        if checkpointing(self):
            return checkpoint(self._reduce, xs, use_reentrant=False, context_fn=recompute_context(self.reduction_conv))
        return self._reduce(xs)

    @torch.jit.unused
    def _forward_autocast(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        with torch.autocast(x.device.type, dtype=AUTOCAST_DTYPES[self.inference_autocast]):
            out = self._forward(x)
        return {k: v.float() for k, v in out.items()}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if not torch.jit.is_scripting() and self.inference_autocast != "" and not self.training:
            return self._forward_autocast(x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.bottom_up(x)
        xs = [features[f] for f in self.in_features]
        if torch.jit.is_scripting():
            out = self._reduce(xs)
        else:
            out = self._reduce_eager(xs)
        levels: List[torch.Tensor] = [out]
        for i in range(1, len(self.levels)):
            levels.append(self._pool(out, 1 << i))
        results: Dict[str, torch.Tensor] = {}
        if self.keep_body_outputs:
            for name, feature in features.items():
                results[name] = feature
        if self.share_conv:
            conv = self.fpn_convs[0]
            for name, level in zip(self.levels, levels):
                results[name] = conv(level)
        else:
            for i, conv in enumerate(self.fpn_convs):
                results[self.levels[i]] = conv(levels[i])
        return results
