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
  their sigmoid probabilities are averaged (Detectron2 has one mask head).

and mmdetection's ``CascadeRoIHead`` training of them (``loss``): each stage's mask head is trained
on that stage's positives (the proposals its own IoU threshold labels foreground), and each
stage's box and mask losses are weighted by ``MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS``
(mmdetection's ``stage_loss_weights``, [1, 0.5, 0.25] in its HRNet configs).  What stays
Detectron2's: stages after the first are not re-sampled (mmdetection samples 512 RoIs per image
at every stage; Detectron2 keeps the first stage's sample and relabels it), and the box-head
gradient is scaled by 1 / number of stages (``CascadeROIHeads._run_stage``).
"""

from typing import List

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.proposal_generator import PROPOSAL_GENERATOR_REGISTRY, RPN
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, CascadeROIHeads, StandardROIHeads, build_mask_head
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
from detectron2.modeling.roi_heads.roi_heads import select_foreground_proposals
from detectron2.structures import Instances, pairwise_iou
from detectron2.utils.events import get_event_storage

__all__ = [
    "MMDetBox2BoxTransform",
    "MMDetRPN",
    "MMDetROIHeads",
    "MMDetCascadeROIHeads",
    "StageMaskHeads",
    "set_mask_probabilities",
]


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


def set_mask_probabilities(probs: torch.Tensor, instances: List[Instances]) -> List[Instances]:
    """Give each detection its class's channel of ``probs`` (N, C or 1, M, M) as ``pred_masks``
    (N, 1, M, M), as Detectron2's ``mask_rcnn_inference`` leaves them; 1 channel: class-agnostic."""
    if probs.shape[1] == 1:
        probs = probs[:, 0:1]
    else:
        classes = cat([i.pred_classes for i in instances])
        probs = probs[torch.arange(probs.shape[0], device=probs.device), classes][:, None]
    for prob, inst in zip(probs.split([len(i) for i in instances]), instances):
        inst.pred_masks = prob
    return instances


class StageMaskHeads(nn.Module):
    """One mask head per cascade stage; at inference their probabilities are averaged.  Trained by
    :class:`MMDetCascadeROIHeads`, each head on its stage's positives."""

    def __init__(self, heads):
        """
        Args:
            heads (list[nn.Module]): Detectron2 mask heads (``BaseMaskRCNNHead``), one per stage.
        """
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor, instances: List[Instances]):
        if self.training:
            raise RuntimeError("StageMaskHeads are trained stage by stage by MMDetCascadeROIHeads.forward")
        probs = torch.stack([head.layers(x) for head in self.heads]).sigmoid().mean(dim=0)
        return set_mask_probabilities(probs, instances)


@ROI_HEADS_REGISTRY.register()
class MMDetCascadeROIHeads(CascadeROIHeads):
    """Detectron2's ``CascadeROIHeads`` with :class:`MMDetBox2BoxTransform`, mmdetection's
    test-time stage ensemble and its per-stage mask heads and stage loss weights (see the module doc)."""

    @configurable
    def __init__(self, *, stage_loss_weights=None, **kwargs):
        """
        Args:
            stage_loss_weights (list[float] or None): the weight of each stage's losses (box and mask);
                None: 1 for every stage (Detectron2's ``CascadeROIHeads``).
            kwargs: as ``CascadeROIHeads``.
        """
        super().__init__(**kwargs)
        weights = tuple(stage_loss_weights) if stage_loss_weights else (1.0,) * self.num_cascade_stages
        if len(weights) != self.num_cascade_stages:
            raise ValueError(
                f"stage_loss_weights {list(weights)}: one weight per cascade stage ({self.num_cascade_stages}) expected"
            )
        self.stage_loss_weights = weights

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["stage_loss_weights"] = list(cfg.MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS) or None
        return ret

    def forward(self, images, features, proposals, targets=None):
        if not self.training:
            return super().forward(images, features, proposals, targets)
        del images
        proposals = self.label_and_sample_proposals(proposals, targets)
        losses, stages = self._box_losses(features, proposals, targets)
        if self.mask_on:
            losses.update(self._stage_mask_losses(features, stages))
        losses.update(self._forward_keypoint(features, proposals))
        return proposals, losses

    def _box_losses(self, features, proposals, targets):
        """``CascadeROIHeads._forward_box`` in training, with the stage loss weights; also returns
        each stage's labelled proposals."""
        box_features = [features[f] for f in self.box_in_features]
        image_sizes = [x.image_size for x in proposals]
        losses, stages, boxes = {}, [], None
        storage = get_event_storage()
        for k in range(self.num_cascade_stages):
            if k > 0:
                proposals = self._create_proposals_from_boxes(boxes, image_sizes)
                proposals = self._match_and_label_boxes(proposals, k, targets)
            predictions = self._run_stage(box_features, proposals, k)
            boxes = self.box_predictor[k].predict_boxes(predictions, proposals)
            with storage.name_scope(f"stage{k}"):
                stage_losses = self.box_predictor[k].losses(predictions, proposals)
            w = self.stage_loss_weights[k]
            losses.update({f"{name}_stage{k}": v * w for name, v in stage_losses.items()})
            stages.append(proposals)
        return losses, stages

    def _match_and_label_boxes(self, proposals, stage, targets):
        """Detectron2's labelling of a later stage's proposals, plus the matched ``gt_masks``
        (its mask head is trained on them)."""
        proposals = super()._match_and_label_boxes(proposals, stage, targets)
        if self.mask_on:
            for p, t in zip(proposals, targets):
                if len(t) and t.has("gt_masks"):
                    matched, _ = self.proposal_matchers[stage](pairwise_iou(t.gt_boxes, p.proposal_boxes))
                    p.gt_masks = t.gt_masks[matched]
        return proposals

    def _stage_mask_losses(self, features, stages):
        """Each stage's mask head on that stage's positives, weighted as the stage."""
        losses = {}
        mask_features = [features[f] for f in self.mask_in_features]
        for k, (head, proposals) in enumerate(zip(self.mask_head.heads, stages)):
            fg, _ = select_foreground_proposals(proposals, self.num_classes)
            x = self.mask_pooler(mask_features, [p.proposal_boxes for p in fg])
            losses[f"loss_mask_stage{k}"] = head(x, fg)["loss_mask"] * self.stage_loss_weights[k]
        return losses

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
        return self._cascade_inference([features[f] for f in self.box_in_features], proposals, self._run_stage)

    def _cascade_inference(self, features, proposals, run_stage):
        """mmdetection's ``CascadeRoIHead._refine_roi`` + ``predict_bbox``: every stage on the previous
        stage's boxes, ``run_stage(features, proposals, k)`` giving stage k's (logits, deltas)."""
        image_sizes = [x.image_size for x in proposals]
        logits, boxes = [], None
        for k in range(self.num_cascade_stages):
            if k > 0:
                proposals = self._create_proposals_from_boxes(boxes, image_sizes)
            predictions = run_stage(features, proposals, k)
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
