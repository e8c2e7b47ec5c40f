"""Test-time preprocessing, written once: what ``detectron2.engine.DefaultPredictor.__call__``
does, for callers that hold the model and the image themselves (the demo, the prediction
PNGs of training, the export sample) and for LazyConfig models DefaultPredictor cannot build."""

import torch

from detectron2.data import transforms as T

from .data.resize import resize_augmentation

__all__ = ["test_augmentations", "model_input"]


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
