"""The generated "shapes" dataset: deterministic, valid COCO, registered, generated once."""

import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from detectron2.data import DatasetCatalog, MetadataCatalog

from hrnet_d2.data import shapes as synthetic
from hrnet_d2.data.shapes import CLASSES, SPLITS, generate_split, register_shapes


def _files(root):
    """{relative path: bytes} of everything a generation wrote."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_parameters_give_identical_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate_split(a, "val", 6, size=64, seed=3)
    generate_split(b, "val", 6, size=64, seed=3)
    files_a, files_b = _files(a), _files(b)
    assert len(files_a) == 7  # 6 PNGs + the json
    assert files_a == files_b


def test_seed_and_split_change_the_data(tmp_path):
    generate_split(tmp_path / "s0", "val", 4, size=64, seed=0)
    generate_split(tmp_path / "s1", "val", 4, size=64, seed=1)
    generate_split(tmp_path / "s0", "other", 4, size=64, seed=0)
    val0 = _files(tmp_path / "s0" / "shapes" / "val")
    val1 = _files(tmp_path / "s1" / "shapes" / "val")
    other0 = _files(tmp_path / "s0" / "shapes" / "other")
    assert val0.keys() == val1.keys() == other0.keys()
    for name in val0:
        assert val0[name] != val1[name]
        assert val0[name] != other0[name]


def test_json_is_valid_coco_with_masks_inside_images(tmp_path):
    size = 96
    json_path = generate_split(tmp_path, "val", 12, size=size, max_objects=4, seed=0)
    coco = COCO(str(json_path))
    assert sorted(coco.getCatIds()) == list(range(1, len(CLASSES) + 1))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    assert len(coco.getImgIds()) == 12
    seen_classes = set()
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        assert (info["height"], info["width"]) == (size, size)
        assert (tmp_path / "shapes" / "val" / info["file_name"]).is_file()
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert 1 <= len(anns) <= 4
        for ann in anns:
            seen_classes.add(ann["category_id"])
            assert ann["iscrowd"] == 0
            mask = coco.annToMask(ann)
            assert mask.shape == (size, size)
            ys, xs = np.nonzero(mask)
            assert len(xs) > 0.5 * ann["area"] > 0
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= size and y + h <= size and w > 4 and h > 4
            # the box is the mask's extent (to rasterisation)
            assert abs(xs.min() - x) <= 1.5 and abs(ys.min() - y) <= 1.5
            assert abs(xs.max() + 1 - (x + w)) <= 1.5 and abs(ys.max() + 1 - (y + h)) <= 1.5
    assert len(seen_classes) >= 3


def test_objects_are_drawn_where_annotated(tmp_path):
    """Annotated pixels are the shapes' flat colours, distinct from the noisy background."""
    import cv2

    json_path = generate_split(tmp_path, "val", 4, size=64, seed=0)
    coco = COCO(str(json_path))
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        image = cv2.imread(str(tmp_path / "shapes" / "val" / info["file_name"])).astype(np.float32)
        union = np.zeros(image.shape[:2], bool)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            union |= coco.annToMask(ann).astype(bool)
        assert image[union].max(1).mean() > image[~union].max(1).mean() + 40


def test_rerun_skips_generation_and_parameter_change_regenerates(tmp_path, monkeypatch):
    json_path = generate_split(tmp_path, "val", 3, size=64)
    before = _files(tmp_path)

    def fail(*args, **kwargs):
        raise AssertionError("generated again")

    with monkeypatch.context() as m:
        m.setattr(synthetic, "_make_image", fail)
        assert generate_split(tmp_path, "val", 3, size=64) == json_path
        with pytest.raises(AssertionError, match="generated again"):
            generate_split(tmp_path, "val", 4, size=64)  # other parameters: not skipped
    assert _files(tmp_path) == before

    generate_split(tmp_path, "val", 4, size=64)
    assert len(json.loads(json_path.read_text())["images"]) == 4
    # an interrupted generation leaves no json: the next run starts over
    json_path.unlink()
    generate_split(tmp_path, "val", 4, size=64)
    assert len(json.loads(json_path.read_text())["images"]) == 4


@pytest.fixture
def registered_in(tmp_path):
    """Register the shapes splits under tmp_path; restore any previous registration after."""
    saved = {n: (DatasetCatalog.pop(n, None), MetadataCatalog.pop(n, None)) for n in SPLITS}
    register_shapes(tmp_path)
    yield tmp_path
    for name, (func, meta) in saved.items():
        DatasetCatalog.pop(name, None)
        MetadataCatalog.pop(name, None)
        if func is not None:
            DatasetCatalog[name] = func
        if meta is not None:
            MetadataCatalog[name] = meta


def test_registration_generates_on_first_use(registered_in):
    root = registered_in
    split, n, size = SPLITS["shapes_tiny_val"]
    meta = MetadataCatalog.get("shapes_tiny_val")
    assert meta.thing_classes == list(CLASSES)
    assert meta.evaluator_type == "coco"
    assert meta.json_file == str(root / "shapes" / "annotations" / f"{split}.json")
    assert not (root / "shapes").exists()  # nothing generated at registration

    dicts = DatasetCatalog.get("shapes_tiny_val")
    assert len(dicts) == n
    for d in dicts:
        assert (d["height"], d["width"]) == (size, size)
        assert d["file_name"].startswith(str(root / "shapes" / split))
        for ann in d["annotations"]:
            assert 0 <= ann["category_id"] < len(CLASSES)  # Detectron2's contiguous ids
            assert len(ann["segmentation"]) == 1 and len(ann["segmentation"][0]) >= 6
    # held out: no training image is repeated in the test split
    train = {open(d["file_name"], "rb").read() for d in DatasetCatalog.get("shapes_tiny_train")}
    assert not train & {open(d["file_name"], "rb").read() for d in dicts}
