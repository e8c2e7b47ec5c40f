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


# ---------------------------------------------------------------- predictions as data, odd files, video, batches
TINY_VAL = ("DATASETS.TEST", "('shapes_tiny_val',)", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0")


@pytest.fixture(scope="module")
def quickstart_weights(tmp_path_factory):
    return save_model(QUICKSTART, tmp_path_factory.mktemp("qs"))


def _coco_ap(json_file, results_file, kind):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(json_file)
    evaluation = COCOeval(gt, gt.loadRes(str(results_file)), kind)
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return evaluation.stats[0] * 100


def test_json_gives_the_ap_of_eval_only(quickstart_weights, tmp_path):
    import json

    from detectron2.data import MetadataCatalog

    from hrnet_d2.checkpoint import AtomicCheckpointer
    from hrnet_d2.engine import Trainer

    register_all_shapes()
    dicts = DatasetCatalog.get("shapes_tiny_val")
    meta = MetadataCatalog.get("shapes_tiny_val")
    cfg = make_cfg(QUICKSTART, "MODEL.WEIGHTS", str(quickstart_weights), "OUTPUT_DIR", str(tmp_path), *TINY_VAL)
    model = Trainer.build_model(cfg)
    AtomicCheckpointer(model, cfg=cfg, complete=True).load(cfg.MODEL.WEIGHTS)
    evaluated = Trainer.test(cfg, model)  # one test set: {"bbox": ..., "segm": ...}

    out = tmp_path / "pred" / "results.json"
    folder = os.path.dirname(dicts[0]["file_name"])
    demo.main(["--input", folder, "--json", str(out), "--opts", "MODEL.WEIGHTS", str(quickstart_weights), *TINY_VAL])
    results = json.loads(out.read_text())
    listing = json.loads((tmp_path / "pred" / "results_images.json").read_text())
    assert sorted(im["id"] for im in listing["images"]) == sorted(d["image_id"] for d in dicts)
    assert [c["name"] for c in listing["categories"]] == list(meta.thing_classes)
    assert results and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(results[0])
    for kind in ("bbox", "segm"):
        ap = _coco_ap(meta.json_file, out, kind)
        assert ap == pytest.approx(evaluated[kind]["AP"], abs=1e-9), kind
    # and the same detections as the evaluator's own results file
    theirs = json.loads((tmp_path / "inference" / "coco_instances_results.json").read_text())

    def key(r):
        return (r["image_id"], r["category_id"], round(r["score"], 5))

    assert sorted(map(key, results)) == sorted(map(key, theirs))
    # negative control: the category ids shifted by one give another AP
    shifted = tmp_path / "shifted.json"
    shifted.write_text(json.dumps([dict(r, category_id=r["category_id"] % 4 + 1) for r in results]))
    assert _coco_ap(meta.json_file, shifted, "bbox") != pytest.approx(evaluated["bbox"]["AP"], abs=1e-9)


def test_batches_give_the_same_predictions(quickstart_weights, images, tmp_path):
    import json

    runs = {}
    for batch, workers in ((1, 0), (2, 2)):
        out = tmp_path / f"b{batch}.json"
        demo.main(
            ["--input", str(images), "--json", str(out), "--batch-size", str(batch), "--num-workers", str(workers)]
            + ["--opts", "MODEL.WEIGHTS", str(quickstart_weights), *TINY_VAL]
        )
        runs[batch] = json.loads(out.read_text())
    assert len(runs[1]) == len(runs[2]) > 0  # same-size images: the same padding, the same detections
    for a, b in zip(runs[1], runs[2]):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-2)


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory, images):
    """Grayscale, RGBA, 16-bit and EXIF-rotated files, and two that are not readable images."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("odd")
    rgb = cv2.imread(str(sorted(images.iterdir())[0]))[:, :, ::-1]  # 96x96
    rgb = np.ascontiguousarray(rgb[:, :80])  # 96 high, 80 wide: rotation shows
    Image.fromarray(rgb).convert("L").save(folder / "gray.png")
    Image.fromarray(rgb).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray((rgb[:, :, 0].astype(np.uint16) * 257)).save(folder / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif)
    (folder / "truncated.jpg").write_bytes((folder / "rotated.jpg").read_bytes()[:300])
    (folder / "notes.png").write_text("not an image")
    return folder


def test_odd_and_broken_images(quickstart_weights, odd_images, tmp_path, caplog):
    import logging

    out = tmp_path / "vis"
    with caplog.at_level(logging.WARNING, logger="hrnet_d2.demo"):
        written = demo.main(
            ["--input", str(odd_images), "--output", str(out), "--opts", "MODEL.WEIGHTS", str(quickstart_weights)]
        )
    assert sorted(os.path.basename(p) for p in written) == ["deep16.png", "gray.png", "rgba.png", "rotated.png"]
    for name in ("gray", "rgba", "deep16"):
        assert cv2.imread(str(out / f"{name}.png")).shape == (96, 80, 3), name
    assert cv2.imread(str(out / "rotated.png")).shape == (80, 96, 3)  # EXIF orientation applied
    deep = cv2.imread(str(out / "deep16.png"))
    assert deep.max() > 100  # 16-bit scaled to 8 bits, not clipped to white or black
    text = caplog.text
    assert "2 of 6 inputs could not be read and were skipped" in text
    assert "truncated.jpg is not a readable image" in text and "notes.png is not a readable image" in text


def test_nothing_readable_exits_non_zero(quickstart_weights, odd_images, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(
            [
                "--input",
                str(odd_images / "truncated.jpg"),
                str(odd_images / "notes.png"),
                "--json",
                str(tmp_path / "r.json"),
            ]
            + ["--opts", "MODEL.WEIGHTS", str(quickstart_weights)]
        )
    assert e.value.code == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: none of the 2 inputs could be read"), err
    assert "Traceback" not in err
    assert not (tmp_path / "r.json").exists()


def test_video_round_trip(quickstart_weights, images, tmp_path):
    frames = [cv2.imread(str(p)) for p in sorted(images.iterdir())] * 3  # 6 frames, 96x96, BGR
    clip = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (96, 96))
    for f in frames:
        writer.write(f)
    writer.release()
    out = tmp_path / "out" / "drawn.mp4"
    demo.main(
        ["--video-input", str(clip), "--output", str(out), "--confidence-threshold", "0"]
        + ["--opts", "MODEL.WEIGHTS", str(quickstart_weights), "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    )
    src, dst = cv2.VideoCapture(str(clip)), cv2.VideoCapture(str(out))
    assert int(dst.get(cv2.CAP_PROP_FRAME_COUNT)) == len(frames)
    assert (int(dst.get(cv2.CAP_PROP_FRAME_WIDTH)), int(dst.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (96, 96)
    differs = []
    for _ in frames:
        (ok1, a), (ok2, b) = src.read(), dst.read()
        assert ok1 and ok2
        differs.append(np.abs(a.astype(int) - b.astype(int)).max() > 60)  # drawn boxes, beyond codec noise
    assert all(differs)
    with pytest.raises(UserError, match="cannot be opened as a video"):
        demo.main(["--video-input", str(images / "nope.mp4"), "--output", str(tmp_path / "x.mp4")])
