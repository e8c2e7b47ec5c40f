"""Generated datasets: "shapes" (instances) and its keypoint / semantic / panoptic twins."""

from detectron2.utils import comm

from .checks import check_datasets
from .shapes import ensure_generated, register_shapes
from .shapes_extras import ensure_generated_extras, register_shapes_extras

__all__ = ["register_all_shapes", "ensure_all_generated", "prepare_datasets"]


def register_all_shapes(root=None):
    """Register every generated dataset with Detectron2 (files are made on first use)."""
    register_shapes(root)
    register_shapes_extras(root)


def ensure_all_generated(dataset_names, root=None):
    """Write the files of any generated dataset among ``dataset_names`` (no-op when present)."""
    ensure_generated(dataset_names, root)
    ensure_generated_extras(dataset_names, root)


def prepare_datasets(dataset_names, root=None):
    """Make the datasets ``dataset_names`` ready in every process of a job: the generated ones
    are written by local rank 0 of every machine (machines need not share a folder; on a
    shared one the writes are atomic), the others wait, then every process checks the files
    (``check_datasets``: a machine that lacks some stops the job with one line naming it)."""
    if comm.get_local_rank() == 0:
        ensure_all_generated(dataset_names, root)
    comm.synchronize()
    check_datasets(dataset_names)
