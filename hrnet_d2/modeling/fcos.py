"""Detectron2's FCOS built from YAML (``MODEL.META_ARCHITECTURE: "FCOSDetector"``, ``MODEL.FCOS.*``), with
mmdetection's conventions as config switches, for HRNetV2p (or any backbone).

Detectron2 ships FCOS (``detectron2/modeling/meta_arch/fcos.py``) for LazyConfig only.  ``FCOSDetector`` is that
class (same matching, losses, training) made ``@configurable`` and registered in ``META_ARCH_REGISTRY``;
``FCOSDetectorHead`` is its ``FCOSHead`` (same module names: ``cls_subnet``, ``bbox_subnet``, ``cls_score``,
``bbox_pred``, ``ctrness``) with what mmdetection's ``FCOSHead`` computes differently, each a switch
(``add_fcos_config`` documents the keys; the defaults are Detectron2's):

* ``CONV_BIAS``: bias in the towers' convs (mmdetection: none under GN);
* ``CENTERNESS_ON_REG``: centerness from the regression tower (Detectron2) or the classification tower
  (mmdetection's default, its HRNet FCOS);
* ``LEVEL_SCALES`` + ``REG_ACTIVATION``: a learnable scalar per level (``scales``) and ``exp`` regression in
  pixels (mmdetection ``norm_on_bbox=False``) or ``relu`` in strides (``norm_on_bbox=True``);
* ``ANCHOR_OFFSET``: locations at ``(i + 0.5) * stride`` (mmdetection) instead of ``i * stride``;
* ``CENTER_SAMPLING_RADIUS``: 0 turns centre sampling off (mmdetection's default);
* ``TEST_CONVENTION``: ``"mmdetection"`` thresholds and ranks the classification probability, scores
  ``cls * centerness`` (Detectron2: ``sqrt(cls * centerness)`` for both) and clips boxes to the image and
  drops empty ones before NMS (Detectron2 clips after).

The head always hands Detectron2's ``FCOS`` its regression in strides (``Box2BoxTransformLinear`` with
``normalize_by_size``): ``exp`` pixels are divided by the stride, exactly (strides are powers of 2).
"""

import math
from typing import List

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec, batched_nms, get_norm
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.meta_arch.fcos import FCOS
from detectron2.structures import Boxes, Instances

from ..utils.errors import ArgumentValueError

__all__ = ["FCOSDetector", "FCOSDetectorHead", "REG_ACTIVATIONS", "TEST_CONVENTIONS"]

REG_ACTIVATIONS = ("linear", "exp", "relu")
TEST_CONVENTIONS = ("detectron2", "mmdetection")


class FCOSDetectorHead(nn.Module):
    """Detectron2's ``FCOSHead`` (two conv towers, class / box / centerness predictors) with mmdetection's
    variants as options (see the module doc)."""

    @configurable
    def __init__(
        self,
        *,
        input_shape: List[ShapeSpec],
        num_classes: int,
        num_convs: int = 4,
        norm: str = "GN",
        conv_bias: bool = True,
        prior_prob: float = 0.01,
        centerness_on_reg: bool = True,
        level_scales: bool = False,
        reg_activation: str = "linear",
    ):
        """
        Args:
            input_shape (list[ShapeSpec]): the levels the head runs on (same channels; their strides).
            num_classes (int): number of foreground classes.
            num_convs (int): 3x3 convs per tower.
            norm (str): a ``detectron2.layers.get_norm`` name for the towers, "" for none.
            conv_bias (bool): bias in the towers' convs.
            prior_prob (float): initial foreground probability (the classifier's bias).
            centerness_on_reg (bool): centerness from the regression tower (else the classification tower).
            level_scales (bool): one learnable scalar per level multiplying the regression output.
            reg_activation (str): "linear" (strides), "exp" (exp, pixels) or "relu" (max(x, 0), strides).
        """
        super().__init__()
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ArgumentValueError(
                "FCOSDetectorHead", "input_shape", input_shape, "the levels need equal channels (one shared head)"
            )
        if reg_activation not in REG_ACTIVATIONS:
            raise ArgumentValueError(
                "FCOSDetectorHead", "reg_activation", reg_activation, f"allowed: {list(REG_ACTIVATIONS)}"
            )
        (c,) = channels
        self.strides = [int(s.stride) for s in input_shape]
        self.centerness_on_reg = centerness_on_reg
        self.reg_activation = reg_activation

        def tower():
            layers = []
            for _ in range(num_convs):
                layers.append(nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, bias=conv_bias))
                if norm:
                    layers.append(get_norm(norm, c))
                layers.append(nn.ReLU())
            return nn.Sequential(*layers)

        self.cls_subnet = tower()
        self.bbox_subnet = tower()
        self.cls_score = nn.Conv2d(c, num_classes, kernel_size=3, stride=1, padding=1)
        self.bbox_pred = nn.Conv2d(c, 4, kernel_size=3, stride=1, padding=1)
        self.ctrness = nn.Conv2d(c, 1, kernel_size=3, stride=1, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))
        self.scales = nn.ParameterList([nn.Parameter(torch.tensor(1.0)) for _ in input_shape]) if level_scales else None

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        f = cfg.MODEL.FCOS
        return {
            "input_shape": input_shape,
            "num_classes": f.NUM_CLASSES,
            "num_convs": f.NUM_CONVS,
            "norm": f.NORM,
            "conv_bias": f.CONV_BIAS,
            "prior_prob": f.PRIOR_PROB,
            "centerness_on_reg": f.CENTERNESS_ON_REG,
            "level_scales": f.LEVEL_SCALES,
            "reg_activation": f.REG_ACTIVATION,
        }

    def forward(self, features: List[torch.Tensor]):
        """Per level: class logits (N, K, H, W), box distances in strides (N, 4, H, W), centerness logits (N, 1, H, W)."""
        logits, bbox_reg, ctrness = [], [], []
        for i, feature in enumerate(features):
            cls_feature = self.cls_subnet(feature)
            bbox_feature = self.bbox_subnet(feature)
            logits.append(self.cls_score(cls_feature))
            reg = self.bbox_pred(bbox_feature)
            if self.scales is not None:
                reg = reg * self.scales[i]
            if self.reg_activation == "exp":
                reg = reg.float().exp() / self.strides[i]
            elif self.reg_activation == "relu":
                reg = reg.clamp(min=0)
            bbox_reg.append(reg)
            ctrness.append(self.ctrness(bbox_feature if self.centerness_on_reg else cls_feature))
        return logits, bbox_reg, ctrness


@META_ARCH_REGISTRY.register()
class FCOSDetector(FCOS):
    """Detectron2's ``FCOS``, buildable from a YAML config (``MODEL.FCOS.*``), with mmdetection's anchor offset,
    optional centre sampling and test-time convention (see the module doc)."""

    @configurable
    def __init__(self, *, anchor_offset: float = 0.0, test_convention: str = "detectron2", **kwargs):
        """
        Args:
            anchor_offset (float): locations at ``(i + anchor_offset) * stride``.
            test_convention (str): "detectron2" or "mmdetection" (see the module doc).
            kwargs: the arguments of Detectron2's ``FCOS`` (``center_sampling_radius`` 0 = no centre sampling).
        """
        if kwargs.get("center_sampling_radius", 1.5) == 0:
            kwargs["center_sampling_radius"] = float("inf")  # every location inside a box
        super().__init__(**kwargs)
        if test_convention not in TEST_CONVENTIONS:
            raise ArgumentValueError(
                "FCOSDetector", "test_convention", test_convention, f"allowed: {list(TEST_CONVENTIONS)}"
            )
        self.test_convention = test_convention
        self.anchor_generator = DefaultAnchorGenerator(
            sizes=[[s] for s in self.anchor_generator.strides],
            aspect_ratios=[1.0],
            strides=self.anchor_generator.strides,
            offset=anchor_offset,
        )

    @classmethod
    def from_config(cls, cfg):
        f = cfg.MODEL.FCOS
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        head = FCOSDetectorHead(cfg, [shapes[k] for k in f.IN_FEATURES])
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": list(f.IN_FEATURES),
            "num_classes": f.NUM_CLASSES,
            "center_sampling_radius": f.CENTER_SAMPLING_RADIUS,
            "focal_loss_alpha": f.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": f.FOCAL_LOSS_GAMMA,
            "test_score_thresh": f.SCORE_THRESH_TEST,
            "test_topk_candidates": f.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": f.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "anchor_offset": f.ANCHOR_OFFSET,
            "test_convention": f.TEST_CONVENTION,
        }

    def forward_inference(self, images, features, predictions):
        if self.test_convention == "detectron2":
            return super().forward_inference(images, features, predictions)
        logits, deltas, ctrness = self._transpose_dense_predictions(predictions, [self.num_classes, 4, 1])
        anchors = self.anchor_generator(features)
        return [
            self._inference_mmdet(
                anchors, [x[i] for x in logits], [x[i] for x in deltas], [x[i] for x in ctrness], image_size
            )
            for i, image_size in enumerate(images.image_sizes)
        ]

    def _inference_mmdet(self, anchors, logits, deltas, ctrness, image_size):
        """mmdetection's ``BaseDenseHead._predict_by_feat_single`` + ``_bbox_post_process`` for FCOS."""
        boxes, scores, classes = [], [], []
        for anchors_i, logits_i, deltas_i, ctrness_i in zip(anchors, logits, deltas, ctrness):
            probs = logits_i.sigmoid()
            keep = probs > self.test_score_thresh
            probs_i = probs[keep]
            idxs = torch.nonzero(keep)
            probs_i, order = probs_i.sort(descending=True)
            num = min(self.test_topk_candidates, len(order))
            probs_i, idxs = probs_i[:num], idxs[order[:num]]
            anchor_idxs, class_idxs = idxs.unbind(dim=1)
            boxes.append(self.box2box_transform.apply_deltas(deltas_i[anchor_idxs], anchors_i.tensor[anchor_idxs]))
            scores.append(probs_i * ctrness_i[anchor_idxs, 0].sigmoid())
            classes.append(class_idxs)
        boxes = Boxes(torch.cat(boxes))
        boxes.clip(image_size)
        result = Instances(image_size, pred_boxes=boxes, scores=torch.cat(scores), pred_classes=torch.cat(classes))
        result = result[boxes.nonempty()]
        keep = batched_nms(result.pred_boxes.tensor, result.scores, result.pred_classes, self.test_nms_thresh)
        return result[keep[: self.max_detections_per_image]]
