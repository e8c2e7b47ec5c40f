"""HRNetV2p that also returns the HRNet body's outputs (hr2..hr5, hrv2).

Panoptic FPN shares one backbone between the R-CNN heads (p2..p6) and the semantic
head; with this backbone the semantic head can read the HRNetV2 representation
(``hrv2``: all branches at stride 4, concatenated) while the detector keeps reading
the pyramid.  Module names are HRNetV2p's, so its checkpoints load unchanged.
"""

import torch

from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY

from .build import build_hrnetv2p_backbone
from .hrnet import upsample_to
from .pyramid import HRNetV2p

__all__ = ["HRNetV2pWithBody", "build_hrnetv2p_with_body_backbone"]


class HRNetV2pWithBody(HRNetV2p):
    """Outputs p2..p{k} plus every body output (MODEL.HRNET.OUT_FEATURES)."""

    def forward(self, x):
        features = self.bottom_up(x)
        # same computation as HRNetV2p.forward, on the body outputs computed once
        xs = [features[f] for f in self.in_features]
        finest = max(xs, key=lambda t: t.shape[-2] * t.shape[-1])
        out = self.reduction_conv(torch.cat([upsample_to(t, finest, self.upsample_mode) for t in xs], 1))
        results = dict(features)
        for i, name in enumerate(self._out_features):
            level = out if i == 0 else self.pool(out, kernel_size=2**i, stride=2**i)
            results[name] = self.fpn_convs[0 if self.share_conv else i](level)
        return results

    def output_shape(self):
        shapes = dict(self.bottom_up.output_shape())
        shapes.update(
            {
                name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
                for name in self._out_features
            }
        )
        return shapes


@BACKBONE_REGISTRY.register()
def build_hrnetv2p_with_body_backbone(cfg, input_shape: ShapeSpec):
    """``build_hrnetv2p_backbone`` (same keys, same checks) whose outputs include the body's."""
    pyramid = build_hrnetv2p_backbone(cfg, input_shape)
    pyramid.__class__ = HRNetV2pWithBody  # same modules and attributes; only forward/output_shape differ
    return pyramid
