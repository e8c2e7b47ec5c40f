"""Reading any image file a user points a model at: grayscale, palette, RGBA, CMYK, 16-bit and
EXIF-rotated files give an 8-bit image in the model's input format; a file that cannot be read
raises ``ImageReadError`` naming it (the caller decides whether to skip it)."""

import numpy as np
from PIL import Image, ImageOps

from detectron2.data.detection_utils import convert_PIL_to_numpy

from ..utils.errors import UserError

__all__ = ["ImageReadError", "read_image_file"]


class ImageReadError(UserError, OSError):
    """A file that is not a readable image (truncated, not an image, unsupported)."""


def _to_8bit(image):
    """A PIL image with 8-bit channels: 16/32-bit integer images scaled from their range, float
    images from [0, 1] (or clipped to [0, 255] when they go beyond 1)."""
    if image.mode in ("1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "RGBX", "La", "RGBa"):
        return image
    array = np.asarray(image)
    if image.mode.startswith("I;16") or (array.dtype.kind in "iu" and array.max(initial=0) <= 65535):
        scaled = array.astype(np.float64) / 257.0  # 65535 -> 255
    elif array.dtype.kind in "iu":
        scaled = array.astype(np.float64) / float(np.iinfo(array.dtype).max) * 255.0
    else:  # float ("F")
        scaled = array * 255.0 if np.nanmax(array, initial=0.0) <= 1.0 else array
    return Image.fromarray(np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8), mode="L")


def read_image_file(path, format="BGR"):
    """``path`` as an HxWxC uint8 array in ``format`` (Detectron2's: "BGR", "RGB", "L", ...),
    EXIF orientation applied (as ``detection_utils.read_image``).  Alpha is dropped."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            image.load()
            image = _to_8bit(image)
            if format in ("BGR", "RGB", "YUV-BT.601") and image.mode != "RGB":
                image = image.convert("RGB")
            return convert_PIL_to_numpy(image, format)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        if isinstance(e, FileNotFoundError):
            problem = "does not exist"
        else:
            problem = f"is not a readable image ({type(e).__name__}: {e})"
        raise ImageReadError(f"{path} {problem}") from e
