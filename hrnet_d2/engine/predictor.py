"""Test-time preprocessing, written once: what ``detectron2.engine.DefaultPredictor.__call__``
does, for callers that hold the model and the image themselves (the demo, the prediction
PNGs of training, the export sample) and for LazyConfig models DefaultPredictor cannot build;
and the PNG grid of a model's predictions that training writes."""

import logging
import os

import cv2
import numpy as np
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from ..data.resize import resize_augmentation
from ..utils.visualization import draw_predictions

__all__ = ["test_augmentations", "model_input", "visualize_predictions"]

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
