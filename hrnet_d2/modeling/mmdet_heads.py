"""Detectron2's RPN and ROI heads with mmdetection's test-time conventions, for converted models.

Registered as ``MMDetRPN`` (PROPOSAL_GENERATOR_REGISTRY), ``MMDetROIHeads`` and
``MMDetCascadeROIHeads`` (ROI_HEADS_REGISTRY).  They are Detectron2's ``RPN``,
``StandardROIHeads`` and ``CascadeROIHeads`` (same layers, losses, training) except where
mmdetection 2.x/3.x computes something else:

* box decoding (all three): mmdetection's ``DeltaXYWHBBoxCoder`` clamps the log-scale deltas
  dw, dh to [-log(1000/16), log(1000/16)]; Detectron2's ``Box2BoxTransform`` only from above.
  They differ only for boxes shrunk below 1.6% of their anchor / proposal in one step.

``MMDetCascadeROIHeads`` also has mmdetection's ``CascadeRoIHead`` test-time stage ensemble
(``_refine_roi`` / ``predict_mask``):

* the stages' class scores are averaged as logits, then soft-maxed (Detectron2 averages the
  stages' probabilities);
* with ``MODEL.MASK_ON`` there is one mask head per stage, all applied to the final boxes, and
  their sigmoid probabilities are averaged (Detectron2 has one mask head).  These per-stage
  mask heads are inference-only (converted checkpoints); train Cascade Mask R-CNN with
  Detectron2's ``CascadeROIHeads``.
"""

from typing import List

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import ShapeSpec, cat
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.proposal_generator import PROPOSAL_GENERATOR_REGISTRY, RPN
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, CascadeROIHeads, StandardROIHeads, build_mask_head
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
from detectron2.structures import Instances

__all__ = ["MMDetBox2BoxTransform", "MMDetRPN", "MMDetROIHeads", "MMDetCascadeROIHeads", "StageMaskHeads"]


class MMDetBox2BoxTransform(Box2BoxTransform):
    """``Box2BoxTransform`` whose dw, dh are clamped from below too, as mmdetection's ``DeltaXYWHBBoxCoder``."""

    @classmethod
    def like(cls, transform: Box2BoxTransform):
        return cls(transform.weights, transform.scale_clamp)

    def apply_deltas(self, deltas, boxes):
        deltas = deltas.clone()
        for i in (2, 3):  # dw, dh (Detectron2 divides them by the weight, then clamps at scale_clamp)
            deltas[:, i::4] = deltas[:, i::4].clamp(min=-self.scale_clamp * self.weights[i])
        return super().apply_deltas(deltas, boxes)


@PROPOSAL_GENERATOR_REGISTRY.register()
class MMDetRPN(RPN):
    """Detectron2's ``RPN`` with :class:`MMDetBox2BoxTransform`."""

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["box2box_transform"] = MMDetBox2BoxTransform.like(ret["box2box_transform"])
        return ret


@ROI_HEADS_REGISTRY.register()
class MMDetROIHeads(StandardROIHeads):
    """Detectron2's ``StandardROIHeads`` with :class:`MMDetBox2BoxTransform`."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        predictor = ret["box_predictor"]
        predictor.box2box_transform = MMDetBox2BoxTransform.like(predictor.box2box_transform)
        return ret


class StageMaskHeads(nn.Module):
    """One mask head per cascade stage; at inference their probabilities are averaged."""

    def __init__(self, heads):
        """
        Args:
            heads (list[nn.Module]): Detectron2 mask heads (``BaseMaskRCNNHead``), one per stage.
        """
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor, instances: List[Instances]):
        if self.training:
            raise NotImplementedError(
                "MODEL.ROI_HEADS.NAME = 'MMDetCascadeROIHeads' with MODEL.MASK_ON: the per-stage mask heads "
                "are inference-only (converted mmdetection checkpoints); train with 'CascadeROIHeads'"
            )
        probs = torch.stack([head.layers(x) for head in self.heads]).sigmoid().mean(dim=0)
        if probs.shape[1] == 1:  # class-agnostic masks
            probs = probs[:, 0:1]
        else:
            classes = cat([i.pred_classes for i in instances])
            probs = probs[torch.arange(probs.shape[0], device=probs.device), classes][:, None]
        for prob, inst in zip(probs.split([len(i) for i in instances]), instances):
            inst.pred_masks = prob  # (N, 1, M, M) probabilities, as mask_rcnn_inference leaves them
        return instances


@ROI_HEADS_REGISTRY.register()
class MMDetCascadeROIHeads(CascadeROIHeads):
    """Detectron2's ``CascadeROIHeads`` with :class:`MMDetBox2BoxTransform` and mmdetection's
    test-time stage ensemble (see the module doc)."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        for predictor in ret["box_predictors"]:
            predictor.box2box_transform = MMDetBox2BoxTransform.like(predictor.box2box_transform)
        return ret

    @classmethod
    def _init_mask_head(cls, cfg, input_shape):
        ret = super()._init_mask_head(cfg, input_shape)
        if not cfg.MODEL.MASK_ON:
            return ret
        resolution = cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION
        channels = input_shape[ret["mask_in_features"][0]].channels
        shape = ShapeSpec(channels=channels, width=resolution, height=resolution)
        stages = len(cfg.MODEL.ROI_BOX_CASCADE_HEAD.IOUS)
        ret["mask_head"] = StageMaskHeads([ret["mask_head"]] + [build_mask_head(cfg, shape) for _ in range(stages - 1)])
        return ret

    def _forward_box(self, features, proposals, targets=None):
        if self.training:
            return super()._forward_box(features, proposals, targets)
        features = [features[f] for f in self.box_in_features]
        image_sizes = [x.image_size for x in proposals]
        logits, boxes = [], None
        for k in range(self.num_cascade_stages):
            if k > 0:
                proposals = self._create_proposals_from_boxes(boxes, image_sizes)
            predictions = self._run_stage(features, proposals, k)
            boxes = self.box_predictor[k].predict_boxes(predictions, proposals)
            logits.append(predictions[0])
        # mmdetection: mean of the stages' logits, then softmax (Detectron2: mean of probabilities)
        scores = F.softmax(sum(logits) / float(len(logits)), dim=-1)
        scores = scores.split([len(p) for p in proposals])
        predictor = self.box_predictor[-1]
        instances, _ = fast_rcnn_inference(
            boxes,
            scores,
            image_sizes,
            predictor.test_score_thresh,
            predictor.test_nms_thresh,
            predictor.test_topk_per_image,
        )
        return instances
