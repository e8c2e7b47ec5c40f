"""mmdetection's test-time conventions in hrnet_d2, checked without mmdetection.

tests/test_mmdet_oracle.py compares whole converted detectors with mmdetection itself; it needs the
oracle installed (CI requires it: $HRNET_D2_REQUIRE_ORACLE, set by .ci/run).  These tests pin the
same conventions by direct computation, so that they are covered where the oracle is not:

* ``MMDetCascadeROIHeads``: the stages' class logits are averaged, then soft-maxed (mmdetection's
  ``CascadeRoIHead``); Detectron2's ``CascadeROIHeads`` averages probabilities (the control).  With a
  mask head, the per-stage mask probabilities are averaged.
* ``INPUT.RESIZE_BACKEND "cv2"``: ``cv2.resize(INTER_LINEAR)`` to mmcv's size
  ``int(w * s + 0.5), int(h * s + 0.5)``, ``s = min(max_size / long side, short / short side)``;
  Detectron2's ``ResizeShortestEdge`` rounds after two scalings and resizes with PIL (the controls).
"""

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from conftest import REPO, REQUIRE_ORACLE, make_cfg, oracle_missing

from detectron2.data import transforms as T
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import Boxes, Instances

from hrnet_d2.data.resize import CV2ResizeShortestEdge, resize_augmentation, use_resize_backend

CASCADE = "COCO-Detection/cascade_rcnn_hrnetv2p_w18_20e_mmdet.yaml"
CASCADE_MASK = "COCO-InstanceSegmentation/cascade_mask_rcnn_hrnetv2p_w18_20e_mmdet.yaml"
NUM_CLASSES = 5
IMAGE = (96, 128)


# ---------------------------------------------------------------- cascade stage ensemble
def _cascade_heads(config, name="MMDetCascadeROIHeads"):
    """Small ROI heads of ``config`` on 16-channel random features; every (proposal, class) pair is kept
    (score threshold 0, NMS at IoU 1, no top-k), so the output scores are the whole score matrix."""
    cfg = make_cfg(
        config,
        "MODEL.ROI_HEADS.NAME", name, "MODEL.ROI_HEADS.NUM_CLASSES", NUM_CLASSES, "MODEL.ROI_BOX_HEAD.FC_DIM", 32,
        "MODEL.ROI_MASK_HEAD.CONV_DIM", 8, "MODEL.ROI_MASK_HEAD.NUM_CONV", 1,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "MODEL.ROI_HEADS.NMS_THRESH_TEST", 1.0,
        "TEST.DETECTIONS_PER_IMAGE", -1,
    )  # fmt: skip
    shapes = {f"p{i}": ShapeSpec(channels=16, stride=2**i) for i in range(2, 7)}
    torch.manual_seed(0)
    heads = build_roi_heads(cfg, shapes).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for predictor in heads.box_predictor:  # spread logits: averaging logits vs probabilities differs clearly
            predictor.cls_score.weight.copy_(torch.randn(predictor.cls_score.weight.shape, generator=g) * 0.3)
            predictor.cls_score.bias.copy_(torch.randn(predictor.cls_score.bias.shape, generator=g))
    return heads


def _features_and_proposals(n=12):
    g = torch.Generator().manual_seed(2)
    h, w = IMAGE
    features = {f"p{i}": torch.randn((1, 16, -(-h // 2**i), -(-w // 2**i)), generator=g) for i in range(2, 7)}
    xy = torch.rand((n, 2), generator=g) * torch.tensor([w * 0.6, h * 0.6])
    wh = 8 + torch.rand((n, 2), generator=g) * torch.tensor([w * 0.3, h * 0.3])
    proposals = Instances(IMAGE, proposal_boxes=Boxes(torch.cat([xy, xy + wh], 1)), objectness_logits=torch.zeros(n))
    return features, [proposals]


def _run_cascade(heads):
    """(instances, the logits of each stage) of one inference."""
    features, proposals = _features_and_proposals()
    stage_logits = []
    hooks = [p.register_forward_hook(lambda m, i, o: stage_logits.append(o[0].detach())) for p in heads.box_predictor]
    try:
        with torch.no_grad():
            instances, _ = heads(None, features, proposals)
    finally:
        for h in hooks:
            h.remove()
    assert len(stage_logits) == heads.num_cascade_stages == 3
    return instances[0], stage_logits


def _score_mismatch(instances, expected_probs):
    """max |score - expected| over (class, rank) pairs: per class, the sorted output scores against the
    sorted column of ``expected_probs`` (N x (K + 1), background last)."""
    assert len(instances) == expected_probs.shape[0] * NUM_CLASSES  # every (proposal, class) pair kept
    worst = 0.0
    for c in range(NUM_CLASSES):
        ours = instances.scores[instances.pred_classes == c].sort().values
        ref = expected_probs[:, c].sort().values
        assert ours.shape == ref.shape, c
        worst = max(worst, float((ours - ref).abs().max()))
    return worst


def test_cascade_scores_are_the_softmax_of_the_mean_stage_logits():
    instances, logits = _run_cascade(_cascade_heads(CASCADE))
    stacked = torch.stack(logits).double()
    mmdet = stacked.mean(0).softmax(-1)  # mmdetection CascadeRoIHead: cls_score = mean of logits, then softmax
    detectron2 = stacked.softmax(-1).mean(0)  # Detectron2 CascadeROIHeads: mean of probabilities
    assert float((mmdet - detectron2).abs().max()) > 0.02  # the two rules are told apart by this data
    assert _score_mismatch(instances, mmdet) <= 1e-6
    assert _score_mismatch(instances, detectron2) > 0.02


def test_negative_control_detectron2_cascade_averages_probabilities():
    """The same measure fails for Detectron2's CascadeROIHeads on the same weights."""
    ours = _cascade_heads(CASCADE)
    theirs = _cascade_heads(CASCADE, name="CascadeROIHeads")
    theirs.load_state_dict(ours.state_dict())
    instances, logits = _run_cascade(theirs)
    stacked = torch.stack(logits).double()
    assert _score_mismatch(instances, stacked.softmax(-1).mean(0)) <= 1e-6  # what Detectron2 computes
    assert _score_mismatch(instances, stacked.mean(0).softmax(-1)) > 0.02


def test_cascade_mask_probabilities_are_the_mean_of_the_stage_heads():
    """mmdetection's CascadeRoIHead.predict_mask: each stage's mask head on the final boxes, the sigmoids
    averaged (not the logits), the predicted class's channel."""
    heads = _cascade_heads(CASCADE_MASK)
    stage_heads = heads.mask_head.heads
    assert len(stage_heads) == 3
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for head in stage_heads:  # logits of a few units: the mean of sigmoids and sigmoid of the mean differ
            head.predictor.weight.copy_(torch.randn(head.predictor.weight.shape, generator=g) * 2.0)
    features, proposals = _features_and_proposals(6)
    boxes = proposals[0].proposal_boxes
    instances = Instances(IMAGE, pred_boxes=boxes, pred_classes=torch.tensor([0, 1, 2, 3, 4, 2]))
    logits = []
    hooks = [h.predictor.register_forward_hook(lambda m, i, o: logits.append(o.detach())) for h in stage_heads]
    try:
        with torch.no_grad():
            out = heads.forward_with_given_boxes(features, [instances])[0]
    finally:
        for h in hooks:
            h.remove()
    assert len(logits) == 3
    rows = torch.arange(len(instances))
    stacked = torch.stack([x[rows, instances.pred_classes] for x in logits]).double()  # (stages, N, M, M)
    expected = stacked.sigmoid().mean(0)[:, None]
    assert out.pred_masks.shape == expected.shape
    assert float((out.pred_masks - expected).abs().max()) <= 1e-6
    # controls: the sigmoid of the mean logit, or the first stage's head alone, are other answers
    assert float((out.pred_masks - stacked.mean(0).sigmoid()[:, None]).abs().max()) > 0.01
    assert float((out.pred_masks - stacked[0].sigmoid()[:, None]).abs().max()) > 0.01


# ---------------------------------------------------------------- the cv2 resize
def _mmcv_rescale(bgr, max_size=1333, short=800):
    """mmcv.imrescale(img, (max_size, short), interpolation="bilinear", backend="cv2"), written out:
    mmcv.rescale_size's scale and rounding, then cv2.resize with INTER_LINEAR."""
    h, w = bgr.shape[:2]
    scale = min(max_size / max(h, w), short / min(h, w))
    size = int(w * float(scale) + 0.5), int(h * float(scale) + 0.5)
    return cv2.resize(bgr, size, interpolation=cv2.INTER_LINEAR)


def _image(seed, h, w):
    r = np.random.default_rng(seed)
    img = r.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return cv2.GaussianBlur(img, (5, 5), 0)  # some structure, so that interpolation choices show


# (99, 258) and (946, 297): Detectron2's two-step rounding gives another size (511 vs 512, 418 vs 419)
SIZES = [(480, 640), (427, 640), (600, 400), (75, 2000), (99, 258), (946, 297), (1000, 1500)]


@pytest.mark.parametrize("h, w", SIZES)
def test_cv2_resize_is_mmcvs_rescale_computed_directly(h, w):
    cfg = make_cfg("COCO-Detection/faster_rcnn_hrnetv2p_w18_1x_mmdet.yaml")
    assert cfg.INPUT.RESIZE_BACKEND == "cv2" and (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (800, 1333)
    bgr = _image(h * w, h, w)
    expected = _mmcv_rescale(bgr)
    test_time = resize_augmentation(cfg).get_transform(bgr)
    ours = test_time.apply_image(bgr)
    assert ours.shape == expected.shape and np.array_equal(ours, expected)
    # the train-time path (use_resize_backend over the mapper's augmentations) is the same resize
    (train_time,) = use_resize_backend(cfg, [T.ResizeShortestEdge((800,), 1333, "choice")])
    assert type(train_time) is CV2ResizeShortestEdge
    assert np.array_equal(train_time.get_transform(bgr).apply_image(bgr), expected)
    # boxes follow the image's size
    box = np.array([[0.0, 0.0, w, h]])
    assert np.allclose(test_time.apply_box(box), [[0, 0, expected.shape[1], expected.shape[0]]])


def test_negative_controls_detectron2s_resize_differs():
    """The measure above fails for Detectron2's own resize: in size where its rounding differs, in
    pixels everywhere (PIL's bilinear filter antialiases when shrinking)."""
    cfg = make_cfg("COCO-Detection/faster_rcnn_hrnetv2p_w18_1x_mmdet.yaml", "INPUT.RESIZE_BACKEND", "PIL")
    pil = resize_augmentation(cfg)
    assert type(pil) is T.ResizeShortestEdge
    sizes_differ = 0
    for h, w in SIZES:
        bgr = _image(h * w, h, w)
        ours, expected = pil.get_transform(bgr).apply_image(bgr), _mmcv_rescale(bgr)
        sizes_differ += ours.shape != expected.shape
        assert not np.array_equal(ours, expected), (h, w)
    assert sizes_differ == 2
    # and a cv2 resize with Detectron2's size rounding
    bgr = _image(0, 99, 258)
    h, w = T.ResizeShortestEdge.get_output_shape(99, 258, 800, 1333)
    assert cv2.resize(bgr, (w, h), interpolation=cv2.INTER_LINEAR).shape != _mmcv_rescale(bgr).shape


# ---------------------------------------------------------------- CI requires the oracle
def test_a_missing_oracle_skips_or_fails_as_required(monkeypatch):
    monkeypatch.delenv(REQUIRE_ORACLE, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no oracle"):
        oracle_missing("no oracle")
    monkeypatch.setenv(REQUIRE_ORACLE, "1")
    with pytest.raises(pytest.fail.Exception, match=f"no oracle .{REQUIRE_ORACLE} is set"):
        oracle_missing("no oracle")
    # .ci/run sets the flag (scripts/test.sh installs the oracle first)
    assert f"export {REQUIRE_ORACLE}=1" in (REPO / ".ci" / "run").read_text()


def test_the_oracle_file_fails_in_ci_when_mmdetection_is_missing():
    """pytest on tests/test_mmdet_oracle.py with the flag, in a subprocess where ``import mmdet`` fails."""
    code = "import sys, pytest; sys.modules['mmdet'] = None; sys.exit(pytest.main(sys.argv[1:]))"
    args = ["-q", "-p", "no:cacheprovider", "tests/test_mmdet_oracle.py"]
    env = dict(os.environ, **{REQUIRE_ORACLE: "1"})
    run = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    out = run.stdout + run.stderr
    assert run.returncode == pytest.ExitCode.INTERRUPTED, out  # a collection error stops the run
    assert "mmdetection (the oracle) is not installed" in out and f"{REQUIRE_ORACLE} is set" in out, out
