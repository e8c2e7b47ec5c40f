"""Detectron2's DatasetMapper with errors that name the image file.

Grayscale, palette, RGBA and CMYK images already work: ``detection_utils.read_image``
converts them to ``INPUT.FORMAT`` (RGB/BGR, alpha dropped).  Images smaller than the
network stride work too (resize, then padding to the backbone's size divisibility).
What this adds: resizing by ``INPUT.RESIZE_BACKEND`` (``data/resize.py``); a missing, corrupt or truncated image, or one whose size differs from
its annotation, stops training with a ``DataError`` naming the file instead of an
exception from deep inside PIL/numpy; and the mapper never returns None, so
Detectron2's MapDataset never silently replaces a bad sample with a random other one.
"""

from PIL import UnidentifiedImageError

from detectron2.data import DatasetMapper
from detectron2.data.detection_utils import SizeMismatchError

from .checks import DataError
from .resize import use_resize_backend

__all__ = ["CheckedDatasetMapper"]


class CheckedDatasetMapper(DatasetMapper):
    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        ret["augmentations"] = use_resize_backend(cfg, ret["augmentations"])  # INPUT.RESIZE_BACKEND
        return ret

    def __call__(self, dataset_dict):
        name = dataset_dict.get("file_name", "<record without file_name>")
        if "sem_seg_file_name" in dataset_dict:
            name = f"{name} (sem_seg {dataset_dict['sem_seg_file_name']})"
        try:
            return super().__call__(dataset_dict)
        except FileNotFoundError as e:
            raise DataError(f"Image {name}: file not found ({e.filename or e})") from e
        except UnidentifiedImageError as e:
            raise DataError(f"Image {name} cannot be decoded: not an image file, or corrupt") from e
        except SizeMismatchError as e:
            raise DataError(f"Image {name}: size on disk differs from the annotation's height/width: {e}") from e
        except OSError as e:  # e.g. "image file is truncated"
            raise DataError(f"Image {name} cannot be read: {e}") from e
        except Exception as e:
            raise DataError(f"Sample {name} could not be prepared: {type(e).__name__}: {e}") from e
