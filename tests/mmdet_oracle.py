"""mmdetection 3.3 as the test oracle for converted detectors (test-only helpers).

mmcv-lite has no compiled ops.  ``install_ext_stand_in`` puts a stand-in for mmcv's compiled
extension (``mmcv._ext``) in ``sys.modules`` before mmdet is imported, so that mmcv's and
mmdet's own Python (``mmcv.ops.nms`` / ``batched_nms`` with its per-class offsets, split_thr and
max_num, ``RoIAlign``) runs unchanged and only the two kernels the R-CNNs need are replaced,
bit-identical to mmcv's CPU kernels:

* ``nms``: mmcv sorts the scores with ``Tensor.sort(descending=True)`` (not stable) and compares
  the IoU with a float32 threshold; torchvision sorts stably and compares with a double.  The
  stand-in hands torchvision the boxes already in mmcv's order (a stable sort keeps it) and the
  threshold rounded to float32.
* ``roi_align_forward``: torchvision's ``roi_align`` (the same algorithm, aligned or legacy).

Every other mmcv kernel raises when called.
"""

import copy
import importlib.machinery
import importlib.util
import sys
import types

import numpy as np
import torch
import torchvision

# the background (last) logit's bias: lowered until the calibration image has some detections (not 100s)
BACKGROUND_LOGITS = tuple(8.0 - 0.5 * i for i in range(17))
MIN_DETECTIONS = 10


def shapes_image(seed, h, w, count=8, min_size=10):
    """``count`` coloured boxes and discs (sides / radii from ``min_size`` to a quarter of the image) on a flat
    background (RGB uint8): the oracle tests' images, and tools/benchmark_mmdet.py's."""
    import cv2

    r = np.random.default_rng(seed)
    img = np.full((h, w, 3), r.integers(0, 90, 3), np.uint8)
    for _ in range(count):
        colour = tuple(int(v) for v in r.integers(60, 255, 3))
        x, y, s = int(r.integers(0, w)), int(r.integers(0, h)), int(r.integers(min_size, min(h, w) // 4))
        if r.random() < 0.5:
            cv2.rectangle(img, (x, y), (x + s, y + s), colour, -1)
        else:
            cv2.circle(img, (x, y), s, colour, -1)
    return img


def _nms(boxes, scores, iou_threshold, offset=0):
    if offset != 0:
        raise NotImplementedError("mmcv nms with offset=1 (legacy +1 boxes): not in the test stand-in")
    order = scores.sort(0, descending=True)[1]  # what mmcv's nms_cpu does
    keep = torchvision.ops.nms(boxes[order], scores[order], float(np.float32(iou_threshold)))
    return order[keep]


def _roi_align_forward(
    input,
    rois,
    output,
    argmax_y,
    argmax_x,
    aligned_height,
    aligned_width,
    spatial_scale,
    sampling_ratio,
    pool_mode,
    aligned,
):
    if pool_mode != 1:
        raise NotImplementedError("mmcv roi_align pool_mode 'max': not in the test stand-in")
    output.copy_(
        torchvision.ops.roi_align(
            input, rois, (aligned_height, aligned_width), spatial_scale, sampling_ratio, bool(aligned)
        )
    )


def install_ext_stand_in():
    """Make ``import mmdet.models`` work on mmcv-lite; returns False when mmdet is not installed."""
    if importlib.util.find_spec("mmdet") is None or importlib.util.find_spec("mmcv") is None:
        return False
    if "mmcv._ext" not in sys.modules:
        ext = types.ModuleType("mmcv._ext")
        ext.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", None)  # mmengine looks it up
        ext.nms = _nms
        ext.roi_align_forward = _roi_align_forward

        def __getattr__(name):
            if name.startswith("__"):
                raise AttributeError(name)

            def missing(*args, **kwargs):
                raise NotImplementedError(f"mmcv._ext.{name}: not in the test stand-in (tests/mmdet_oracle.py)")

            return missing

        ext.__getattr__ = __getattr__
        sys.modules["mmcv._ext"] = ext
    from mmdet.utils import register_all_modules

    register_all_modules()
    return True


def mmdet_config(name, num_classes=80, test_scale=None):
    """mmdetection's shipped ``configs/hrnet/<name>.py`` without the ImageNet download."""
    import mmdet
    from mmengine import Config

    root = f"{mmdet.__path__[0]}/.mim/configs/hrnet"
    cfg = Config.fromfile(f"{root}/{name}.py")
    cfg.model.backbone.init_cfg = None
    if "roi_head" in cfg.model:
        heads = cfg.model.roi_head.bbox_head
        for h in heads if isinstance(heads, list) else [heads]:
            h.num_classes = num_classes
        if "mask_head" in cfg.model.roi_head:
            heads = cfg.model.roi_head.mask_head  # one dict (shared by the stages) or one per stage (HTC)
            for h in heads if isinstance(heads, list) else [heads]:
                h.num_classes = num_classes
    else:  # a dense detector (FCOS): bbox_head at the top
        cfg.model.bbox_head.num_classes = num_classes
    if test_scale is not None:  # (long, short) edge, as mmdet's Resize(scale=...)
        for step in cfg.test_dataloader.dataset.pipeline:
            if step.type == "Resize":
                step.scale = tuple(test_scale)
    pipeline = cfg.test_dataloader.dataset.pipeline
    cfg.test_dataloader.dataset.pipeline = [s for s in pipeline if s.type != "LoadAnnotations"]
    return cfg


def with_v1_conventions(cfg):
    """mmdetection's own emulation of v1.x inference (its configs/legacy_1.x): legacy anchors and +1 box
    coder, RoIAlign without the half-pixel shift, 2x2 sampling (v1's +1 NMS areas and mask paste are not
    emulated by mmdetection either)."""
    m = cfg.model
    m.rpn_head.anchor_generator.type = "LegacyAnchorGenerator"
    m.rpn_head.anchor_generator.center_offset = 0.5
    m.rpn_head.bbox_coder.type = "LegacyDeltaXYWHBBoxCoder"
    heads = m.roi_head.bbox_head
    for h in heads if isinstance(heads, list) else [heads]:
        h.bbox_coder.type = "LegacyDeltaXYWHBBoxCoder"
    for extractor in ("bbox_roi_extractor", "mask_roi_extractor"):
        if extractor in m.roi_head:
            m.roi_head[extractor].roi_layer.update(sampling_ratio=2, aligned=False)
    return cfg


@torch.no_grad()
def randomly_initialised_detector(cfg, calibration_image, seed=0):
    """mmdetection's detector with random weights that still detects things.

    BN statistics from one train-mode forward on ``calibration_image`` (HxWx3 RGB uint8), the neck's
    outputs scaled to std ~1, and head layers scaled so that RPN scores, class scores, box deltas and
    mask logits spread (not all near-uniform or saturated).
    """
    from mmdet.apis import init_detector

    torch.manual_seed(seed)
    model = init_detector(cfg, checkpoint=None, device="cpu")
    model.init_weights()
    pre = cfg.model.data_preprocessor  # the model's own input: RGB or BGR (mmdet loads BGR), its mean / std
    image = calibration_image if pre.get("bgr_to_rgb", False) else calibration_image[:, :, ::-1]
    x = torch.as_tensor(image.transpose(2, 0, 1).copy()).float()[None]
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    x = (x - mean) / std
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one forward gives that batch's statistics
        m.train()
    feats = model.backbone(x)
    for m in bns:
        m.eval()
    feats = model.backbone(x)
    outs = model.neck(feats)
    for conv, out in zip(model.neck.fpn_convs, outs):
        s = float(out.std())
        conv.conv.weight /= s
        conv.conv.bias /= s
    semantic = getattr(getattr(model, "roi_head", None), "semantic_head", None)
    if semantic is not None:  # HTC: its embedding (added to the RoI features) at std ~1 too
        s = float(semantic(model.neck(feats))[1].std())
        semantic.conv_embedding.conv.weight /= s
        semantic.conv_embedding.conv.bias /= s
    g = torch.Generator().manual_seed(seed + 1)

    def normal_(t, std):
        t.copy_(torch.randn(t.shape, generator=g) * std)

    if not hasattr(model, "roi_head"):
        return _realistic_fcos_head(model, calibration_image, normal_)
    rpn = model.rpn_head
    normal_(rpn.rpn_conv.weight, 0.03)
    normal_(rpn.rpn_cls.weight, 0.01)  # objectness logits well below float32 sigmoid saturation (~17)
    normal_(rpn.rpn_cls.bias, 0.5)
    normal_(rpn.rpn_reg.weight, 0.003)  # moderate box deltas: no degenerate sub-pixel-wide boxes
    bbox_heads = model.roi_head.bbox_head
    for head in bbox_heads if isinstance(bbox_heads, torch.nn.ModuleList) else [bbox_heads]:
        normal_(head.shared_fcs[0].weight, 0.01)
        normal_(head.shared_fcs[1].weight, 0.01)
        normal_(head.fc_cls.weight, 0.03)
        normal_(head.fc_cls.bias, 1.0)
        normal_(head.fc_reg.weight, 0.005)
    if getattr(model.roi_head, "with_mask", False):
        mask_heads = model.roi_head.mask_head
        for head in mask_heads if isinstance(mask_heads, torch.nn.ModuleList) else [mask_heads]:
            normal_(head.conv_logits.weight, 1.0)  # decisive masks: few pixels near the 0.5 threshold
    model.eval()
    heads = list(bbox_heads) if isinstance(bbox_heads, torch.nn.ModuleList) else [bbox_heads]
    for logit in BACKGROUND_LOGITS:
        for head in heads:
            head.fc_cls.bias[-1] = logit
        detections, _ = mmdet_predict(model, np.ascontiguousarray(calibration_image[:, :, ::-1]))  # BGR, as loaded
        if int((detections["scores"] >= 0.05).sum()) >= MIN_DETECTIONS:
            break
    return model


# FCOS: the classifier's bias (all classes), raised until the calibration image has some detections
FCOS_CLASS_BIASES = tuple(-12.0 + 0.5 * i for i in range(25))


def _realistic_fcos_head(model, calibration_image, normal_):
    """mmdetection's ``FCOSHead`` with spread class / centerness logits and box sizes from a few strides
    to many: GN affine terms and per-level scales away from their init, so that each of them matters."""
    head = model.bbox_head
    for tower in (head.cls_convs, head.reg_convs):
        for block in tower:
            if block.with_norm:
                norm = getattr(block, block.norm_name)
                normal_(norm.weight, 0.2)
                norm.weight += 1.0
                normal_(norm.bias, 0.2)
    normal_(head.conv_cls.weight, 0.04)
    normal_(head.conv_centerness.weight, 0.03)
    normal_(head.conv_reg.weight, 0.003)  # box sides exp(scale * (1 + small)) pixels
    head.conv_reg.bias.fill_(1.0)
    for scale, stride in zip(head.scales, head.strides):
        s = stride[0] if isinstance(stride, tuple) else stride
        scale.scale.fill_(float(np.log(2.0 * s)) * (0.9 + 0.2 * float(torch.rand(1))))
    model.eval()
    for bias in FCOS_CLASS_BIASES:
        head.conv_cls.bias.fill_(bias)
        detections, _ = mmdet_predict(model, np.ascontiguousarray(calibration_image[:, :, ::-1]))  # BGR, as loaded
        if int((detections["scores"] >= 0.05).sum()) >= MIN_DETECTIONS:
            break
    return model


def save_mmdet_checkpoint(model, path):
    """An mmdetection-format checkpoint (``meta`` + ``state_dict``), as mmengine writes it."""
    meta = {"mmdet_version": "3.3.0", "dataset_meta": {"classes": tuple(model.dataset_meta["classes"])}}
    torch.save({"meta": meta, "state_dict": model.state_dict()}, path)


def mmdet_predict(model, image):
    """mmdetection's inference on an image file (or BGR array): (detections, RPN proposals in the resized image)."""
    from mmcv.transforms import Compose
    from mmdet.apis import inference_detector
    from mmdet.utils import get_test_pipeline_cfg

    pipeline = copy.deepcopy(get_test_pipeline_cfg(model.cfg))  # mmdet would edit model.cfg's for arrays
    if isinstance(image, np.ndarray):
        pipeline[0].type = "mmdet.LoadImageFromNDArray"
    captured = {}
    two_stage = hasattr(model, "roi_head")  # dense detectors (FCOS) have no proposals to capture
    if two_stage:
        original = model.roi_head.predict

        def predict(x, rpn_results_list, *args, **kwargs):
            captured["proposals"] = rpn_results_list[0].bboxes.clone()
            captured["proposal_scores"] = rpn_results_list[0].scores.clone()
            return original(x, rpn_results_list, *args, **kwargs)

        model.roi_head.predict = predict
    try:
        sample = inference_detector(model, image if isinstance(image, np.ndarray) else str(image), Compose(pipeline))
    finally:
        if two_stage:
            del model.roi_head.predict
    pred = sample.pred_instances
    out = {
        "boxes": pred.bboxes.clone(),
        "scores": pred.scores.clone(),
        "classes": pred.labels.clone(),
        "image_shape": tuple(sample.metainfo["img_shape"]),
    }
    if "masks" in pred:
        out["masks"] = pred.masks.clone().bool()
    return out, captured


def d2_predict(model, cfg, image_rgb):
    """Detectron2's inference (the test mapper's resize) on an RGB uint8 image: (detections, proposals)."""
    from hrnet_d2.data.resize import resize_augmentation

    h, w = image_rgb.shape[:2]
    resized = resize_augmentation(cfg).get_transform(image_rgb).apply_image(image_rgb)
    if cfg.INPUT.FORMAT == "BGR":  # what Detectron2's mapper hands such a model
        resized = resized[:, :, ::-1]
    tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
    captured = {}

    def hook(module, inputs, outputs):
        captured["proposals"] = outputs[0][0].proposal_boxes.tensor.clone()
        captured["proposal_scores"] = outputs[0][0].objectness_logits.sigmoid().clone()

    rpn = getattr(model, "proposal_generator", None)  # dense detectors (FCOS) have none
    handle = rpn.register_forward_hook(hook) if rpn is not None else None
    try:
        with torch.no_grad():
            inst = model([{"image": tensor, "height": h, "width": w}])[0]["instances"]
    finally:
        if handle is not None:
            handle.remove()
    out = {
        "boxes": inst.pred_boxes.tensor.clone(),
        "scores": inst.scores.clone(),
        "classes": inst.pred_classes.clone(),
        "image_shape": tuple(resized.shape[:2]),
    }
    if inst.has("pred_masks"):
        out["masks"] = inst.pred_masks.clone().bool()
    return out, captured


@torch.no_grad()
def dense_head_differences(mm_model, d2_model, batched_image):
    """Dense detectors (FCOS): per pyramid level, the largest difference between mmdetection's head outputs and
    ours on the same normalised, padded input (1, 3, H, W), relative to the std of mmdetection's output:
    ``(class logits, box distances in pixels, centerness logits)``.  It covers every level, also those
    that the detections of a test image happen not to come from."""
    cls, reg, ctr = mm_model.bbox_head(mm_model.extract_feat(batched_image))
    features = d2_model.backbone(batched_image)
    logits, distances, ctrness = d2_model.head([features[f] for f in d2_model.head_in_features])

    def rel(ref, ours):
        return float((ref - ours).abs().max() / ref.std().clamp_min(1e-12))

    return [
        (rel(cls[i], logits[i]), rel(reg[i], distances[i] * stride), rel(ctr[i], ctrness[i]))
        for i, stride in enumerate(d2_model.head.strides)
    ]


def _mask_iou(a, b):
    inter = (a & b).sum().item()
    union = (a | b).sum().item()
    return 1.0 if union == 0 else inter / union, union - inter


def match_detections(ref, ours, min_score=0.05, iou_thr=0.99, score_tol=1e-3, mask_thr=0.98, mask_pixels=2):
    """Every detection of ``ref`` with score >= min_score has one in ``ours`` with the same class,
    box IoU >= iou_thr, score within score_tol (and mask IoU >= mask_thr, or at most ``mask_pixels``
    pixels differing: on a mask of under 50 pixels one pixel is already 2%); and the converse.

    Returns a dict of figures: matched, unmatched (per direction), worst box IoU, worst score
    difference, worst mask IoU among the matches and the most pixels a matched mask differs by.
    """
    stats = {
        "matched": 0,
        "unmatched_ref": 0,
        "unmatched_ours": 0,
        "worst_iou": 1.0,
        "worst_score": 0.0,
        "worst_mask_iou": 1.0 if "masks" in ref else None,
        "most_mask_pixels": 0 if "masks" in ref else None,
        "ref_count": 0,
        "ours_count": 0,
    }
    for direction, (a, b) in enumerate(((ref, ours), (ours, ref))):
        keep = a["scores"] >= min_score
        idx = torch.nonzero(keep).flatten().tolist()
        stats["ref_count" if direction == 0 else "ours_count"] = len(idx)
        ious = torchvision.ops.box_iou(a["boxes"], b["boxes"]) if len(b["boxes"]) else torch.zeros(len(a["boxes"]), 0)
        for i in idx:
            same = (b["classes"] == a["classes"][i]) & ((b["scores"] - a["scores"][i]).abs() <= score_tol)
            cand = torch.where(same, ious[i], torch.full_like(ious[i], -1.0)) if len(b["boxes"]) else ious[i]
            j = int(cand.argmax()) if cand.numel() else -1
            ok = j >= 0 and cand[j] >= iou_thr
            if ok and "masks" in a:
                m, pixels = _mask_iou(a["masks"][i], b["masks"][j])
                ok = m >= mask_thr or pixels <= mask_pixels
            if not ok:
                stats["unmatched_ref" if direction == 0 else "unmatched_ours"] += 1
                continue
            if direction == 0:
                stats["matched"] += 1
                stats["worst_iou"] = min(stats["worst_iou"], float(cand[j]))
                stats["worst_score"] = max(stats["worst_score"], float((a["scores"][i] - b["scores"][j]).abs()))
                if "masks" in a:
                    stats["worst_mask_iou"] = min(stats["worst_mask_iou"], m)
                    stats["most_mask_pixels"] = max(stats["most_mask_pixels"], pixels)
    stats["agree"] = stats["unmatched_ref"] == 0 and stats["unmatched_ours"] == 0 and stats["matched"] > 0
    return stats


def match_proposals(ref, ours, iou_thr=0.99):
    """Fraction of ``ref`` proposals with a proposal in ``ours`` at box IoU >= iou_thr (and the converse)."""
    ious = torchvision.ops.box_iou(ref, ours)
    return float((ious.max(1).values >= iou_thr).float().mean()), float((ious.max(0).values >= iou_thr).float().mean())


def closeness(ref, ours):
    """How far ``ours`` is from ``ref`` when they do not agree: per ``ref`` detection, the box IoU of the
    best same-class detection of ``ours``, its score difference and mask IoU (lists, to be pooled)."""
    out = {"ious": [], "score_diffs": [], "mask_ious": []}
    ious = torchvision.ops.box_iou(ref["boxes"], ours["boxes"])
    for i in range(len(ref["boxes"])):
        cand = torch.where(ours["classes"] == ref["classes"][i], ious[i], torch.full_like(ious[i], -1.0))
        j = int(cand.argmax()) if cand.numel() else -1
        if j < 0 or cand[j] <= 0:
            out["ious"].append(0.0)
            continue
        out["ious"].append(float(cand[j]))
        out["score_diffs"].append(float((ref["scores"][i] - ours["scores"][j]).abs()))
        if "masks" in ref:
            out["mask_ious"].append(_mask_iou(ref["masks"][i], ours["masks"][j])[0])
    return out


def summarize_closeness(pooled):
    a, s = np.array(pooled["ious"]), np.array(pooled["score_diffs"])
    r = {
        "detections": len(a),
        "median_box_iou": float(np.median(a)),
        "frac_box_iou_ge_0.9": float((a >= 0.9).mean()),
        "frac_box_iou_ge_0.5": float((a >= 0.5).mean()),
        "median_score_diff": float(np.median(s)),
    }
    if pooled["mask_ious"]:
        r["median_mask_iou"] = float(np.median(pooled["mask_ious"]))
    return r
