"""Bad data: each case either works or stops with a DataError naming the file; nothing
is skipped without a warning."""

import json
import logging
import uuid

import numpy as np
import pytest
import torch
from conftest import make_cfg
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from hrnet_d2.data.checks import DataError, load_dataset_dicts
from hrnet_d2.data.mapper import CheckedDatasetMapper
from hrnet_d2.engine import Trainer

QUICKSTART = "quickstart/mask_rcnn_hrnetv2p_w18_small_shapes.yaml"


def _image(h=40, w=48, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _ann(image_id, ann_id, box=(4, 6, 20, 16)):
    x, y, w, h = box
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": list(box), "area": w * h, "iscrowd": 0,
            "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}  # fmt: skip


def make_dataset(root, n=2, annotate=None, write=True, edit=None):
    """A COCO dataset of ``n`` RGB PNGs with one box each, registered under a fresh name.

    ``annotate``: image indices that get an annotation (default all); ``edit(data)`` may
    change the json before it is written.  Returns (name, json_path, [image paths]).
    """
    root.mkdir(parents=True, exist_ok=True)
    images, anns, paths = [], [], []
    for i in range(n):
        path = root / f"{i:03d}.png"
        if write:
            Image.fromarray(_image(seed=i)).save(path)
        paths.append(path)
        images.append({"id": i + 1, "file_name": path.name, "height": 40, "width": 48})
        if annotate is None or i in annotate:
            anns.append(_ann(i + 1, len(anns) + 1))
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    if edit:
        edit(data)
    json_path = root / "annotations.json"
    json_path.write_text(json.dumps(data))
    name = f"bad_data_{uuid.uuid4().hex[:8]}"
    register_coco_instances(name, {}, str(json_path), str(root))
    return name, json_path, paths


@pytest.fixture
def cfg():
    return make_cfg(
        QUICKSTART, "INPUT.MIN_SIZE_TRAIN", "(40,)", "INPUT.MAX_SIZE_TRAIN", "64", "DATALOADER.NUM_WORKERS", "0"
    )


def _map(cfg, name):
    mapper = CheckedDatasetMapper(cfg, is_train=True)
    return [mapper(d) for d in load_dataset_dicts([name])]


# --- image files -------------------------------------------------------------------


def test_missing_image_file_is_reported_when_the_dataset_loads(tmp_path):
    name, _, paths = make_dataset(tmp_path, n=3)
    paths[1].unlink()
    with pytest.raises(DataError, match="1 of the files") as e:
        load_dataset_dicts([name])
    assert str(paths[1]) in str(e.value) and name in str(e.value)


def test_image_deleted_after_loading_names_the_file(tmp_path, cfg):
    name, _, paths = make_dataset(tmp_path)
    dicts = load_dataset_dicts([name])
    paths[0].unlink()
    with pytest.raises(DataError, match="file not found") as e:
        CheckedDatasetMapper(cfg, is_train=True)(dicts[0])
    assert str(paths[0]) in str(e.value)


@pytest.mark.parametrize("content", ["garbage", "empty", "truncated"])
def test_unreadable_image_names_the_file(tmp_path, cfg, content):
    name, _, paths = make_dataset(tmp_path)
    data = paths[1].read_bytes()
    paths[1].write_bytes(
        {"garbage": b"\x00not an image" * 50, "empty": b"", "truncated": data[: len(data) // 2]}[content]
    )
    with pytest.raises(DataError) as e:
        _map(cfg, name)
    assert str(paths[1]) in str(e.value)
    assert isinstance(e.value.__cause__, OSError)  # the original error is kept as the cause


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16"])
def test_grayscale_palette_and_alpha_images_are_converted_to_3_channels(tmp_path, cfg, mode):
    name, _, paths = make_dataset(tmp_path, n=1)
    rgb = Image.open(paths[0])
    if mode == "I;16":
        converted = Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16) * 257))
    else:
        converted = rgb.convert(mode)
    converted.save(paths[0])
    assert Image.open(paths[0]).mode == ("I;16" if mode == "I;16" else mode)
    (out,) = _map(cfg, name)
    image = out["image"]
    assert image.shape == (3, 40, 48) and image.dtype == torch.uint8
    if mode in ("L", "LA"):
        gray = np.asarray(rgb.convert("L"))
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
        # ResizeShortestEdge keeps 40x48, random flip may mirror it
        assert torch.equal(image[0], torch.from_numpy(gray.copy())) or torch.equal(
            image[0], torch.from_numpy(gray[:, ::-1].copy())
        )
    if mode == "RGBA":  # alpha dropped, colours kept
        expected = torch.from_numpy(np.asarray(rgb)).permute(2, 0, 1)
        assert torch.equal(image, expected) or torch.equal(image, expected.flip(-1))
    assert len(out["instances"]) == 1


def test_image_smaller_than_the_network_stride_trains(tmp_path):
    """A 10x14 image (below the strides 32 of hr5 and 64 of p6) is resized and padded, and trains."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    def tiny(d):
        d["images"][0].update(height=10, width=14)
        d["annotations"][0].update(bbox=[1, 1, 8, 6], segmentation=[[1, 1, 9, 1, 9, 7, 1, 7]])

    name, _, paths = make_dataset(tmp_path, n=1, edit=tiny)
    Image.fromarray(_image(10, 14)).save(paths[0])
    cfg = make_cfg(QUICKSTART, "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
                   "MODEL.ROI_HEADS.NUM_CLASSES", "1", "MODEL.HRNET.NORM", "FrozenBN",
                   "MODEL.HRNET_PYRAMID.NORM", "")  # fmt: skip
    (sample,) = _map(cfg, name)
    assert tuple(sample["image"].shape[1:]) == (64, 90)
    model = build_model(cfg).train()
    with EventStorage(0):
        losses = model([sample])
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()


def test_image_size_differing_from_the_json_names_the_file(tmp_path, cfg):
    name, _, paths = make_dataset(tmp_path, n=1)
    Image.fromarray(_image(30, 30)).save(paths[0])
    with pytest.raises(DataError, match="differs from the annotation") as e:
        _map(cfg, name)
    assert str(paths[0]) in str(e.value)


# --- images without annotations ------------------------------------------------------


def test_images_without_annotations_are_dropped_from_training_with_a_warning(tmp_path, caplog):
    name, _, paths = make_dataset(tmp_path, n=3, annotate=[0, 2])
    with caplog.at_level(logging.WARNING, logger="hrnet_d2"):
        dicts = load_dataset_dicts([name], filter_empty=True)
    assert [d["file_name"] for d in dicts] == [str(paths[0]), str(paths[2])]
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "1 of 3 images" in warning and str(paths[1]) in warning


def test_images_without_annotations_work_when_kept(tmp_path, cfg):
    name, _, _ = make_dataset(tmp_path, n=2, annotate=[0])
    outs = _map(cfg, name)  # FILTER_EMPTY_ANNOTATIONS False / evaluation
    assert [len(o["instances"]) for o in outs] == [1, 0]


def test_no_annotated_image_at_all_stops_training(tmp_path):
    name, json_path, _ = make_dataset(tmp_path, n=2, annotate=[])
    with pytest.raises(DataError, match="nothing to train on") as e:
        load_dataset_dicts([name], filter_empty=True)
    assert name in str(e.value)


# --- annotation json ---------------------------------------------------------------


def _load_error(name):
    with pytest.raises(DataError) as e:
        load_dataset_dicts([name])
    return str(e.value)


def test_annotation_json_that_is_not_json_names_file_and_line(tmp_path):
    name, json_path, _ = make_dataset(tmp_path)
    json_path.write_text('{"images": [\n  {"id": 1,\n  oops}')
    message = _load_error(name)
    assert str(json_path) in message and "not valid JSON" in message and "line 3" in message


def test_missing_annotation_json_names_the_file(tmp_path):
    name, json_path, _ = make_dataset(tmp_path)
    json_path.unlink()
    message = _load_error(name)
    assert str(json_path) in message and "does not exist" in message


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda d: d.pop("images"), "'images'"),
        (lambda d: d.pop("categories"), "'categories'"),
        (lambda d: d["images"][1].pop("height"), "'height'"),
        (lambda d: d["images"][0].pop("file_name"), "'file_name'"),
        (lambda d: d["annotations"][1].pop("bbox"), "'bbox'"),
        (lambda d: d["annotations"][0].pop("category_id"), "'category_id'"),
        (lambda d: d["annotations"][0].update(category_id=7), "category_id=7"),
    ],
    ids=["no images", "no categories", "image without height", "image without file_name", "annotation without bbox",
         "annotation without category_id", "unknown category_id"],
)  # fmt: skip
def test_annotation_json_lacking_required_fields_names_file_and_field(tmp_path, edit, field):
    name, json_path, _ = make_dataset(tmp_path, edit=edit)
    message = _load_error(name)
    assert str(json_path) in message and field in message, message


# --- through the Trainer's loaders ---------------------------------------------------


def test_trainer_loaders_stop_on_a_corrupt_image_naming_it(tmp_path):
    name, _, paths = make_dataset(tmp_path, n=2)
    paths[1].write_bytes(b"corrupt")
    cfg = make_cfg(QUICKSTART, "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", f"('{name}',)",
                   "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "MODEL.ROI_HEADS.NUM_CLASSES", "1")  # fmt: skip
    with pytest.raises(DataError, match=str(paths[1])):
        next(iter(Trainer.build_train_loader(cfg)))
    with pytest.raises(DataError, match=str(paths[1])):
        list(Trainer.build_test_loader(cfg, name))


# --- boxes training would drop silently, and the class count ----------------------


def _set_box(index, box):
    def edit(data):
        data["annotations"][index]["bbox"] = list(box)
        data["annotations"][index]["id"] = 70 + index

    return edit


def _train_cfg(name, *opts):
    return make_cfg(QUICKSTART, "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()", "SOLVER.IMS_PER_BATCH", "2",
                    "DATALOADER.NUM_WORKERS", "0", "MODEL.ROI_HEADS.NUM_CLASSES", "1", *opts)  # fmt: skip


@pytest.mark.parametrize(
    "box, problem",
    [((4, 6, 0, 16), "non-positive width/height"), ((4, 6, 20, -3), "non-positive width/height"),
     ((50, 2, 10, 10), "entirely outside the 48x40 image"), ((-30, 5, 20, 10), "entirely outside the 48x40 image")],
    ids=["zero width", "negative height", "right of the image", "left of the image"],
)  # fmt: skip
def test_invalid_training_box_stops_naming_json_and_annotation_id(tmp_path, box, problem):
    name, json_path, _ = make_dataset(tmp_path, n=3, edit=_set_box(1, box))
    cfg = _train_cfg(name)
    with pytest.raises(DataError) as e:
        Trainer.build_train_loader(cfg)
    message = str(e.value)
    assert str(json_path) in message and "annotation id=71" in message and problem in message, message
    assert "DATALOADER.DROP_INVALID_BOXES True" in message
    # negative control: a box that overlaps the image partly is fine
    ok_name, _, _ = make_dataset(tmp_path / "ok", n=3, edit=_set_box(1, (40, 30, 20, 20)))
    Trainer.build_train_loader(_train_cfg(ok_name))


def test_invalid_boxes_are_dropped_with_a_count_when_asked(tmp_path, caplog):
    def edit(data):
        _set_box(0, (4, 6, 0, 16))(data)
        _set_box(2, (60, 50, 5, 5))(data)

    name, _, _ = make_dataset(tmp_path, n=4, edit=edit)
    with caplog.at_level(logging.WARNING):
        dicts = load_dataset_dicts([name], invalid_boxes="drop")
    assert [len(d["annotations"]) for d in dicts] == [0, 1, 0, 1]
    assert "Dropped 2 of 4 annotations" in caplog.text
    assert "1 entirely outside" in caplog.text and "1 non-positive width/height" in caplog.text
    # through the config switch: the images left without boxes are then filtered (and said so)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        Trainer.build_train_loader(_train_cfg(name, "DATALOADER.DROP_INVALID_BOXES", "True"))
    assert "Dropped 2 of 4 annotations" in caplog.text and "2 of 4 images" in caplog.text


def test_crowd_boxes_and_test_sets_are_not_judged(tmp_path):
    def edit(data):
        _set_box(0, (4, 6, 0, 16))(data)
        data["annotations"][0]["iscrowd"] = 1

    name, _, _ = make_dataset(tmp_path, n=2, edit=edit)
    Trainer.build_train_loader(_train_cfg(name))
    bad, _, _ = make_dataset(tmp_path / "bad", n=2, edit=_set_box(0, (4, 6, 0, 16)))
    assert len(load_dataset_dicts([bad])) == 2  # evaluation reads the json itself


@pytest.mark.parametrize("num_classes", ["3", "1"])
def test_num_classes_must_match_the_training_datasets(tmp_path, num_classes):
    """Smaller: the extra classes would become background; larger: never-trained outputs."""

    def two_categories(data):
        data["categories"] = [{"id": 1, "name": "thing"}, {"id": 2, "name": "stuff"}]

    first, json1, _ = make_dataset(tmp_path / "a", n=2, edit=two_categories)
    second, _, _ = make_dataset(tmp_path / "b", n=2, edit=two_categories)
    cfg = _train_cfg(first, "DATASETS.TRAIN", f"('{first}', '{second}')", "MODEL.ROI_HEADS.NUM_CLASSES", num_classes)
    with pytest.raises(DataError) as e:
        Trainer.build_train_loader(cfg)
    message = str(e.value)
    assert f"MODEL.ROI_HEADS.NUM_CLASSES = {num_classes}, but dataset {first!r}" in message, message
    assert f"(annotation file {json1})" in message and "has 2 thing_classes: thing, stuff" in message
    assert "Set MODEL.ROI_HEADS.NUM_CLASSES 2" in message
    # negative control: the matching count trains
    Trainer.build_train_loader(_train_cfg(first, "DATASETS.TRAIN", f"('{first}', '{second}')",
                                          "MODEL.ROI_HEADS.NUM_CLASSES", "2"))  # fmt: skip


def test_retinanet_num_classes_is_checked(tmp_path):
    name, _, _ = make_dataset(tmp_path, n=2)
    cfg = make_cfg("shapes/retinanet_hrnetv2p_w18_small_shapes.yaml", "DATASETS.TRAIN", f"('{name}',)",
                   "DATALOADER.NUM_WORKERS", "0")  # fmt: skip
    with pytest.raises(
        DataError, match=rf"MODEL.RETINANET.NUM_CLASSES = 4, but dataset '{name}'.* has 1 thing_classes"
    ):
        Trainer.build_train_loader(cfg)


def test_lazy_config_num_classes_is_checked(tmp_path):
    from detectron2.config import LazyConfig

    from hrnet_d2 import get_config_file
    from hrnet_d2.data.checks import check_num_classes

    name, json_path, _ = make_dataset(tmp_path, n=2)
    load_dataset_dicts([name])  # the json gives thing_classes
    cfg = LazyConfig.load(get_config_file("lazy/mask_rcnn_hrnetv2p_w18_small_shapes.py"))
    with pytest.raises(DataError) as e:
        check_num_classes(cfg, [name])
    message = str(e.value)
    assert f"model.roi_heads.num_classes = 4, but dataset {name!r} (annotation file {json_path})" in message, message
    assert message.endswith("Set model.roi_heads.num_classes=1")
    check_num_classes(LazyConfig.apply_overrides(cfg, ["model.roi_heads.num_classes=1"]), [name])


def teardown_module():
    for name in [n for n in DatasetCatalog.list() if n.startswith("bad_data_")]:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
