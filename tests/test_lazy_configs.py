"""LazyConfig (Python) configs build the same models as their YAML twins, and
lazy_train_net.py trains / evaluates from them."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, make_cfg, retry_if_port_taken

from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model

from hrnet_d2 import get_config_file

PAIRS = {
    "lazy/faster_rcnn_hrnetv2p_w32_1x.py": "COCO-Detection/faster_rcnn_hrnetv2p_w32_1x.yaml",
    "lazy/mask_rcnn_hrnetv2p_w32_1x.py": "COCO-InstanceSegmentation/mask_rcnn_hrnetv2p_w32_1x.yaml",
    "lazy/mask_rcnn_hrnetv2p_w18_small_shapes.py": "shapes/mask_rcnn_hrnetv2p_w18_small_shapes.yaml",
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _inference_settings(model):
    """The inference hyper-parameters of an R-CNN that no weight carries (thresholds, top-k, NMS)."""
    rpn, box = model.proposal_generator, model.roi_heads.box_predictor
    return {
        "rpn.pre_nms_topk": rpn.pre_nms_topk[False],
        "rpn.post_nms_topk": rpn.post_nms_topk[False],
        "rpn.nms_thresh": rpn.nms_thresh,
        "rpn.min_box_size": rpn.min_box_size,
        "box.test_score_thresh": box.test_score_thresh,
        "box.test_nms_thresh": box.test_nms_thresh,
        "box.test_topk_per_image": box.test_topk_per_image,
    }


def _same_detections(lazy_model, yaml_model, image):
    """Both models' instances on ``image``: as many (at least one), same boxes and scores."""
    with torch.no_grad():
        a = lazy_model([{"image": image}])[0]["instances"]
        b = yaml_model([{"image": image}])[0]["instances"]
    assert len(a) == len(b) > 0
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor)
    torch.testing.assert_close(a.scores, b.scores)
    return a, b


@pytest.mark.parametrize("lazy", sorted(PAIRS))
def test_lazy_config_equals_yaml_model(lazy, tmp_path):
    """Same modules, same inference settings, same test-time mapping of an image file, and (with the same
    weights) the same detections."""
    import cv2

    from hrnet_d2.data.mapper import CheckedDatasetMapper

    torch.manual_seed(0)
    cfg = LazyConfig.load(get_config_file(lazy))
    lazy_model = instantiate(cfg.model).eval()
    yaml_cfg = make_cfg(PAIRS[lazy])
    yaml_model = build_model(yaml_cfg).eval()
    assert _inference_settings(lazy_model) == _inference_settings(yaml_model)
    assert _inference_settings(yaml_model)["box.test_score_thresh"] > 0

    # the test loaders' mappers (lazy: dataloader.test.mapper; YAML: what Trainer.build_test_loader uses)
    rgb = np.random.default_rng(0).integers(0, 256, (240, 330, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "image.png"), rgb[:, :, ::-1])
    record = {"file_name": str(tmp_path / "image.png"), "height": 240, "width": 330, "image_id": 0}
    lazy_in = instantiate(cfg.dataloader.test.mapper)(dict(record))
    yaml_in = CheckedDatasetMapper(yaml_cfg, False)(dict(record))
    assert lazy_in["image"].shape == yaml_in["image"].shape and lazy_in["image"].shape[1:] != (240, 330)
    assert torch.equal(lazy_in["image"], yaml_in["image"])

    lazy_sd, yaml_sd = lazy_model.state_dict(), yaml_model.state_dict()
    assert {k: v.shape for k, v in lazy_sd.items()} == {k: v.shape for k, v in yaml_sd.items()}
    count = lambda m, trainable=False: sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable)  # noqa
    assert count(lazy_model) == count(yaml_model)
    assert count(lazy_model, True) == count(yaml_model, True)
    assert lazy_model.backbone.output_shape() == yaml_model.backbone.output_shape()
    assert lazy_model.input_format == yaml_model.input_format == "RGB"
    assert torch.equal(lazy_model.pixel_mean, yaml_model.pixel_mean)
    assert lazy_model.roi_heads.mask_on == yaml_model.roi_heads.mask_on

    # same weights -> same outputs, so every hyper-parameter that acts at inference agrees
    lazy_model.load_state_dict(yaml_sd)
    for m in (lazy_model, yaml_model):  # random weights score ~1/num_classes: keep every box
        m.roi_heads.box_predictor.test_score_thresh = 0.0
    a, b = _same_detections(lazy_model, yaml_model, torch.rand(3, 96, 128) * 255)
    if a.has("pred_masks"):
        torch.testing.assert_close(a.pred_masks, b.pred_masks)


def test_lazy_config_override_arch():
    cfg = LazyConfig.load(get_config_file("lazy/faster_rcnn_hrnetv2p_w32_1x.py"))
    cfg = LazyConfig.apply_overrides(cfg, ["model.backbone.bottom_up.stages.arch=w18_small_v1"])
    body = instantiate(cfg.model.backbone.bottom_up)
    assert body.output_shape()["hr5"].channels == 128
    cfg = LazyConfig.apply_overrides(cfg, ["model.backbone.bottom_up.stages.arch=w99"])
    with pytest.raises(ValueError, match="w99.*allowed"):
        instantiate(cfg.model.backbone.bottom_up)


@pytest.mark.e2e
def test_lazy_train_net_trains_and_evaluates(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(REPO / "lazy_train_net.py"),
        "--config-file",
        get_config_file("lazy/mask_rcnn_hrnetv2p_w18_small_shapes.py"),
        "--num-gpus",  # 2 processes (gloo on CPU)
        "2",
        "--dist-url",
        "auto",
        "train.max_iter=3",
        "train.log_period=1",
        f"train.output_dir={out}",
        "dataloader.train.dataset.names=shapes_tiny_train",
        "dataloader.test.dataset.names=shapes_tiny_val",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = retry_if_port_taken(
        lambda: subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "World size: 2" in log and (out / "log.txt.rank1").is_file()
    assert (out / "model_final.pth").is_file()
    assert list(out.glob("events.out.tfevents.*")), "no TensorBoard events"
    assert "copypaste: Task: bbox" in log and "copypaste: Task: segm" in log
    assert "eta:" in log  # Detectron2's CommonMetricPrinter


# --- lazy_train_net.py has train_net.py's guarantees --------------------------------

LAZY_SHAPES = get_config_file("lazy/mask_rcnn_hrnetv2p_w18_small_shapes.py")
LAZY_TINY = [
    "dataloader.train.dataset.names=shapes_tiny_train", "dataloader.test.dataset.names=shapes_tiny_val",
    "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
    "dataloader.train.mapper.augmentations.0.short_edge_length=[64,80]",
    "dataloader.train.mapper.augmentations.0.max_size=80",
    "dataloader.test.mapper.augmentations.0.short_edge_length=64", "dataloader.test.mapper.augmentations.0.max_size=64",
    "train.seed=7", "train.max_iter=8", "train.checkpointer.period=3", "train.log_period=1",
    "train.amp.enabled=True",  # bf16 autocast on CPU (hrnet_d2.engine.train_loop.CPUAMPTrainer)
]  # fmt: skip
# The second checkpoint save (iteration 5) writes half a file, then fails like a full disk.
_FAIL_SECOND_SAVE = """
import runpy, sys, torch
real_save, calls = torch.save, []
def failing_save(obj, f, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        f.write(b"PK\\x03\\x04 partial"); f.flush()
        raise OSError("No space left on device")
    return real_save(obj, f, *args, **kwargs)
torch.save = failing_save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _lazy(out, *args, code=None):
    cmd = [sys.executable, *(("-c", code) if code else ()), str(REPO / "lazy_train_net.py"), "--config-file",
           LAZY_SHAPES, *args, *LAZY_TINY, f"train.output_dir={out}"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HRNET_D2_DATASETS=str(out.parent / "datasets"))
    proc = retry_if_port_taken(
        lambda: subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    )
    return proc, proc.stdout + proc.stderr


@pytest.mark.e2e
def test_lazy_train_net_saves_atomically_and_resumes_exactly(tmp_path):
    from test_interrupted_training import _assert_state_close

    # a save fails half-way: the previous checkpoint stays the last one, nothing partial is left
    broken = tmp_path / "broken"
    proc, log = _lazy(broken, code=_FAIL_SECOND_SAVE)
    assert proc.returncode != 0 and "No space left on device" in log, log[-3000:]
    assert (broken / "last_checkpoint").read_text() == "model_0000002.pth"
    assert sorted(p.name for p in broken.iterdir() if "model" in p.name) == ["model_0000002.pth"]

    proc, log = _lazy(broken, "--resume")
    assert proc.returncode == 0, log[-3000:]
    # per-rank batch 2: iterations 0..2 consumed 6 samples of the stream
    assert re.search(r"Rank 0 resumes at iteration 3, lr [\d.e-]+, after 6 samples", log), log[-3000:]

    full = tmp_path / "full"
    proc, log = _lazy(full)
    assert proc.returncode == 0, log[-3000:]
    assert "copypaste: Task: bbox" in log
    a = torch.load(full / "model_final.pth", map_location="cpu", weights_only=True)
    b = torch.load(broken / "model_final.pth", map_location="cpu", weights_only=True)
    assert "grad_scaler" in a["trainer"]  # the AMP step ran (on CPU)
    assert len(a["trainer"]["hooks"]["ResumeState"]["rng"]) == 1
    _assert_state_close(a, b, "checkpoint")  # weights, optimizer, LR scheduler, RNG states


@pytest.mark.e2e
@pytest.mark.parametrize(
    "override, message",
    [
        ("model.roi_heads.box_in_features=[p2,p4]",
         r"model.roi_heads.box_in_features = \['p2', 'p4'\] is invalid: pooled features must be consecutive levels"),
        ("model.proposal_generator.in_features=[p2,p3,p4,p5,p7]",
         r"model.proposal_generator.in_features = .* is invalid: 'p7' is not produced by the backbone"),
    ],
)  # fmt: skip
def test_lazy_train_net_validates_the_model_before_reading_data(tmp_path, override, message):
    proc, log = _lazy(tmp_path / "out", override)
    assert proc.returncode != 0
    assert re.search(message, log), log[-3000:]
    assert "Loaded 8 images" not in log  # stopped before the training data was read


def test_lazy_fcos_equals_yaml_model():
    """The FCOS LazyConfig (FCOSDetector with mmdetection's conventions) is the model of its YAML twin: same
    tensors, same detections from the same weights."""
    torch.manual_seed(0)
    lazy_model = instantiate(LazyConfig.load(get_config_file("lazy/fcos_hrnetv2p_w18_1x_mmdet.py")).model).eval()
    yaml_model = build_model(make_cfg("COCO-Detection/fcos_hrnetv2p_w18_1x_mmdet.yaml")).eval()
    yaml_sd = yaml_model.state_dict()
    assert {k: v.shape for k, v in lazy_model.state_dict().items()} == {k: v.shape for k, v in yaml_sd.items()}
    assert lazy_model.backbone.output_shape() == yaml_model.backbone.output_shape()
    assert torch.equal(lazy_model.pixel_mean, yaml_model.pixel_mean)
    lazy_model.load_state_dict(yaml_sd)
    for m in (lazy_model, yaml_model):  # random weights score ~0.01: keep every location
        m.test_score_thresh = 0.0
    _same_detections(lazy_model, yaml_model, torch.rand(3, 128, 160) * 255)
