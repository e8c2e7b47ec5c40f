"""Hybrid Task Cascade (HTC, Chen et al., CVPR 2019) as Detectron2 ROI heads, as mmdetection computes it.

Registered as ``HybridTaskCascadeROIHeads`` in ROI_HEADS_REGISTRY (``MODEL.ROI_HEADS.NAME``), options
under ``MODEL.HTC`` (``add_hrnet_config``).  It is mmdetection 3.3's ``HybridTaskCascadeRoIHead`` with
``HTCMaskHead`` and ``FusedSemanticHead`` on Detectron2's cascade machinery
(:class:`~hrnet_d2.modeling.mmdet_heads.MMDetCascadeROIHeads`: mmdetection's box-delta clamp and logit-averaged
stage ensemble):

* one box head and one mask head per stage; with ``MODEL.HTC.INTERLEAVED`` each stage's mask head is
  trained on the boxes its own stage's box head has just regressed (assigned and sampled again at that stage's IoU);
* the mask information flow (``MODEL.HTC.MASK_INFO_FLOW``): mask head k receives the features of
  mask heads 0..k-1, run in turn on the same RoI features, through its ``conv_res`` (1x1 conv + ReLU),
  added to its input;
* the semantic branch (``MODEL.HTC.SEMANTIC_ON``): :class:`FusedSemanticHead` fuses all pyramid
  levels at the stride of ``MODEL.HTC.SEMANTIC.FUSION_FEATURE``; its embedding, RoI-aligned
  (14x14, average-pooled to 7x7 for the box heads), is added to the box and mask RoI features;
* test time: class logits of all stages averaged, then soft-maxed; the mask heads run in turn on the
  final boxes (information flow); ``MODEL.HTC.MASK_TEST_STAGES`` "last" takes the last stage's mask
  probabilities, what mmdetection 3.x computes (its ``_mask_forward`` keeps only the last stage's
  prediction), "mean" averages all stages' probabilities, what mmdetection 1.x/2.x computed (and the
  HTC paper describes).

Training samples RoIs as mmdetection's ``HybridTaskCascadeRoIHead.loss`` does (``MODEL.HTC.RESAMPLE_STAGES``,
on by default): every stage assigns its input boxes plus the ground truth at its own IoU (mmdetection's
``MaxIoUAssigner``: Detectron2's ``Matcher`` without low-quality matches) and samples
``ROI_HEADS.BATCH_SIZE_PER_IMAGE`` of them with at most ``POSITIVE_FRACTION`` positives (``RandomSampler``:
Detectron2's ``subsample_labels``); the boxes a stage regressed, minus those that were appended ground truth
(mmdetection's ``refine_bboxes``), are the next stage's input; with ``MODEL.HTC.INTERLEAVED`` the stage's
mask head is trained on a fresh assignment and sample of those regressed boxes.  ``RESAMPLE_STAGES False``
is Detectron2's cascade instead: stage 0 samples, later stages (and the interleaved mask targets) take all
regressed boxes of the previous step, relabelled.  Random draws differ from mmdetection's, the rules do not
(``tests/test_mmdet_oracle.py`` compares the training losses with sampling made deterministic).

The semantic branch's own loss (``loss_semantic_seg``: cross-entropy of ``conv_logits`` against the
per-pixel label map, nearest-downsampled to the fusion stride, ignored pixels counted in the mean as
mmdetection's ``CrossEntropyLoss`` does, times ``MODEL.HTC.SEMANTIC.LOSS_WEIGHT``) needs a per-pixel
stuff+thing map per image (COCO-stuff's ``stuffthingmaps`` for COCO: a dataset's ``sem_seg_file_name``).
The :class:`HybridTaskCascade` meta-architecture passes those maps to the ROI heads; without them
(Detectron2's ``GeneralizedRCNN``, or a dataset without ``sem_seg_file_name``) the semantic branch is
trained through the box and mask losses only, its classifier (used by no output) learns nothing, and a
log line says so when training starts.  With ``GeneralizedRCNN`` the classifier is frozen (no gradient
ever reaches it).
"""

import logging
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

import fvcore.nn.weight_init as weight_init
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, MaskRCNNConvUpsampleHead
from detectron2.modeling.roi_heads.mask_head import mask_rcnn_loss
from detectron2.modeling.roi_heads.roi_heads import select_foreground_proposals
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from detectron2.utils.events import get_event_storage

from .mmdet_heads import MMDetCascadeROIHeads, set_mask_probabilities

__all__ = [
    "FusedSemanticHead",
    "HTCMaskHead",
    "HTCMaskHeads",
    "HybridTaskCascadeROIHeads",
    "HybridTaskCascade",
    "MASK_TEST_STAGES",
    "SEMANTIC_FUSION",
]

logger = logging.getLogger(__name__)

MASK_TEST_STAGES = ("last", "mean")
SEMANTIC_FUSION = ("bbox", "mask")


class FusedSemanticHead(nn.Module):
    """mmdetection's ``FusedSemanticHead``: every input level through a 1x1 conv + ReLU, resized
    (bilinear, corners aligned) to the fusion level and summed; ``num_convs`` 3x3 convs + ReLU; then a
    1x1 classifier (``conv_logits``, the segmentation logits) and a 1x1 conv + ReLU (``conv_embedding``,
    the features added to the RoI features)."""

    def __init__(
        self,
        in_channels: int,
        num_inputs: int,
        fusion_level: int,
        *,
        num_convs: int = 4,
        conv_dim: int = 256,
        num_classes: int = 183,
    ):
        """
        Args:
            in_channels: channels of every input level (the pyramid's).
            num_inputs: number of input levels.
            fusion_level: index of the input level whose resolution the features are fused at.
            num_convs: 3x3 convs after the fusion.
            conv_dim: their channels, and the embedding's.
            num_classes: segmentation classes of ``conv_logits`` (183: COCO-stuff's things + stuff).
        """
        super().__init__()
        self.fusion_level = fusion_level
        self.lateral_convs = nn.ModuleList(
            Conv2d(in_channels, in_channels, 1, activation=F.relu) for _ in range(num_inputs)
        )
        self.convs = nn.ModuleList(
            Conv2d(in_channels if i == 0 else conv_dim, conv_dim, 3, padding=1, activation=F.relu)
            for i in range(num_convs)
        )
        self.conv_embedding = Conv2d(conv_dim, conv_dim, 1, activation=F.relu)
        self.conv_logits = Conv2d(conv_dim, num_classes, 1)
        for m in [*self.lateral_convs, *self.convs, self.conv_embedding, self.conv_logits]:
            weight_init.c2_msra_fill(m)  # mmdetection: Kaiming (fan_out, ReLU), zero bias

    def forward(self, feats: Sequence[torch.Tensor], with_logits: bool = True):
        """(segmentation logits or None, embedding), both at the fusion level's stride."""
        x = self.lateral_convs[self.fusion_level](feats[self.fusion_level])
        size = tuple(x.shape[-2:])
        for i, feat in enumerate(feats):
            if i != self.fusion_level:
                feat = F.interpolate(feat, size=size, mode="bilinear", align_corners=True)
                x = x + self.lateral_convs[i](feat)
        for conv in self.convs:
            x = conv(x)
        return (self.conv_logits(x) if with_logits else None), self.conv_embedding(x)


class HTCMaskHead(MaskRCNNConvUpsampleHead):
    """Detectron2's ``MaskRCNNConvUpsampleHead`` (mmdetection's ``FCNMaskHead``) with mmdetection's
    ``HTCMaskHead`` residual input: ``conv_res`` (1x1 conv + ReLU) maps the previous stage's mask features,
    added to the RoI features before the convs."""

    def __init__(self, input_shape: ShapeSpec, *, with_conv_res: bool, **kwargs):
        """
        Args:
            input_shape: the RoI features' shape.
            with_conv_res: whether this head takes the previous stage's features (``conv_res``).
            kwargs: ``MaskRCNNConvUpsampleHead``'s (``num_classes``, ``conv_dims``, ``conv_norm``, ...).
        """
        super().__init__(input_shape, **kwargs)
        if with_conv_res:
            dim = self.conv_norm_relus[-1].out_channels
            conv_res = Conv2d(dim, dim, 1, activation=F.relu)
            weight_init.c2_msra_fill(conv_res)
            self.conv_res = conv_res
        else:
            self.conv_res = None

    def features(self, x: torch.Tensor, res_feat: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The convs' output on ``x`` (+ ``conv_res(res_feat)``): what the next stage receives."""
        if res_feat is not None:
            if self.conv_res is None:
                raise ValueError("this HTC mask head has no conv_res: it cannot take the previous stage's features")
            x = x + self.conv_res(res_feat)
        for conv in self.conv_norm_relus:
            x = conv(x)
        return x

    def logits(self, feat: torch.Tensor) -> torch.Tensor:
        """Mask logits (N, classes, 2M, 2M) from :meth:`features`."""
        return self.predictor(self.deconv_relu(self.deconv(feat)))

    def layers(self, x):
        return self.logits(self.features(x))


class HTCMaskHeads(nn.Module):
    """The per-stage :class:`HTCMaskHead` s (``heads.<stage>``, the names the converter writes)."""

    def __init__(self, heads: List[HTCMaskHead]):
        """
        Args:
            heads: one mask head per cascade stage; all but the first with ``conv_res``.
        """
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor, stages: int, info_flow: bool) -> List[torch.Tensor]:
        """Mask logits of heads 0..stages-1 run in turn on ``x`` (each receiving its predecessor's
        features when ``info_flow``)."""
        logits, last = [], None
        for head in self.heads[:stages]:
            last = head.features(x, last if info_flow else None)
            logits.append(head.logits(last))
        return logits

    def stage_logits(self, x: torch.Tensor, stage: int, info_flow: bool) -> torch.Tensor:
        """Training: stage ``stage``'s mask logits; with ``info_flow`` the earlier heads run (with
        gradients, as in mmdetection) only to give it their features."""
        last = None
        if info_flow:
            for head in self.heads[:stage]:
                last = head.features(x, last)
        head = self.heads[stage]
        return head.logits(head.features(x, last))


@ROI_HEADS_REGISTRY.register()
class HybridTaskCascadeROIHeads(MMDetCascadeROIHeads):
    """mmdetection's ``HybridTaskCascadeRoIHead`` (see the module doc)."""

    @configurable
    def __init__(
        self,
        *,
        interleaved: bool = True,
        resample_stages: bool = True,
        mask_info_flow: bool = True,
        mask_test_stages: str = "last",
        semantic_head: Optional[FusedSemanticHead] = None,
        semantic_in_features: Sequence[str] = (),
        semantic_pooler: Optional[ROIPooler] = None,
        semantic_fusion: Sequence[str] = SEMANTIC_FUSION,
        semantic_loss_weight: float = 0.2,
        semantic_ignore_value: int = 255,
        semantic_maps: bool = False,
        **kwargs,
    ):
        """
        Args:
            interleaved: train stage k's mask head on stage k's regressed boxes (else on its input boxes).
            resample_stages: assign and sample every stage's RoIs afresh, as mmdetection (see the module doc);
                False: Detectron2's cascade relabelling.
            mask_info_flow: mask heads receive the previous stage's mask features.
            mask_test_stages: "last" (mmdetection 3.x) or "mean" (mmdetection 1.x/2.x), see the module doc.
            semantic_head: the semantic branch, or None.
            semantic_in_features: the pyramid levels it fuses.
            semantic_pooler: RoI-aligns its embedding (one level, at the fusion level's stride).
            semantic_fusion: where the pooled embedding is added: "bbox" and/or "mask" RoI features.
            semantic_loss_weight: weight of the semantic segmentation loss.
            semantic_ignore_value: label of pixels the segmentation loss ignores (also the padding).
            semantic_maps: whether the meta-architecture passes label maps (:class:`HybridTaskCascade`);
                if not, the semantic classifier is frozen.
            kwargs: ``MMDetCascadeROIHeads``' (``stage_loss_weights``: each stage's box and mask losses are
                multiplied by its weight).
        """
        super().__init__(**kwargs)
        if self.mask_on and not isinstance(self.mask_head, HTCMaskHeads):
            raise ValueError("HybridTaskCascadeROIHeads needs HTCMaskHeads as its mask head")
        self.interleaved = interleaved
        self.resample_stages = resample_stages
        self.mask_info_flow = mask_info_flow
        self.mask_test_stages = mask_test_stages
        self.semantic_head = semantic_head
        self.semantic_in_features = list(semantic_in_features)
        self.semantic_pooler = semantic_pooler
        self.semantic_fusion = tuple(semantic_fusion)
        self.semantic_loss_weight = semantic_loss_weight
        self.semantic_ignore_value = semantic_ignore_value
        self._told_no_semantic_loss = False
        if semantic_head is not None and not semantic_maps:
            # no segmentation maps can reach the ROI heads (module doc): the classifier has no loss to learn from
            semantic_head.conv_logits.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        h = cfg.MODEL.HTC
        ret.update(
            interleaved=h.INTERLEAVED,
            resample_stages=h.RESAMPLE_STAGES,
            mask_info_flow=h.MASK_INFO_FLOW,
            mask_test_stages=h.MASK_TEST_STAGES,
        )
        if h.SEMANTIC_ON:
            ret.update(cls._init_semantic_head(cfg, input_shape))
        return ret

    @classmethod
    def _init_mask_head(cls, cfg, input_shape):
        ret = super(MMDetCascadeROIHeads, cls)._init_mask_head(cfg, input_shape)  # pooler; heads below
        if not cfg.MODEL.MASK_ON:
            return ret
        resolution = cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION
        channels = input_shape[ret["mask_in_features"][0]].channels
        shape = ShapeSpec(channels=channels, width=resolution, height=resolution)
        args = MaskRCNNConvUpsampleHead.from_config(cfg, shape)
        stages = len(cfg.MODEL.ROI_BOX_CASCADE_HEAD.IOUS)
        ret["mask_head"] = HTCMaskHeads([HTCMaskHead(with_conv_res=k > 0, **args) for k in range(stages)])
        return ret

    @classmethod
    def _init_semantic_head(cls, cfg, input_shape):
        s = cfg.MODEL.HTC.SEMANTIC
        in_features = list(s.IN_FEATURES)
        channels = {input_shape[f].channels for f in in_features}
        if len(channels) != 1:
            raise ValueError(f"MODEL.HTC.SEMANTIC.IN_FEATURES {in_features} have different channels {sorted(channels)}")
        head = FusedSemanticHead(
            channels.pop(),
            len(in_features),
            in_features.index(s.FUSION_FEATURE),
            num_convs=s.NUM_CONVS,
            conv_dim=s.CONV_DIM,
            num_classes=s.NUM_CLASSES,
        )
        pooler = ROIPooler(
            output_size=s.POOLER_RESOLUTION,
            scales=(1.0 / input_shape[s.FUSION_FEATURE].stride,),
            sampling_ratio=s.POOLER_SAMPLING_RATIO,
            pooler_type=s.POOLER_TYPE,
        )
        return {
            "semantic_head": head,
            "semantic_in_features": in_features,
            "semantic_pooler": pooler,
            "semantic_fusion": tuple(s.FUSION),
            "semantic_loss_weight": s.LOSS_WEIGHT,
            "semantic_ignore_value": s.IGNORE_VALUE,
            "semantic_maps": cfg.MODEL.META_ARCHITECTURE == "HybridTaskCascade",
        }

    # ---- shared by training and inference

    def _semantic_features(self, features: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        if self.semantic_head is None:
            return None
        return self.semantic_head([features[f] for f in self.semantic_in_features], with_logits=False)[1]

    def _semantic_loss(self, features, sem_seg):
        """(embedding, mmdetection's ``loss_semantic_seg``) from the (N, H, W) label maps of the padded batch."""
        logits, embedding = self.semantic_head([features[f] for f in self.semantic_in_features])
        labels = F.interpolate(sem_seg[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0].long()
        loss = F.cross_entropy(logits, labels, ignore_index=self.semantic_ignore_value, reduction="none")
        return embedding, loss.mean() * self.semantic_loss_weight  # mmdetection: mean over all pixels

    def _fuse_semantic(self, x, semantic, boxes: List[Boxes], where: str):
        """``x`` + the semantic embedding RoI-aligned on ``boxes`` (average-pooled to ``x``'s size)."""
        if semantic is None or where not in self.semantic_fusion:
            return x
        s = self.semantic_pooler([semantic], boxes)
        if s.shape[-2:] != x.shape[-2:]:
            s = F.adaptive_avg_pool2d(s, x.shape[-2:])
        return x + s

    def _run_semantic_stage(self, features, proposals, stage, semantic):
        """mmdetection's ``_bbox_forward``: stage ``stage``'s (logits, deltas); no gradient scaling
        (mmdetection weighs the stages' losses instead)."""
        boxes = [x.proposal_boxes for x in proposals]
        x = self._fuse_semantic(self.box_pooler(features, boxes), semantic, boxes, "bbox")
        return self.box_predictor[stage](self.box_head[stage](x))

    def _mask_features(self, features, semantic, boxes: List[Boxes]):
        x = self.mask_pooler([features[f] for f in self.mask_in_features], boxes)
        return self._fuse_semantic(x, semantic, boxes, "mask")

    # ---- forward

    def forward(self, images, features, proposals, targets=None, sem_seg=None):
        """``ROIHeads.forward``; ``sem_seg``: (N, H, W) label maps of the padded batch (training), or None."""
        del images
        if self.training:
            losses = {}
            if self.semantic_head is not None and sem_seg is not None:
                semantic, losses["loss_semantic_seg"] = self._semantic_loss(features, sem_seg)
            else:
                semantic = self._semantic_features(features)
                if self.semantic_head is not None and not self._told_no_semantic_loss:
                    logger.info(
                        "HTC semantic branch: no segmentation maps (COCO-stuff; a dataset's sem_seg_file_name, passed "
                        "by MODEL.META_ARCHITECTURE 'HybridTaskCascade') reach the ROI heads, so it is trained "
                        "through the box and mask losses only, without mmdetection's loss_semantic_seg"
                    )
                    self._told_no_semantic_loss = True
            if not self.resample_stages:  # Detectron2: stage 0's sample here, later stages relabel
                proposals = self.label_and_sample_proposals(proposals, targets)
            proposals, train_losses = self._forward_train(features, semantic, proposals, targets)
            losses.update(train_losses)
            return proposals, losses
        semantic = self._semantic_features(features)
        box_features = [features[f] for f in self.box_in_features]
        instances = self._cascade_inference(
            box_features, proposals, lambda f, p, k: self._run_semantic_stage(f, p, k, semantic)
        )
        return self._predict_masks(features, instances, semantic), {}

    def forward_with_given_boxes(self, features, instances):
        assert not self.training
        return self._predict_masks(features, instances, self._semantic_features(features))

    def _predict_masks(self, features, instances: List[Instances], semantic):
        """mmdetection's ``predict_mask``: all mask heads in turn on the final boxes, probabilities of the
        last stage ("last") or of all stages averaged ("mean"); the detected class's channel."""
        if not self.mask_on:
            return instances
        x = self._mask_features(features, semantic, [i.pred_boxes for i in instances])
        logits = self.mask_head(x, self.num_cascade_stages, self.mask_info_flow)
        if self.mask_test_stages == "last":
            probs = logits[-1].sigmoid()
        else:
            probs = torch.stack([m.sigmoid() for m in logits]).mean(dim=0)
        return set_mask_probabilities(probs, instances)

    # ---- training

    def _forward_train(self, features, semantic, proposals, targets):
        """(stage 0's RoIs, losses).  ``proposals``: the RPN's (``resample_stages``) or stage 0's sample."""
        box_features = [features[f] for f in self.box_in_features]
        image_sizes = [x.image_size for x in proposals]
        storage = get_event_storage()
        losses, boxes, first = {}, None, None
        stage_input = [x.proposal_boxes for x in proposals]
        for k in range(self.num_cascade_stages):
            weight = self.stage_loss_weights[k]
            if self.resample_stages:
                with storage.name_scope(f"stage{k}"):
                    proposals = self._sample_stage(stage_input, targets, k)
            elif k > 0:
                proposals = self._label_boxes(self._create_proposals_from_boxes(boxes, image_sizes), k, targets)
            first = first or proposals
            predictions = self._run_semantic_stage(box_features, proposals, k, semantic)
            with storage.name_scope(f"stage{k}"):
                stage_losses = self.box_predictor[k].losses(predictions, proposals)
            losses.update({f"{name}_stage{k}": v * weight for name, v in stage_losses.items()})
            boxes = self.box_predictor[k].predict_boxes(predictions, proposals)
            if self.resample_stages:  # mmdetection's refine_bboxes: regressed, clipped, appended ground truth dropped
                stage_input = self._refined_boxes(boxes, proposals)
            if self.mask_on:
                mask_proposals = proposals
                if self.interleaved and self.resample_stages:  # assigned and sampled afresh, at this stage's IoU
                    with storage.name_scope(f"stage{k}_mask"):
                        mask_proposals = self._sample_stage(stage_input, targets, k)
                elif self.interleaved:  # the boxes this stage just regressed, relabelled at its IoU
                    mask_proposals = self._label_boxes(
                        self._create_proposals_from_boxes(boxes, image_sizes), k, targets
                    )
                fg, _ = select_foreground_proposals(mask_proposals, self.num_classes)
                boxes_fg = [x.proposal_boxes for x in fg]
                logits = self.mask_head.stage_logits(
                    self._mask_features(features, semantic, boxes_fg), k, self.mask_info_flow
                )
                losses[f"loss_mask_stage{k}"] = mask_rcnn_loss(logits, fg) * weight
        return first, losses

    @torch.no_grad()
    def _sample_stage(self, boxes: List[Boxes], targets: List[Instances], stage: int) -> List[Instances]:
        """mmdetection's ``MaxIoUAssigner`` + ``RandomSampler`` at stage ``stage``: ``boxes`` with the ground
        truth appended (``from_gt``), matched at the stage's IoU, ``batch_size_per_image`` sampled with at most
        ``positive_fraction`` positives, with every ``gt_*`` field of their ground truth (background: class
        ``num_classes``)."""
        sampled, num_fg, num_bg = [], [], []
        for b, gt in zip(boxes, targets):
            from_gt = torch.zeros(len(b), dtype=torch.bool, device=b.device)
            if self.proposal_append_gt:
                b = Boxes.cat([b, gt.gt_boxes])
                from_gt = torch.cat([from_gt, torch.ones(len(gt), dtype=torch.bool, device=b.device)])
            matched_idxs, matched_labels = self.proposal_matchers[stage](pairwise_iou(gt.gt_boxes, b))
            idxs, gt_classes = self._sample_proposals(matched_idxs, matched_labels, gt.gt_classes)
            props = Instances(gt.image_size, proposal_boxes=b[idxs], from_gt=from_gt[idxs], gt_classes=gt_classes)
            if len(gt) > 0:
                for name, value in gt.get_fields().items():
                    if name.startswith("gt_") and not props.has(name):
                        props.set(name, value[matched_idxs[idxs]])
            num_bg.append(int((gt_classes == self.num_classes).sum()))
            num_fg.append(len(gt_classes) - num_bg[-1])
            sampled.append(props)
        storage = get_event_storage()
        storage.put_scalar("roi_head/num_fg_samples", sum(num_fg) / max(len(num_fg), 1))
        storage.put_scalar("roi_head/num_bg_samples", sum(num_bg) / max(len(num_bg), 1))
        return sampled

    @staticmethod
    def _refined_boxes(boxes: List[torch.Tensor], proposals: List[Instances]) -> List[Boxes]:
        """mmdetection's ``refine_bboxes``: a stage's regressed boxes, clipped to the image, without the
        boxes that were appended ground truth (they are appended again, exactly, by the next sample)."""
        refined = []
        for b, p in zip(boxes, proposals):
            b = Boxes(b.detach()[~p.from_gt])
            b.clip(p.image_size)
            refined.append(b)
        return refined

    @torch.no_grad()
    def _label_boxes(self, proposals: List[Instances], stage: int, targets: List[Instances]):
        """Proposals matched at stage ``stage``'s IoU, with every ``gt_*`` field of their ground truth
        (background: class ``num_classes``)."""
        for props, gt in zip(proposals, targets):
            matched, labels = self.proposal_matchers[stage](pairwise_iou(gt.gt_boxes, props.proposal_boxes))
            if len(gt) > 0:
                for name, value in gt.get_fields().items():
                    if name.startswith("gt_"):
                        props.set(name, value[matched])
                props.gt_classes[labels == 0] = self.num_classes
            else:
                props.gt_classes = torch.full_like(matched, self.num_classes)
                props.gt_boxes = Boxes(gt.gt_boxes.tensor.new_zeros((len(props), 4)))
        return proposals


@META_ARCH_REGISTRY.register()
class HybridTaskCascade(GeneralizedRCNN):
    """Detectron2's ``GeneralizedRCNN`` (mmdetection's ``HybridTaskCascade`` detector) that, in training,
    also gives the ROI heads the images' per-pixel label maps (``sem_seg`` of the mapped inputs, loaded from
    a dataset's ``sem_seg_file_name``), padded like the images with the ignore value, for the semantic
    branch's loss.  Inference is ``GeneralizedRCNN``'s."""

    def forward(self, batched_inputs):
        if not self.training:
            return super().forward(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        sem_seg = None
        if all("sem_seg" in x for x in batched_inputs):
            sem_seg = ImageList.from_tensors(
                [x["sem_seg"].to(self.device) for x in batched_inputs],
                self.backbone.size_divisibility,
                getattr(self.roi_heads, "semantic_ignore_value", 255),
                self.backbone.padding_constraints,
            ).tensor
        features = self.backbone(images.tensor)
        proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        _, detector_losses = self.roi_heads(images, features, proposals, gt_instances, sem_seg=sem_seg)
        return {**detector_losses, **proposal_losses}
