"""Fine-tuning a detector on other classes (issue 18): class-specific layers re-initialised and named,
every other tensor loaded, the whole-detector fit rule, class-name transfer, OUTPUT_DIR checks."""

import logging
import os
import uuid

import cv2
import pytest
import torch
from conftest import make_cfg, run_train_net, tiny_rcnn_cfg
from test_zoo import cache, server  # noqa: F401  (fixtures: the loopback zoo)

from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

from hrnet_d2.checkpoint import AtomicCheckpointer, CheckpointError
from hrnet_d2.checkpoint.class_transfer import coco_class_names, is_class_specific

SHAPES = ["circle", "square", "triangle", "star"]
MASK = ("MODEL.MASK_ON", True, "MODEL.ROI_MASK_HEAD.NUM_CONV", 1, "MODEL.ROI_MASK_HEAD.CONV_DIM", 16)
CASCADE = ("MODEL.ROI_HEADS.NAME", "CascadeROIHeads", "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", True)


def _dataset(classes):
    """A registered (metadata-only) training dataset with these class names."""
    name = f"ft_{uuid.uuid4().hex[:8]}"
    MetadataCatalog.get(name).thing_classes = list(classes)
    return name


def _model(classes, *opts, seed=0):
    cfg = tiny_rcnn_cfg(
        "MODEL.ROI_HEADS.NUM_CLASSES", len(classes), "DATASETS.TRAIN", f"('{_dataset(classes)}',)", *opts
    )
    torch.manual_seed(seed)
    return cfg, build_model(cfg)


def _save(model, path, classes=None):
    data = {"model": model.state_dict()}
    if classes is not None:
        data["thing_classes"] = list(classes)
    torch.save(data, path)
    return str(path)


def _fine_tune_load(cfg, model, path):
    """What train_net.py does with MODEL.WEIGHTS: a copy of the fresh model's tensors, then the load."""
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    AtomicCheckpointer(model, cfg=cfg).load(path)
    return fresh, model.state_dict()


def test_other_class_count_reinitialises_only_class_specific_layers(tmp_path, caplog):
    _, source = _model(coco_class_names(), *MASK, seed=1)
    path = _save(source, tmp_path / "coco80.pth")  # no class names: nothing to transfer
    cfg, model = _model(["widget", "gadget"], *MASK)
    with caplog.at_level(logging.INFO, logger="fvcore"):
        fresh, loaded = _fine_tune_load(cfg, model, path)
    old = source.state_dict()
    reinit = sorted(k for k in loaded if is_class_specific(k))
    assert reinit == sorted(
        f"roi_heads.{m}.{p}"
        for m in ("box_predictor.cls_score", "box_predictor.bbox_pred", "mask_head.predictor")
        for p in ("weight", "bias")
    )
    for k, v in loaded.items():  # the class-specific layers are the model's init, everything else the checkpoint's
        assert torch.equal(v, fresh[k] if k in reinit else old[k]), k
    assert loaded["roi_heads.box_predictor.cls_score.weight"].shape[0] == 3
    lines = [r.getMessage() for r in caplog.records if "re-initialised" in r.getMessage()]
    assert len(lines) == 1 and "Fine-tuning to 2 classes" in lines[0], lines
    for layer in ("box_predictor.cls_score", "box_predictor.bbox_pred", "mask_head.predictor"):
        assert f"roi_heads.{layer}" in lines[0]


def test_class_name_transfer_copies_exactly_the_named_rows(tmp_path, caplog):
    _, source = _model(SHAPES, *MASK, seed=1)
    path = _save(source, tmp_path / "shapes.pth", SHAPES)
    new = ["square", "hexagon", "circle"]  # two names shared (in another order), one new
    cfg, model = _model(new, *MASK)
    with caplog.at_level(logging.INFO, logger="fvcore"):
        fresh, loaded = _fine_tune_load(cfg, model, path)
    old = source.state_dict()
    rows = {"square": 1, "circle": 0}  # new class -> row in the checkpoint
    for layer, per in (("box_predictor.cls_score", 1), ("box_predictor.bbox_pred", 4), ("mask_head.predictor", 1)):
        for p in ("weight", "bias"):
            k = f"roi_heads.{layer}.{p}"
            for j, name in enumerate(new):
                got = loaded[k][per * j : per * (j + 1)]
                want = (
                    old[k][per * rows[name] : per * (rows[name] + 1)]
                    if name in rows
                    else fresh[k][per * j : per * (j + 1)]
                )
                assert torch.equal(got, want), (k, name)
            if layer.endswith("cls_score"):  # background: the checkpoint's
                assert torch.equal(loaded[k][-1], old[k][-1])
            assert loaded[k].shape[0] == per * len(new) + layer.endswith("cls_score")
    lines = [r.getMessage() for r in caplog.records if "Class-name transfer" in r.getMessage()]
    assert len(lines) == 1 and "2 of the 3 classes" in lines[0] and "square, circle; fresh: hexagon" in lines[0]
    assert "MODEL.CLASS_NAME_TRANSFER False" in lines[0]

    # the switch: every class-specific row fresh, the rest still loaded
    cfg, model = _model(new, *MASK, "MODEL.CLASS_NAME_TRANSFER", False)
    fresh, loaded = _fine_tune_load(cfg, model, path)
    for k, v in loaded.items():
        assert torch.equal(v, fresh[k] if is_class_specific(k) else old[k]), k
    # negative control: no names in the checkpoint, nothing is transferred
    cfg, model = _model(new, *MASK)
    fresh, loaded = _fine_tune_load(cfg, model, _save(source, tmp_path / "anonymous.pth"))
    assert torch.equal(
        loaded["roi_heads.box_predictor.cls_score.weight"], fresh["roi_heads.box_predictor.cls_score.weight"]
    )


def test_same_classes_in_another_order_are_permuted(tmp_path):
    _, source = _model(SHAPES, seed=1)
    path = _save(source, tmp_path / "shapes.pth", SHAPES)
    cfg, model = _model(SHAPES[::-1])
    _, loaded = _fine_tune_load(cfg, model, path)
    old = source.state_dict()["roi_heads.box_predictor.cls_score.weight"]
    assert torch.equal(loaded["roi_heads.box_predictor.cls_score.weight"], old[[3, 2, 1, 0, 4]])


def test_dense_detector_classifier_is_class_specific(tmp_path):
    """RetinaNet's classifier (anchors x classes rows) is re-initialised, not a reason to stop."""
    config = "shapes/retinanet_hrnetv2p_w18_small_shapes.yaml"
    torch.manual_seed(1)
    source = build_model(make_cfg(config, "MODEL.RETINANET.NUM_CLASSES", 80))
    path = _save(source, tmp_path / "retinanet80.pth")
    cfg = make_cfg(config, "MODEL.RETINANET.NUM_CLASSES", 3, "DATASETS.TRAIN", f"('{_dataset(['a', 'b', 'c'])}',)")
    torch.manual_seed(0)
    fresh, loaded = _fine_tune_load(cfg, build_model(cfg), path)
    old = source.state_dict()
    for k, v in loaded.items():
        assert torch.equal(v, fresh[k] if k.startswith("head.cls_score.") else old[k]), k


def _drop(state, prefix):
    return {k: v for k, v in state.items() if not k.startswith(prefix)}


@pytest.mark.parametrize(
    "opts, drop, layers",
    [
        (MASK, "roi_heads.mask_head.", ["roi_heads.mask_head"]),
        (CASCADE, "roi_heads.box_", ["roi_heads.box_head.2", "roi_heads.box_predictor.2"]),
        ((), "proposal_generator.", ["proposal_generator.rpn_head"]),
    ],
    ids=["mask_head", "cascade_stage", "rpn_head"],
)
def test_fit_rule_stops_a_checkpoint_missing_a_layer(tmp_path, opts, drop, layers):
    cfg, source = _model(["a", "b", "c"], *opts, seed=1)
    state = source.state_dict()
    if "box_" in drop:  # the third cascade stage only
        state = {k: v for k, v in state.items() if not (k.startswith(drop) and ".2." in k)}
    else:
        state = _drop(state, drop)
    path = str(tmp_path / "partial.pth")
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError) as e:
        AtomicCheckpointer(build_model(cfg), cfg=cfg).load(path)
    msg = str(e.value)
    assert "\n" not in msg and f"MODEL.WEIGHTS {path} would leave layers" in msg
    assert all(layer in msg for layer in layers), msg
    assert "MODEL.HRNET.ALLOW_PARTIAL_WEIGHTS True" in msg
    # negative control: the switch lets the same checkpoint load
    cfg.MODEL.HRNET.ALLOW_PARTIAL_WEIGHTS = True
    AtomicCheckpointer(build_model(cfg), cfg=cfg).load(path)


def test_fit_rule_lets_a_backbone_checkpoint_through(tmp_path):
    cfg, source = _model(["a", "b", "c"], *MASK, seed=1)
    path = str(tmp_path / "body.pth")
    torch.save({"model": {k: v for k, v in source.state_dict().items() if k.startswith("backbone.")}}, path)
    AtomicCheckpointer(build_model(cfg), cfg=cfg).load(path)  # ImageNet-style: heads start from init


def test_fit_rule_for_a_lazy_config(tmp_path):
    from omegaconf import OmegaConf

    cfg, source = _model(["a", "b", "c"], *MASK, seed=1)
    path = str(tmp_path / "no_mask.pth")
    torch.save({"model": _drop(source.state_dict(), "roi_heads.mask_head.")}, path)
    lazy = OmegaConf.create({"train": {"init_checkpoint": path}, "dataloader": {}})
    with pytest.raises(
        CheckpointError, match=r"train.init_checkpoint .* roi_heads.mask_head .*train.allow_partial_weights=True"
    ):
        AtomicCheckpointer(build_model(cfg), cfg=lazy).load(path)
    lazy.train.allow_partial_weights = True
    AtomicCheckpointer(build_model(cfg), cfg=lazy).load(path)


def test_our_checkpoints_store_the_class_names(tmp_path):
    cfg, model = _model(["a", "b", "c"])
    AtomicCheckpointer(model, str(tmp_path), cfg=cfg).save("model_x")
    assert torch.load(tmp_path / "model_x.pth", weights_only=True)["thing_classes"] == ["a", "b", "c"]


@pytest.mark.parametrize("script", ["train_net.py", "lazy_train_net.py"])
def test_output_dir_that_cannot_be_created(tmp_path, script):
    import subprocess
    import sys

    from conftest import REPO

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    if script == "train_net.py":
        args = ["--config-file", REPO / "configs/shapes/Base-HRNetV2p-shapes.yaml", "OUTPUT_DIR", blocker / "out"]
        key = "OUTPUT_DIR"
    else:
        args = [
            "--config-file",
            REPO / "configs/lazy/mask_rcnn_hrnetv2p_w18_small_shapes.py",
            f"train.output_dir={blocker / 'out'}",
        ]
        key = "train.output_dir"
    proc = subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {key} = '{blocker / 'out'}' cannot be created or written: Not a directory. "
        f"Choose another folder (e.g. {key} ./output/run1)"
    ], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- Cascade Mask R-CNN: per-stage mask heads train
MMDET_CASCADE = (
    "MODEL.ROI_HEADS.NAME", "MMDetCascadeROIHeads", "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", True,
    "MODEL.ROI_BOX_CASCADE_HEAD.IOUS", (0.5, 0.6, 0.7), *MASK,
)  # fmt: skip


def _training_losses(weights, seed=0):
    from detectron2.structures import BitMasks, Boxes, Instances
    from detectron2.utils.events import EventStorage

    cfg = tiny_rcnn_cfg(*MMDET_CASCADE, "MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS", weights)
    torch.manual_seed(seed)
    model = build_model(cfg).train()
    image = torch.zeros(3, 96, 128)
    masks = torch.zeros(2, 96, 128, dtype=torch.bool)
    masks[0, 10:50, 10:60] = True
    masks[1, 40:90, 70:120] = True
    image[:, masks[0]] = 200
    image[1:, masks[1]] = 120
    gt = Instances((96, 128), gt_boxes=Boxes(torch.tensor([[10.0, 10, 60, 50], [70, 40, 120, 90]])))
    gt.gt_classes = torch.tensor([0, 2])
    gt.gt_masks = BitMasks(masks)
    torch.manual_seed(seed + 1)
    with EventStorage():
        losses = model([{"image": image, "instances": gt, "height": 96, "width": 128}])
    return model, losses


def test_cascade_per_stage_mask_heads_train_with_the_stage_loss_weights():
    model, ones = _training_losses((1.0, 1.0, 1.0))
    assert {f"loss_mask_stage{k}" for k in range(3)} <= set(ones), sorted(ones)
    sum(ones.values()).backward()
    for k, head in enumerate(model.roi_heads.mask_head.heads):  # every stage's head is trained
        assert head.predictor.weight.grad is not None and head.predictor.weight.grad.abs().sum() > 0, k
    _, weighted = _training_losses((1.0, 0.5, 0.25))
    for name, v in ones.items():  # the same forward, each stage's losses scaled by its weight
        w = {"stage1": 0.5, "stage2": 0.25}.get(name.rsplit("_", 1)[-1], 1.0)
        torch.testing.assert_close(weighted[name], v * w, msg=name)


# ---------------------------------------------------------------- end to end, through train_net.py
def _two_class_splits(root, names):
    """Generated shapes splits (96 px) with two classes (circle, square) renamed ``names``."""
    import json

    from hrnet_d2.data.shapes import generate_split

    out = []
    for split, n in (("two_train", 6), ("two_val", 3)):
        path = generate_split(root, split, n, size=96, seed=5, classes=("circle", "square"))
        data = json.loads(path.read_text())
        for c, name in zip(data["categories"], names):
            c["name"] = name
        path.write_text(json.dumps(data))
        out.append(f"mine_{split[4:]}={path}:{path.parents[1] / split}")
    return out


def _fine_tune_args(tmp_path, datasets, config, weights, *opts):
    args = [
        "--config-file", config, "--dataset", datasets[0], "--dataset", datasets[1],
        "DATASETS.TRAIN", "('mine_train',)", "DATASETS.TEST", "('mine_val',)", "MODEL.WEIGHTS", weights,
        "MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.REFERENCE_WORLD_SIZE", "0",
        "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "(1,)", "SOLVER.BASE_LR", "0.001",
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "96",
        "INPUT.MAX_SIZE_TEST", "96", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", tmp_path / "out", *opts,
    ]  # fmt: skip
    return args


ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.mark.e2e
def test_fine_tune_a_published_80_class_detector_by_name(server, cache, monkeypatch, timm_small, tmp_path):  # noqa: F811
    """hrnet_d2://coco/<name> (an 80-class mmdetection checkpoint on the loopback server), fine-tuned
    to 2 classes with --dataset: NUM_CLASSES from the data, class layers re-initialised, "person"
    transferred from COCO's rows, every other tensor loaded, AP evaluated."""
    import yaml
    from test_zoo import FASTER, SMALL, _coco_entry, _path, _serialized, mmdet_faster_rcnn_state_dict

    from hrnet_d2.checkpoint import zoo
    from hrnet_d2.config import CONFIG_DIR

    config = tmp_path / "faster_rcnn_hrnetv2p_w18_small_coco.yaml"  # the zoo model's config: 80 classes
    config.write_text(
        yaml.safe_dump(
            {"_BASE_": str(CONFIG_DIR / FASTER), "MODEL": {"HRNET": {"ARCH": SMALL}, "ROI_BOX_HEAD": {"FC_DIM": 32}}}
        )
    )
    cfg = make_cfg(str(config))
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 80
    torch.manual_seed(1)
    ours = build_model(cfg).state_dict()
    sd = mmdet_faster_rcnn_state_dict(timm_small, ours, reduction_std=0.05, neck_biases=False)
    data = _serialized({"meta": {"epoch": 12}, "state_dict": sd})
    entry = _coco_entry(data, config)
    monkeypatch.setitem(zoo.ZOO, entry.name, entry)
    server.files[_path(entry.url)] = data
    # the subprocess needs the patched table: a sitecustomize-free way is the converted file in the cache
    from detectron2.utils.file_io import PathManager

    PathManager.get_local_path(f"hrnet_d2://{entry.name}")  # downloaded (loopback), checked, converted, cached

    datasets = _two_class_splits(tmp_path / "data", ("person", "widget"))
    proc = run_train_net(
        _fine_tune_args(tmp_path, datasets, config, f"hrnet_d2://{entry.name}"), cwd=tmp_path, env=ENV, timeout=900
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "MODEL.ROI_HEADS.NUM_CLASSES = 2, from the categories of ['mine_train'] (the config said 80)" in log
    reinit = [line for line in log.splitlines() if "are re-initialised for the new class count" in line]
    assert len(reinit) == 1 and "Fine-tuning to 2 classes" in reinit[0], reinit
    assert "roi_heads.box_predictor.bbox_pred, roi_heads.box_predictor.cls_score; every other" in reinit[0]
    transfer = [line for line in log.splitlines() if "Class-name transfer" in line]
    assert len(transfer) == 1 and "1 of the 2 classes" in transfer[0] and ": person; fresh: widget" in transfer[0]
    assert "copypaste: AP,AP50" in log and "Evaluation results for bbox" in log
    final = torch.load(tmp_path / "out" / "model_final.pth", weights_only=True)
    assert (
        final["thing_classes"] == ["person", "widget"]
        and final["model"]["roi_heads.box_predictor.cls_score.weight"].shape[0] == 3
    )


@pytest.mark.e2e
def test_cascade_mask_rcnn_fine_tunes_from_its_mmdetection_checkpoint(tmp_path):
    """The published Cascade Mask R-CNN layout (mmdetection's own model, random weights, saved by
    mmdetection's conventions), fine-tuned as it is with its zoo config: converted on the fly, every
    tensor but the class layers loaded, the three per-stage mask heads trained."""
    mo = pytest.importorskip("mmdet_oracle")
    if not mo.install_ext_stand_in():
        pytest.skip("mmdetection (the oracle) is not installed")
    import numpy as np

    datasets = _two_class_splits(tmp_path / "data", ("circle", "square"))
    image_dir = datasets[0].rsplit(":", 1)[1]
    calibration = cv2.imread(os.path.join(image_dir, sorted(os.listdir(image_dir))[0]))[:, :, ::-1]
    # BN statistics from an image like the training data (frozen in training: BNEval), heads that detect
    name = "cascade-mask-rcnn_hrnetv2p-w18_20e_coco"
    mm = mo.randomly_initialised_detector(
        mo.mmdet_config(name, test_scale=(160, 96)), np.ascontiguousarray(calibration)
    )
    weights = tmp_path / "cascade_mask_rcnn_hrnetv2p_w18_20e_coco.pth"
    mo.save_mmdet_checkpoint(mm, weights)
    from conftest import CONFIGS

    config = CONFIGS / "COCO-InstanceSegmentation/cascade_mask_rcnn_hrnetv2p_w18_20e_mmdet.yaml"
    args = _fine_tune_args(tmp_path, datasets, config, weights, "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()")
    proc = run_train_net(args, cwd=tmp_path, env=ENV, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "Traceback" not in log and "converted on the fly" in log
    reinit = next(line for line in log.splitlines() if "are re-initialised for the new class count" in line)
    for k in range(3):
        assert (
            f"roi_heads.box_predictor.{k}.cls_score" in reinit and f"roi_heads.mask_head.heads.{k}.predictor" in reinit
        )
    assert "box_predictor.0.bbox_pred" not in reinit  # class-agnostic box regression: loaded
    import json

    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.json").read_text().splitlines()]
    losses = metrics[-1]
    assert all(np.isfinite(losses[f"loss_mask_stage{k}"]) for k in range(3)), sorted(losses)
