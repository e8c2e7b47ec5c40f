"""Generated datasets: "shapes" (instances) and its keypoint / semantic / panoptic twins."""

from .shapes import ensure_generated, register_shapes
from .shapes_extras import ensure_generated_extras, register_shapes_extras

__all__ = ["register_all_shapes", "ensure_all_generated"]


def register_all_shapes(root=None):
    """Register every generated dataset with Detectron2 (files are made on first use)."""
    register_shapes(root)
    register_shapes_extras(root)


def ensure_all_generated(dataset_names, root=None):
    """Write the files of any generated dataset among ``dataset_names`` (no-op when present)."""
    ensure_generated(dataset_names, root)
    ensure_generated_extras(dataset_names, root)
