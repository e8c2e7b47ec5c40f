"""The image resize of ``INPUT.RESIZE_BACKEND``: Detectron2's (PIL) or mmdetection's (cv2).

Detectron2's ``ResizeShortestEdge`` resizes uint8 images with PIL's bilinear filter, which
antialiases when shrinking, and rounds the size after two scalings.  mmdetection's
``Resize(scale=(1333, 800), keep_ratio=True)`` (``mmcv.imrescale``) uses ``cv2.resize`` with
``INTER_LINEAR`` and sizes ``int(w * s + 0.5), int(h * s + 0.5)`` with
``s = min(max_size / long side, short_edge / short side)``.  Upscaled images differ by at most
one grey level between the two, shrunk ones by more; models converted from mmdetection are
evaluated with ``INPUT.RESIZE_BACKEND "cv2"`` to see the pixels they were evaluated on.
"""

import cv2
import numpy as np

from detectron2.data import transforms as T

__all__ = [
    "RESIZE_BACKENDS",
    "CV2ResizeShortestEdge",
    "resize_augmentation",
    "resize_shortest_edge",
    "use_resize_backend",
]

RESIZE_BACKENDS = ("PIL", "cv2")


class _CV2ResizeTransform(T.ResizeTransform):
    def apply_image(self, img, interp=None):
        assert img.shape[:2] == (self.h, self.w)
        if img.dtype != np.uint8 or (interp is not None and interp != self.interp):
            return super().apply_image(img, interp)
        out = cv2.resize(img, (self.new_w, self.new_h), interpolation=cv2.INTER_LINEAR)
        return out.reshape(self.new_h, self.new_w, *img.shape[2:])  # cv2 drops a channel axis of 1


class CV2ResizeShortestEdge(T.ResizeShortestEdge):
    """``ResizeShortestEdge`` with mmcv's size rounding and ``cv2.INTER_LINEAR`` (see module doc)."""

    @staticmethod
    def get_output_shape(oldh, oldw, short_edge_length, max_size):
        scale = short_edge_length / min(oldh, oldw)
        if max_size and max_size > 0:
            scale = min(max_size / max(oldh, oldw), scale)
        return int(oldh * float(scale) + 0.5), int(oldw * float(scale) + 0.5)

    def get_transform(self, image):
        h, w = image.shape[:2]
        if self.is_range:
            size = np.random.randint(self.short_edge_length[0], self.short_edge_length[1] + 1)
        else:
            size = np.random.choice(self.short_edge_length)
        if size == 0:
            return T.NoOpTransform()
        newh, neww = self.get_output_shape(h, w, int(size), self.max_size)
        return _CV2ResizeTransform(h, w, newh, neww, self.interp)


def resize_shortest_edge(backend, *args, **kwargs):
    """A ``ResizeShortestEdge(*args, **kwargs)`` done by ``backend``: "PIL" (Detectron2's own) or "cv2"
    (mmcv's, :class:`CV2ResizeShortestEdge`)."""
    if backend not in RESIZE_BACKENDS:
        raise ValueError(f"backend = {backend!r} is invalid: allowed: {list(RESIZE_BACKENDS)}")
    return (CV2ResizeShortestEdge if backend == "cv2" else T.ResizeShortestEdge)(*args, **kwargs)


def resize_augmentation(cfg):
    """The test-time resize of ``cfg`` (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``, ``RESIZE_BACKEND``)."""
    return resize_shortest_edge(
        cfg.INPUT.RESIZE_BACKEND, [cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST, "choice"
    )


def use_resize_backend(cfg, augmentations):
    """``augmentations`` with each ``ResizeShortestEdge`` done by ``INPUT.RESIZE_BACKEND``."""
    out = []
    for aug in augmentations:
        if type(aug) is T.ResizeShortestEdge:
            style = "range" if aug.is_range else "choice"
            aug = resize_shortest_edge(cfg.INPUT.RESIZE_BACKEND, aug.short_edge_length, aug.max_size, style, aug.interp)
        out.append(aug)
    return out
