"""Test-time preprocessing, written once: what ``detectron2.engine.DefaultPredictor.__call__``
does, for callers that hold the model and the image themselves (the demo, the prediction
PNGs of training, the export sample) and for LazyConfig models DefaultPredictor cannot build;
the PNG grid of a model's predictions that training writes; image files decoded in DataLoader
workers for batched prediction, and predictions written as COCO results (demo.py)."""

import json
import logging
import os

import cv2
import numpy as np
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from ..data.images import ImageReadError, read_image_file
from ..data.resize import resize_augmentation
from ..utils.file_io import atomic_write
from ..utils.visualization import draw_predictions

__all__ = [
    "CocoResults",
    "ImageFiles",
    "image_batches",
    "model_input",
    "test_augmentations",
    "visualize_predictions",
]

logger = logging.getLogger(__name__)


def test_augmentations(cfg):
    """DefaultPredictor's test-time resize of a YAML config (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST),
    with mmdetection's cv2 resize where INPUT.RESIZE_BACKEND says so (``data/resize.py``)."""
    return [resize_augmentation(cfg)]


def model_input(image, augmentations, height=None, width=None):
    """The model's input dict for one HxWxC image already in the model's input format:
    resized by ``augmentations``, CHW float32, and the size the outputs are rescaled to
    (the image's own unless ``height`` / ``width`` ask for another)."""
    h, w = image.shape[:2]
    resized = T.AugmentationList(list(augmentations))(T.AugInput(image)).apply_image(image)
    tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
    return {"image": tensor, "height": h if height is None else height, "width": w if width is None else width}


@torch.no_grad()
def visualize_predictions(
    cfg, model, num_images=4, dataset_name=None, output_path=None, score_threshold=0.5, min_panel_size=320
):
    """Write a PNG grid of the model's predictions on the first images of a test set.

    Small images are drawn enlarged (short side >= ``min_panel_size``) so that labels
    stay readable; the model still sees them at the test size.
    """
    if dataset_name is None:
        if not cfg.DATASETS.TEST:
            logger.info("No DATASETS.TEST: no predictions to draw")
            return None
        dataset_name = cfg.DATASETS.TEST[0]
    output_path = output_path or os.path.join(cfg.OUTPUT_DIR, "predictions.png")
    dicts = DatasetCatalog.get(dataset_name)[:num_images]
    metadata = MetadataCatalog.get(dataset_name)
    augmentations = test_augmentations(cfg)
    was_training = model.training
    model.eval()
    panels = []
    for d in dicts:
        image = utils.read_image(d["file_name"], format=cfg.INPUT.FORMAT)
        h, w = image.shape[:2]
        scale = max(1.0, min_panel_size / min(h, w))
        h, w = round(h * scale), round(w * scale)
        # outputs are rescaled to the requested height/width (masks pasted at that size)
        outputs = model([model_input(image, augmentations, h, w)])[0]
        rgb = utils.convert_image_to_rgb(image, cfg.INPUT.FORMAT)
        if scale > 1:
            rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
        panels.append(draw_predictions(rgb, outputs, metadata, score_threshold))
    model.train(was_training)
    if not panels:
        return None
    height = max(p.shape[0] for p in panels)
    panels = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0))) for p in panels]
    grid = np.concatenate(panels, axis=1)
    os.makedirs(os.path.dirname(output_path) or ".", exist_ok=True)
    cv2.imwrite(output_path, grid[:, :, ::-1])
    logger.info("Wrote predictions of %d %s images to %s", len(panels), dataset_name, output_path)
    return output_path


class ImageFiles(torch.utils.data.Dataset):
    """Image files read (``data.images.read_image_file``) and preprocessed (:func:`model_input`) in
    DataLoader workers, for batched prediction.  An item is ``{"file_name", "image", "input"}``,
    or ``{"file_name", "error"}`` for a file that cannot be read (the caller skips and counts it)."""

    def __init__(self, files, input_format, augmentations):
        self.files = list(files)
        self.input_format = input_format
        self.augmentations = augmentations

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = self.files[i]
        try:
            image = read_image_file(path, self.input_format)
        except ImageReadError as e:
            return {"file_name": path, "error": str(e)}
        return {"file_name": path, "image": image, "input": model_input(image, self.augmentations)}


def image_batches(files, input_format, augmentations, batch_size=1, num_workers=0):
    """Batches (lists) of :class:`ImageFiles` items, decoded by ``num_workers`` processes."""
    return torch.utils.data.DataLoader(
        ImageFiles(files, input_format, augmentations),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=list,
        shuffle=False,
    )


class CocoResults:
    """Predictions as COCO results (``image_id``, ``category_id`` in the dataset's ids, ``bbox`` XYWH,
    ``score``, RLE ``segmentation``): what ``pycocotools``' ``COCO.loadRes`` reads, and what
    Detectron2's COCOEvaluator writes, plus the list of images they are for.

    Image ids: those of the dataset ``metadata`` describes (its ``json_file``) for its own image
    files, else numbered in input order after the largest of them.
    """

    def __init__(self, metadata):
        self.results, self.images = [], []
        self._ids = {}
        json_file = metadata.get("json_file", None)
        image_root = metadata.get("image_root", "")
        categories = None
        if json_file and os.path.isfile(json_file):
            with open(json_file, encoding="utf-8") as f:
                data = json.load(f)
            for im in data.get("images", ()):
                self._ids[os.path.realpath(os.path.join(image_root, im["file_name"]))] = im["id"]
            categories = sorted(c["id"] for c in data.get("categories", ()))
        mapping = metadata.get("thing_dataset_id_to_contiguous_id", None)
        if mapping:
            self._category = {v: k for k, v in mapping.items()}
        elif categories:  # load_coco_json's mapping: sorted category ids -> 0..K-1
            self._category = dict(enumerate(categories))
        else:
            self._category = {}  # contiguous ids, as COCOEvaluator writes them without a mapping
        names = metadata.get("thing_classes", None) or []
        self.categories = [{"id": self._category.get(i, i), "name": n} for i, n in enumerate(names)]
        self._next = max(self._ids.values(), default=0) + 1

    def add(self, file_name, height, width, outputs):
        from detectron2.evaluation.coco_evaluation import instances_to_coco_json

        image_id = self._ids.get(os.path.realpath(file_name))
        if image_id is None:
            image_id, self._next = self._next, self._next + 1
        self.images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        if "instances" not in outputs:
            return
        for r in instances_to_coco_json(outputs["instances"].to("cpu"), image_id):
            r["category_id"] = self._category.get(r["category_id"], r["category_id"])
            self.results.append(r)

    def write(self, path):
        """``path``: the results list; ``<path stem>_images.json``: the images and categories
        (with annotations added, a COCO ground-truth file).  Returns both paths."""
        stem, _ = os.path.splitext(path)
        images_path = stem + "_images.json"
        for p, data in ((path, self.results), (images_path, {"images": self.images, "categories": self.categories})):
            os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
            atomic_write(p, lambda f, data=data: json.dump(data, f), mode="w")
        return path, images_path
