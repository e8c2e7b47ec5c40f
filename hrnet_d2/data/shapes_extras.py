"""Keypoint, semantic and panoptic versions of the generated "shapes" dataset.

Everything is derived from the instance annotations that ``shapes.py`` writes (the
polygon of each shape), so the extra datasets need no generator of their own and stay
consistent with the instance one:

* ``{split}_keypoints`` — one class-agnostic ``shape`` category (as ``person`` in COCO
  keypoints) with 5 keypoints per instance: the top / bottom / left / right extreme
  vertices of its polygon and its centre.  ``left`` and ``right`` swap under a
  horizontal flip.  Written as a COCO keypoint json, so COCOEvaluator scores it with
  ``TEST.KEYPOINT_OKS_SIGMAS`` (5 values).
* ``{split}_sem_seg`` — per-pixel labels ``0 = background, 1..4 = the shape classes``
  (PNG, Detectron2's ``sem_seg_file_name`` format), for ``SemanticSegmentor``.
* ``{split}_panoptic_separated`` — instances + a stuff map ``0 = things, 1 = background``,
  Detectron2's "panoptic separated" layout used to train ``PanopticFPN``.

``{split}`` is any name of ``shapes.SPLITS`` (``shapes_train``, ``shapes_tiny_train``, ...).
Files are written next to the instance split on first use and reused afterwards.
"""

import json
import logging
import os
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from ..utils.file_io import atomic_write
from .shapes import CLASSES, SPLITS, generate_split, shapes_root

__all__ = [
    "KEYPOINT_NAMES",
    "KEYPOINT_FLIP_MAP",
    "KEYPOINT_CONNECTION_RULES",
    "KEYPOINT_OKS_SIGMAS",
    "EXTRA_SPLITS",
    "register_shapes_extras",
    "ensure_generated_extras",
    "keypoints_from_polygon",
]

logger = logging.getLogger(__name__)

KEYPOINT_NAMES = ("top", "bottom", "left", "right", "center")
KEYPOINT_FLIP_MAP = (("left", "right"),)
KEYPOINT_CONNECTION_RULES = [
    ("top", "center", (255, 128, 0)),
    ("bottom", "center", (255, 128, 0)),
    ("left", "center", (0, 128, 255)),
    ("right", "center", (0, 128, 255)),
]
# COCO's OKS sigmas for the closest person keypoints (shoulders / hips: ~0.08-0.1).
KEYPOINT_OKS_SIGMAS = (0.08, 0.08, 0.08, 0.08, 0.1)
SEM_SEG_CLASSES = ("background",) + tuple(CLASSES)
PANOPTIC_STUFF_CLASSES = ("things", "background")
IGNORE_LABEL = 255

# extra dataset name -> (base dataset name, kind)
EXTRA_SPLITS = {
    f"{base}_{kind}": (base, kind) for base in SPLITS for kind in ("keypoints", "sem_seg", "panoptic_separated")
}


def keypoints_from_polygon(poly):
    """``[x, y, v] * 5`` (COCO layout, v = 2 visible) of a shape's polygon (N x 2)."""
    poly = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    points = [
        poly[np.argmin(poly[:, 1])],  # top
        poly[np.argmax(poly[:, 1])],  # bottom
        poly[np.argmin(poly[:, 0])],  # left
        poly[np.argmax(poly[:, 0])],  # right
        poly.mean(0),  # center
    ]
    return [float(round(v, 2)) for x, y in points for v in (x, y, 2)]


def _paths(root, base):
    split = SPLITS[base][0]
    shapes = Path(root) / "shapes"
    return {
        "json": shapes / "annotations" / f"{split}.json",
        "images": shapes / split,
        "keypoints_json": shapes / "annotations" / f"{split}_keypoints.json",
        "sem_seg": shapes / "sem_seg" / split,
        "panoptic_stuff": shapes / "panoptic_stuff" / split,
    }


def _base_json(root, base):
    split, n, size = SPLITS[base]
    return json.loads(Path(generate_split(root, split, n, size=size)).read_text())


def _write_keypoints_json(root, base):
    paths = _paths(root, base)
    data = _base_json(root, base)
    out = paths["keypoints_json"]
    params = dict(data["info"]["params"], derived="keypoints")
    if out.is_file() and json.loads(out.read_text()).get("info", {}).get("params") == params:
        return out
    annotations = []
    for ann in data["annotations"]:
        ann = dict(ann, category_id=1, keypoints=keypoints_from_polygon(ann["segmentation"][0]), num_keypoints=5)
        annotations.append(ann)
    names = list(KEYPOINT_NAMES)
    skeleton = [[names.index(a) + 1, names.index(b) + 1] for a, b, _ in KEYPOINT_CONNECTION_RULES]
    data = dict(
        data,
        info=dict(data["info"], params=params),
        annotations=annotations,
        categories=[{"id": 1, "name": "shape", "supercategory": "shape", "keypoints": names, "skeleton": skeleton}],
    )
    atomic_write(out, lambda f: f.write(json.dumps(data)), mode="w")
    return out


def _label_maps(data, image):
    """(semantic, panoptic-stuff) uint8 label maps of one image of the instance json."""
    h, w = image["height"], image["width"]
    semantic = np.zeros((h, w), np.uint8)
    for ann in data["_by_image"].get(image["id"], []):
        poly = np.round(np.asarray(ann["segmentation"][0]).reshape(-1, 2)).astype(np.int32)
        cv2.fillPoly(semantic, [poly], int(ann["category_id"]))  # category ids are 1..4 = SEM_SEG_CLASSES index
    stuff = np.where(semantic > 0, 0, 1).astype(np.uint8)
    return semantic, stuff


def _write_label_maps(root, base):
    """Write the semantic and panoptic-stuff PNGs of a split (skipped when complete)."""
    paths = _paths(root, base)
    data = _base_json(root, base)
    marker = paths["sem_seg"] / "params.json"
    params = dict(data["info"]["params"], derived="label_maps")
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return
    for key in ("sem_seg", "panoptic_stuff"):
        paths[key].mkdir(parents=True, exist_ok=True)
    data["_by_image"] = {}
    for ann in data["annotations"]:
        data["_by_image"].setdefault(ann["image_id"], []).append(ann)
    images = data["images"]
    for image in tqdm(images, desc=f"label maps {base}", disable=len(images) < 50):
        semantic, stuff = _label_maps(data, image)
        cv2.imwrite(str(paths["sem_seg"] / image["file_name"]), semantic)
        cv2.imwrite(str(paths["panoptic_stuff"] / image["file_name"]), stuff)
    atomic_write(marker, lambda f: f.write(json.dumps(params)), mode="w")  # written last: marks the split complete


def ensure_generated_extras(dataset_names, root=None):
    """Write the files of any extra split among ``dataset_names`` (no-op when present)."""
    root = Path(root) if root is not None else shapes_root()
    for name in dataset_names:
        if name not in EXTRA_SPLITS:
            continue
        base, kind = EXTRA_SPLITS[name]
        if kind == "keypoints":
            _write_keypoints_json(root, base)
        else:
            _write_label_maps(root, base)


def _load(name, root):
    from detectron2.data.datasets import load_coco_json

    base, kind = EXTRA_SPLITS[name]
    ensure_generated_extras([name], root)
    paths = _paths(root, base)
    if kind == "keypoints":
        return load_coco_json(str(paths["keypoints_json"]), str(paths["images"]), name)
    dicts = load_coco_json(str(paths["json"]), str(paths["images"]), name if kind != "sem_seg" else None)
    folder = paths["sem_seg"] if kind == "sem_seg" else paths["panoptic_stuff"]
    for d in dicts:
        d["sem_seg_file_name"] = str(folder / os.path.basename(d["file_name"]))
        if kind == "sem_seg":
            d.pop("annotations", None)
    return dicts


def register_shapes_extras(root=None):
    """Register the ``*_keypoints``, ``*_sem_seg`` and ``*_panoptic_separated`` splits."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    root = Path(root) if root is not None else shapes_root()
    for name, (base, kind) in EXTRA_SPLITS.items():
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, lambda name=name: _load(name, root))
        paths = _paths(root, base)
        meta = MetadataCatalog.get(name)
        if kind == "keypoints":
            meta.set(
                json_file=str(paths["keypoints_json"]),
                image_root=str(paths["images"]),
                evaluator_type="coco",
                thing_classes=["shape"],
                keypoint_names=list(KEYPOINT_NAMES),
                keypoint_flip_map=list(KEYPOINT_FLIP_MAP),
                keypoint_connection_rules=list(KEYPOINT_CONNECTION_RULES),
            )
        elif kind == "sem_seg":
            meta.set(
                image_root=str(paths["images"]),
                sem_seg_root=str(paths["sem_seg"]),
                evaluator_type="sem_seg",
                stuff_classes=list(SEM_SEG_CLASSES),
                ignore_label=IGNORE_LABEL,
            )
        else:
            meta.set(
                json_file=str(paths["json"]),
                image_root=str(paths["images"]),
                sem_seg_root=str(paths["panoptic_stuff"]),
                # COCOEvaluator (things) + SemSegEvaluator (stuff); PQ needs panopticapi + panoptic json
                evaluator_type="coco_panoptic_seg",
                thing_classes=list(CLASSES),
                stuff_classes=list(PANOPTIC_STUFF_CLASSES),
                ignore_label=IGNORE_LABEL,
            )
