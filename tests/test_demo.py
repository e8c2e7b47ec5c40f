"""demo.py draws a trained model's predictions on images and folders."""

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from conftest import CONFIGS, REPO, make_cfg

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

import demo
from hrnet_d2.data import register_all_shapes
from hrnet_d2.utils.errors import UserError

QUICKSTART = "quickstart/mask_rcnn_hrnetv2p_w18_small_shapes.yaml"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    register_all_shapes()
    folder = tmp_path_factory.mktemp("images")
    for d in DatasetCatalog.get("shapes_tiny_val")[:2]:
        os.symlink(d["file_name"], folder / os.path.basename(d["file_name"]))
    return folder


def save_model(config, output_dir):
    """A checkpoint written the way train_net.py writes model_final.pth."""
    torch.manual_seed(0)
    cfg = make_cfg(config)
    model = build_model(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    DetectionCheckpointer(model, save_dir=str(output_dir)).save("model_final")
    return output_dir / "model_final.pth"


def record_drawn(monkeypatch):
    """The outputs demo.py draws, per image (demo.draw_predictions, wrapped)."""
    drawn = []
    original = demo.draw_predictions

    def draw(rgb, outputs, *args, **kwargs):
        drawn.append(outputs["instances"].to("cpu"))
        return original(rgb, outputs, *args, **kwargs)

    monkeypatch.setattr(demo, "draw_predictions", draw)
    return drawn


def assert_same_detections(ours, reference):
    assert len(ours) == len(reference) > 0
    torch.testing.assert_close(ours.pred_boxes.tensor, reference.pred_boxes.tensor)
    torch.testing.assert_close(ours.scores, reference.scores)
    assert torch.equal(ours.pred_classes, reference.pred_classes)


def test_demo_folder_with_quickstart_model(images, tmp_path, monkeypatch):
    """The boxes drawn are those of Detectron2's DefaultPredictor with the same weights file."""
    from detectron2.engine import DefaultPredictor

    # out of the box: quickstart config, weights from its OUTPUT_DIR/model_final.pth
    weights = save_model(QUICKSTART, tmp_path / "quickstart")
    drawn = record_drawn(monkeypatch)
    out = tmp_path / "vis"
    written = demo.main(
        [
            "--input",
            str(images),
            "--output",
            str(out),
            "--confidence-threshold",
            "0",
            "--opts",
            "OUTPUT_DIR",
            str(tmp_path / "quickstart"),
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
            "0.0",
        ]
    )
    assert sorted(os.path.basename(p) for p in written) == sorted(os.listdir(images))
    reference = DefaultPredictor(
        make_cfg(QUICKSTART, "MODEL.WEIGHTS", str(weights), "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0)
    )
    assert len(drawn) == len(written)
    for path, ours in zip(written, drawn):
        src = cv2.imread(str(images / os.path.basename(path)))
        vis = cv2.imread(path)
        assert vis.shape == src.shape
        assert (vis != src).any(), "nothing drawn"  # threshold 0: random weights still give boxes
        assert_same_detections(ours, reference(src)["instances"])


def test_demo_semantic_single_file(images, tmp_path):
    config = "shapes/semantic_hrnetv2_w18_small_shapes.yaml"
    weights = save_model(config, tmp_path)
    image = sorted(images.iterdir())[0]
    out = tmp_path / "one.png"
    demo.main(
        [
            "--config-file",
            str(CONFIGS / config),
            "--input",
            str(image),
            "--output",
            str(out),
            "--opts",
            "MODEL.WEIGHTS",
            str(weights),
        ]
    )
    vis, src = cv2.imread(str(out)), cv2.imread(str(image))
    assert vis.shape == src.shape and not np.array_equal(vis, src)


def test_demo_missing_weights_message(images, tmp_path):
    with pytest.raises(UserError, match="quickstart"):
        demo.main(["--input", str(images), "--output", str(tmp_path), "--opts", "OUTPUT_DIR", str(tmp_path)])


@pytest.mark.e2e
def test_demo_cli(images, tmp_path):
    weights = save_model(QUICKSTART, tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "demo.py"),
            "--input",
            str(images / "*.png"),
            "--output",
            str(tmp_path / "v"),
            "--opts",
            "MODEL.WEIGHTS",
            str(weights),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "v").glob("*.png"))) == 2


def test_demo_lazy_config(images, tmp_path, monkeypatch):
    """The boxes drawn are those of the lazy config's model loaded from the same file, run on the
    config's test-time resize."""
    from detectron2.config import LazyConfig, instantiate
    from detectron2.data import detection_utils
    from detectron2.data import transforms as T

    from hrnet_d2 import get_config_file

    config = get_config_file("lazy/mask_rcnn_hrnetv2p_w18_small_shapes.py")
    torch.manual_seed(0)
    model = instantiate(LazyConfig.load(config).model)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("lazy")
    drawn = record_drawn(monkeypatch)
    written = demo.main(
        [
            "--config-file",
            config,
            "--input",
            str(images),
            "--output",
            str(tmp_path / "vis"),
            "--confidence-threshold",
            "0",
            "--opts",
            f"train.init_checkpoint={tmp_path / 'lazy.pth'}",
            "model.roi_heads.box_predictor.test_score_thresh=0.0",
        ]
    )
    assert len(written) == len(drawn) == 2
    lazy = LazyConfig.apply_overrides(LazyConfig.load(config), ["model.roi_heads.box_predictor.test_score_thresh=0.0"])
    reference = instantiate(lazy.model).eval()
    DetectionCheckpointer(reference).load(str(tmp_path / "lazy.pth"))
    resize = T.AugmentationList(instantiate(lazy.dataloader.test.mapper.augmentations))
    for path, ours in zip(written, drawn):
        src = cv2.imread(str(images / os.path.basename(path)))
        vis = cv2.imread(path)
        assert vis.shape == src.shape and (vis != src).any()
        rgb = detection_utils.read_image(str(images / os.path.basename(path)), format="RGB")
        aug = T.AugInput(rgb)
        resize(aug)
        tensor = torch.as_tensor(aug.image.transpose(2, 0, 1).astype("float32"))
        with torch.no_grad():
            expected = reference([{"image": tensor, "height": rgb.shape[0], "width": rgb.shape[1]}])[0]
        assert_same_detections(ours, expected["instances"])
