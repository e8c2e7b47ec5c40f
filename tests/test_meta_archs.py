"""Stock Detectron2 meta-architectures on HRNet: the COCO configs build, and each
shapes config trains a few iterations on generated data and is evaluated."""

import math

import numpy as np
import pytest
import torch
from conftest import make_cfg

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.modeling.meta_arch import GeneralizedRCNN, PanopticFPN, RetinaNet, SemanticSegmentor
from detectron2.modeling.roi_heads import CascadeROIHeads

from hrnet_d2 import FCOSDetector, HRNetV2p
from hrnet_d2.data.shapes import register_shapes
from hrnet_d2.data.shapes_extras import KEYPOINT_NAMES, keypoints_from_polygon, register_shapes_extras
from hrnet_d2.engine import Trainer

COCO_CONFIGS = {
    "COCO-Detection/cascade_rcnn_hrnetv2p_w32_1x.yaml": (GeneralizedRCNN, ["p2", "p3", "p4", "p5", "p6"]),
    "COCO-InstanceSegmentation/cascade_mask_rcnn_hrnetv2p_w32_1x.yaml": (GeneralizedRCNN, None),
    "COCO-Detection/retinanet_hrnetv2p_w32_1x.yaml": (RetinaNet, ["p2", "p3", "p4", "p5", "p6", "p7"]),
    "COCO-Keypoints/keypoint_rcnn_hrnetv2p_w32_1x.yaml": (GeneralizedRCNN, None),
    "COCO-PanopticSegmentation/panoptic_fpn_hrnetv2p_w32_1x.yaml": (
        PanopticFPN,
        ["hr2", "hr3", "hr4", "hr5", "hrv2", "p2", "p3", "p4", "p5", "p6"],
    ),
    "Cityscapes/semantic_hrnetv2_w48.yaml": (SemanticSegmentor, ["hrv2"]),
    "COCO-Detection/fcos_hrnetv2p_w18_1x_mmdet.yaml": (FCOSDetector, ["p3", "p4", "p5", "p6", "p7"]),
}


@pytest.fixture(scope="module", autouse=True)
def datasets():
    register_shapes()
    register_shapes_extras()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny tensors: a second OpenMP thread only adds spin-waiting (10x slower on a busy 2-core box)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("config", sorted(COCO_CONFIGS))
def test_coco_config_builds(config):
    cls, features = COCO_CONFIGS[config]
    # SyncBN needs a process group; the structure is the same with BN
    cfg = make_cfg(config, "MODEL.HRNET.NORM", "FrozenBN", "MODEL.SEM_SEG_HEAD.NORM", "GN")
    model = build_model(cfg)
    assert type(model) is cls
    shapes = model.backbone.output_shape()
    if features is not None:
        assert sorted(shapes) == sorted(features)
    if cls in (RetinaNet, FCOSDetector):
        assert [shapes[f].stride for f in model.head_in_features] == [8, 16, 32, 64, 128]
    if "cascade" in config:
        assert isinstance(model.roi_heads, CascadeROIHeads) and len(model.roi_heads.box_predictor) == 3
    if "keypoint" in config:
        assert model.roi_heads.keypoint_on and model.roi_heads.keypoint_head.score_lowres.out_channels == 17
    if cls is PanopticFPN:
        assert isinstance(model.backbone, HRNetV2p) and model.backbone.keep_body_outputs
        assert model.sem_seg_head.in_features == ["hrv2"] and shapes["hrv2"].channels == 32 * 15


def test_keypoints_from_polygon():
    # a square rotated 45 degrees: its vertices are the extremes
    poly = [[10, 0], [20, 10], [10, 20], [0, 10]]
    kp = np.asarray(keypoints_from_polygon(poly)).reshape(-1, 3)
    named = dict(zip(KEYPOINT_NAMES, kp[:, :2].tolist()))
    assert named == {"top": [10, 0], "bottom": [10, 20], "left": [0, 10], "right": [20, 10], "center": [10, 10]}
    assert (kp[:, 2] == 2).all()


def test_extra_datasets_derive_from_instances():
    base = DatasetCatalog.get("shapes_tiny_train")
    kps = DatasetCatalog.get("shapes_tiny_train_keypoints")
    sem = DatasetCatalog.get("shapes_tiny_train_sem_seg")
    pan = DatasetCatalog.get("shapes_tiny_train_panoptic_separated")
    assert len(base) == len(kps) == len(sem) == len(pan)
    meta = MetadataCatalog.get("shapes_tiny_train_keypoints")
    assert meta.thing_classes == ["shape"] and meta.keypoint_flip_map == [("left", "right")]
    import cv2

    for b, k, s, p in zip(base, kps, sem, pan):
        assert len(b["annotations"]) == len(k["annotations"]) == len(p["annotations"])
        assert all(a["category_id"] == 0 and len(a["keypoints"]) == 15 for a in k["annotations"])
        semantic = cv2.imread(s["sem_seg_file_name"], cv2.IMREAD_UNCHANGED)
        stuff = cv2.imread(p["sem_seg_file_name"], cv2.IMREAD_UNCHANGED)
        assert semantic.shape == (b["height"], b["width"])
        # every instance's class shows up in the semantic map, its centre is labelled with it
        for a in b["annotations"]:
            x, y, w, h = a["bbox"]
            poly = np.asarray(a["segmentation"][0]).reshape(-1, 2)
            cx, cy = np.round(poly.mean(0)).astype(int)
            assert semantic[cy, cx] == a["category_id"] + 1
        assert set(np.unique(semantic)) <= set(range(5)) and set(np.unique(stuff)) <= {0, 1}
        assert ((semantic > 0) == (stuff == 0)).all()


TINY = {"shapes_train": "shapes_tiny_train", "shapes_val": "shapes_tiny_val"}

SHAPES_CONFIGS = {
    "cascade_rcnn_hrnetv2p_w18_small_shapes.yaml": ["bbox"],
    "cascade_mask_rcnn_hrnetv2p_w18_small_shapes.yaml": ["bbox", "segm"],
    "htc_hrnetv2p_w18_small_shapes.yaml": ["bbox", "segm"],
    "retinanet_hrnetv2p_w18_small_shapes.yaml": ["bbox"],
    "fcos_hrnetv2p_w18_small_shapes.yaml": ["bbox"],
    "keypoint_rcnn_hrnetv2p_w18_small_shapes.yaml": ["bbox", "keypoints"],
    "panoptic_fpn_hrnetv2p_w18_small_shapes.yaml": ["sem_seg", "bbox", "segm"],
    "semantic_hrnetv2_w18_small_shapes.yaml": ["sem_seg"],
}


def tiny_cfg(config, output_dir, iters=2):
    cfg = make_cfg(f"shapes/{config}")
    # the coarsest level must be >= 1 pixel: p7 (stride 128) needs 128 px inputs
    size = max(96, cfg.MODEL.BACKBONE.NAME != "build_hrnet_backbone" and 2 ** (cfg.MODEL.HRNET_PYRAMID.NUM_LEVELS + 1))
    tiny = lambda names: tuple(
        n.replace("shapes_train", TINY["shapes_train"]).replace("shapes_val", TINY["shapes_val"]) for n in names
    )  # noqa
    cfg.DATASETS.TRAIN = tiny(cfg.DATASETS.TRAIN)
    cfg.DATASETS.TEST = tiny(cfg.DATASETS.TEST)
    cfg.merge_from_list(
        [
            "SOLVER.MAX_ITER",
            iters,
            "SOLVER.IMS_PER_BATCH",
            2,
            "SOLVER.WARMUP_ITERS",
            1,
            "SOLVER.STEPS",
            (),
            "DATALOADER.NUM_WORKERS",
            0,
            "INPUT.MIN_SIZE_TRAIN",
            (size,),
            "INPUT.MAX_SIZE_TRAIN",
            size,
            "INPUT.MIN_SIZE_TEST",
            size,
            "INPUT.MAX_SIZE_TEST",
            size,
            "OUTPUT_DIR",
            str(output_dir),
        ]
    )
    return cfg


# trainable parameters that two iterations on 96/128-px images may leave without a gradient
_P6 = ("backbone.fpn_convs.4.",)  # p6: RPN-only, its 2x2 locations' anchors are sampled (or not) by chance
MAY_GET_NO_GRADIENT = {
    "cascade_rcnn_hrnetv2p_w18_small_shapes.yaml": _P6,
    "cascade_mask_rcnn_hrnetv2p_w18_small_shapes.yaml": _P6,
    "keypoint_rcnn_hrnetv2p_w18_small_shapes.yaml": _P6,
    "panoptic_fpn_hrnetv2p_w18_small_shapes.yaml": _P6,
    # p2 of the 6-level pyramid is computed but not used by RetinaNet (IN_FEATURES p3..p7): never trained
    "retinanet_hrnetv2p_w18_small_shapes.yaml": ("backbone.fpn_convs.0.",),
    # FCOS's regression scales of p4..p7: a box is regressed on the level of its size (p3: up to 64 px),
    # and the shapes' objects on 128-px images hardly reach p4
    "fcos_hrnetv2p_w18_small_shapes.yaml": tuple(f"head.scales.{i}" for i in range(1, 5)),
}


@pytest.mark.parametrize("config", sorted(SHAPES_CONFIGS))
def test_shapes_config_trains_and_evaluates(config, tmp_path):
    """Every trainable parameter is trained: each gets a non-zero gradient in some iteration (a head,
    pyramid level or body branch cut off from the loss gets none), and the weights move."""
    cfg = tiny_cfg(config, tmp_path)
    trainer = Trainer(cfg)
    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    reached = set()
    hooks = [
        p.register_post_accumulate_grad_hook(lambda p, n=n: reached.add(n) if bool(p.grad.any()) else None)
        for n, p in trainable.items()
    ]
    try:
        trainer.train()
    finally:
        for h in hooks:
            h.remove()
    results = trainer._last_eval_results
    history = trainer.storage.histories()
    assert history["total_loss"].values() and all(math.isfinite(v) for v, _ in history["total_loss"].values())
    missed = sorted(n for n in trainable if n not in reached)
    assert [n for n in missed if not n.startswith(MAY_GET_NO_GRADIENT.get(config, ()))] == [], missed
    assert any(not torch.equal(before[n], p) for n, p in trainable.items()), "training changed no weight"
    # end-of-training evaluation ran the evaluators matching the dataset (engine.Trainer.build_evaluator)
    assert sorted(results) == sorted(SHAPES_CONFIGS[config])
    if "sem_seg" in results:
        assert 0 <= results["sem_seg"]["mIoU"] <= 100
    if "keypoints" in results:
        assert "AP" in results["keypoints"]


HTC_GROUPS = [
    "backbone.bottom_up.",
    "backbone.fpn_convs.",
    "proposal_generator.",
    *[f"roi_heads.box_head.{k}." for k in range(3)],
    *[f"roi_heads.box_predictor.{k}." for k in range(3)],
    *[f"roi_heads.mask_head.heads.{k}.mask_fcn" for k in range(3)],
    *[f"roi_heads.mask_head.heads.{k}.predictor." for k in range(3)],
    "roi_heads.mask_head.heads.1.conv_res.",
    "roi_heads.mask_head.heads.2.conv_res.",
    "roi_heads.semantic_head.lateral_convs.",
    "roi_heads.semantic_head.convs.",
    "roi_heads.semantic_head.conv_embedding.",
]


def _train_htc(tmp_path, *opts):
    cfg = tiny_cfg("htc_hrnetv2p_w18_small_shapes.yaml", tmp_path, iters=3)
    cfg.merge_from_list(["TEST.EVAL_PERIOD", 0, "DATASETS.TEST", (), *opts])
    trainer = Trainer(cfg)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    history = trainer.storage.histories()
    assert all(math.isfinite(v) for v, _ in history["total_loss"].values())
    for k in range(3):
        for name in (f"loss_cls_stage{k}", f"loss_box_reg_stage{k}", f"loss_mask_stage{k}"):
            assert name in history and all(math.isfinite(v) for v, _ in history[name].values()), name
    moved = {k for k, v in trainer.model.named_parameters() if not torch.equal(before[k], v.detach())}
    still = [g for g in HTC_GROUPS if not any(k.startswith(g) for k in moved)]
    assert not still, f"groups that did not move: {still}"
    return trainer, history, moved


def test_htc_trains_every_stage_and_branch(tmp_path):
    """Hybrid Task Cascade (hrnet_d2/modeling/htc.py) on the shapes data with label maps (panoptic-separated
    split): each stage's box and mask losses and the semantic loss are finite, and every trainable group moves
    (each stage's box and mask head, the conv_res of stages 1-2, the whole semantic head)."""
    trainer, history, moved = _train_htc(tmp_path)
    assert "loss_semantic_seg" in history and all(math.isfinite(v) for v, _ in history["loss_semantic_seg"].values())
    assert any(k.startswith("roi_heads.semantic_head.conv_logits.") for k in moved)
    assert all(p.requires_grad for p in trainer.model.parameters())


def test_htc_without_label_maps_says_so(tmp_path, caplog):
    """Without label maps (GeneralizedRCNN, instance-only data) the semantic branch trains through the box and
    mask losses only; a log line says so and its classifier, which no loss reaches, is frozen."""
    import logging

    with caplog.at_level(logging.INFO, logger="hrnet_d2.modeling.htc"):
        trainer, history, moved = _train_htc(
            tmp_path, "MODEL.META_ARCHITECTURE", "GeneralizedRCNN", "DATASETS.TRAIN", ("shapes_tiny_train",)
        )
    assert any("without mmdetection's loss_semantic_seg" in r.getMessage() for r in caplog.records)
    assert "loss_semantic_seg" not in history
    frozen = [k for k, v in trainer.model.named_parameters() if not v.requires_grad]
    assert frozen == ["roi_heads.semantic_head.conv_logits.weight", "roi_heads.semantic_head.conv_logits.bias"]
    assert not any(k.startswith("roi_heads.semantic_head.conv_logits.") for k in moved)


def test_htc_samples_every_stage_afresh_as_mmdetection(tmp_path, monkeypatch):
    """MODEL.HTC.RESAMPLE_STAGES (on): each stage, and each interleaved mask step, assigns its boxes plus the
    exact ground truth at its own IoU and samples BATCH_SIZE_PER_IMAGE with at most POSITIVE_FRACTION
    positives; the regressed boxes minus the appended ground truth are the next step's input.  Off: the sampler
    is never called (Detectron2's relabelling), the control that the recording below sees the switch."""
    from detectron2.structures import pairwise_iou

    from hrnet_d2.modeling.htc import HybridTaskCascadeROIHeads

    calls = []
    real = HybridTaskCascadeROIHeads._sample_stage

    def record(self, boxes, targets, stage):
        out = real(self, boxes, targets, stage)
        calls.append((stage, [b.tensor.clone() for b in boxes], targets, out, self.proposal_matchers[stage]))
        return out

    monkeypatch.setattr(HybridTaskCascadeROIHeads, "_sample_stage", record)
    opts = ("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16, "MODEL.ROI_HEADS.POSITIVE_FRACTION", 0.25)
    cfg = tiny_cfg("htc_hrnetv2p_w18_small_shapes.yaml", tmp_path, iters=1)
    cfg.merge_from_list(["TEST.EVAL_PERIOD", 0, "DATASETS.TEST", (), *opts])
    Trainer(cfg).train()
    assert [c[0] for c in calls] == [0, 0, 1, 1, 2, 2], "one sample per stage and per interleaved mask step"
    for i, (stage, boxes, targets, out, matcher) in enumerate(calls):
        threshold = matcher.thresholds[1]
        assert threshold == cfg.MODEL.ROI_BOX_CASCADE_HEAD.IOUS[stage]
        for gt, props in zip(targets, out):
            fg = props.gt_classes < cfg.MODEL.ROI_HEADS.NUM_CLASSES
            assert len(props) <= 16 and int(fg.sum()) <= 4
            iou = pairwise_iou(props.proposal_boxes, props.gt_boxes).diagonal()
            assert bool((iou[fg] >= threshold).all()), "positives overlap their ground truth by the stage's IoU"
            best = pairwise_iou(props.proposal_boxes, gt.gt_boxes).max(dim=1).values
            assert bool((best[~fg] < threshold).all()), "negatives overlap no ground truth that much"
            appended = props.proposal_boxes.tensor[props.from_gt]  # the ground-truth boxes, exactly
            assert bool((appended[:, None] == gt.gt_boxes.tensor[None]).all(-1).any(1).all())
            assert len(appended) <= len(gt) and bool(fg[props.from_gt].all())
        if i % 2 == 1:  # a mask step and the next stage get the same regressed boxes
            if i + 1 < len(calls):
                assert all(torch.equal(x, y) for x, y in zip(boxes, calls[i + 1][1]))
            prev = calls[i - 1][3]
            assert [len(x) for x in boxes] == [int((~p.from_gt).sum()) for p in prev]
    calls.clear()
    cfg = tiny_cfg("htc_hrnetv2p_w18_small_shapes.yaml", tmp_path / "d2", iters=1)
    cfg.merge_from_list(["TEST.EVAL_PERIOD", 0, "DATASETS.TEST", (), *opts, "MODEL.HTC.RESAMPLE_STAGES", False])
    Trainer(cfg).train()
    assert calls == []
