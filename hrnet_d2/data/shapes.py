"""A deterministic synthetic instance-segmentation dataset ("shapes").

It exists so that the whole pipeline — data loading, training, COCO evaluation,
visualisation — runs on a fresh CPU-only machine with nothing downloaded.  Images are
coloured shapes on a textured background; annotations are COCO json with polygon
masks, so Detectron2's stock COCO loader and COCOEvaluator handle it unchanged.

The same (seed, split, size) always produces the same files, and a finished split
is marked by its json, so generation runs once and is skipped afterwards.
"""

import json
import logging
import math
import os
import zlib
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from ..utils.file_io import atomic_write

__all__ = ["CLASSES", "generate_split", "register_shapes", "DEFAULT_ROOT", "shapes_root"]

logger = logging.getLogger(__name__)

CLASSES = ("circle", "square", "triangle", "star")
DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "datasets"
VERSION = 2  # bump when the generator's output changes: existing splits are then regenerated


def shapes_root():
    """$HRNET_D2_DATASETS, else the repository's datasets/ folder."""
    return Path(os.environ.get("HRNET_D2_DATASETS", DEFAULT_ROOT))


def _polygon(kind, cx, cy, r, angle):
    if kind == "circle":
        n = 32
        a = np.linspace(0, 2 * math.pi, n, endpoint=False)
        return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], 1)
    if kind == "square":
        a = angle + np.arange(4) * math.pi / 2 + math.pi / 4
        return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], 1)
    if kind == "triangle":
        a = angle + np.arange(3) * 2 * math.pi / 3 - math.pi / 2
        return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], 1)
    if kind == "hexagon":
        a = angle + np.arange(6) * math.pi / 3
        return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], 1)
    if kind == "star":
        a = angle + np.arange(10) * math.pi / 5 - math.pi / 2
        rr = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return np.stack([cx + rr * np.cos(a), cy + rr * np.sin(a)], 1)
    raise ValueError(kind)


def _make_image(rng, size, max_objects, classes=CLASSES):
    h = w = size
    background = rng.integers(0, 90, size=3)
    image = np.empty((h, w, 3), np.uint8)
    image[:] = background
    noise = rng.normal(0, 12, size=(h, w, 1))
    image = np.clip(image + noise, 0, 255).astype(np.uint8)
    objects = []
    occupancy = np.zeros((h, w), bool)
    for _ in range(rng.integers(1, max_objects + 1)):
        for _attempt in range(20):
            kind = int(rng.integers(len(classes)))
            r = float(rng.uniform(0.1, 0.25) * size)
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            poly = _polygon(classes[kind], cx, cy, r, float(rng.uniform(0, 2 * math.pi)))
            mask = np.zeros((h, w), np.uint8)
            cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 1)
            mask = mask.astype(bool)
            if (mask & occupancy).sum() > 0.1 * mask.sum():
                continue
            occupancy |= mask
            colour = rng.integers(110, 256, size=3)
            image[mask] = colour
            objects.append((kind, poly))
            break
    return image, objects


def generate_split(root, split, num_images, size=128, max_objects=4, seed=0, classes=CLASSES):
    """Write ``root/shapes/{split}/*.png`` and ``root/shapes/annotations/{split}.json``.

    ``classes``: the shapes drawn, in category-id order (from circle, square, triangle, star,
    hexagon).  Returns the json path.  Skipped when the json exists with the same parameters.
    """
    root = Path(root) / "shapes"
    json_path = root / "annotations" / f"{split}.json"
    params = dict(version=VERSION, split=split, num_images=num_images, size=size, max_objects=max_objects, seed=seed)
    if tuple(classes) != CLASSES:
        params["classes"] = list(classes)
    if json_path.is_file():
        try:
            if json.loads(json_path.read_text()).get("info", {}).get("params") == params:
                return json_path
        except (json.JSONDecodeError, OSError):
            pass
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])  # independent stream per (seed, split)
    images, annotations = [], []
    for i in tqdm(range(num_images), desc=f"generating shapes/{split}", disable=num_images < 50):
        image, objects = _make_image(rng, size, max_objects, tuple(classes))
        file_name = f"{i:06d}.png"
        cv2.imwrite(str(image_dir / file_name), image[:, :, ::-1])
        images.append({"id": i + 1, "file_name": file_name, "height": size, "width": size})
        for kind, poly in objects:
            poly = np.clip(poly, 0, size)
            x0, y0 = poly.min(0)
            x1, y1 = poly.max(0)
            area = float(cv2.contourArea(poly.astype(np.float32)))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": kind + 1,
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "area": area,
                    "iscrowd": 0,
                    "segmentation": [poly.reshape(-1).round(2).tolist()],
                }
            )
    data = {
        "info": {"description": "hrnet_d2 synthetic shapes", "params": params},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(classes)],
    }
    # the json marks a complete split: written last, atomically (a temporary file of its own, so
    # that the machines of a job sharing this folder can generate it at the same time)
    atomic_write(json_path, lambda f: f.write(json.dumps(data)), mode="w")
    logger.info("Generated %d images in %s", num_images, image_dir)
    return json_path


# name -> (split, num_images, size)
SPLITS = {
    "shapes_train": ("train", 600, 128),
    "shapes_val": ("val", 100, 128),
    "shapes_tiny_train": ("tiny_train", 8, 96),
    "shapes_tiny_val": ("tiny_val", 4, 96),
}


def register_shapes(root=None):
    """Register the shapes splits with Detectron2; files are generated on first use."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json

    root = Path(root) if root is not None else shapes_root()
    for name, (split, n, size) in SPLITS.items():
        if name in DatasetCatalog.list():
            continue

        def load(split=split, n=n, size=size, name=name):
            json_path = generate_split(root, split, n, size=size)
            return load_coco_json(str(json_path), str(root / "shapes" / split), name)

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(
            json_file=str(root / "shapes" / "annotations" / f"{split}.json"),
            image_root=str(root / "shapes" / split),
            evaluator_type="coco",
            thing_classes=list(CLASSES),
        )


def ensure_generated(dataset_names, root=None):
    """Generate the files of any shapes split among ``dataset_names`` (no-op when present)."""
    root = Path(root) if root is not None else shapes_root()
    for name in dataset_names:
        if name in SPLITS:
            split, n, size = SPLITS[name]
            generate_split(root, split, n, size=size)
