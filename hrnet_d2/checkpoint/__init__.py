"""Weights: the checkpointer (atomic saves, safe loading, fit checks, on-the-fly conversion),
the conversion of official / timm / mmdetection checkpoints, the zoo table and the
``hrnet_d2://`` names.  ``python -m hrnet_d2.checkpoint`` is the converter's command line.

Importing this package registers the ``hrnet_d2://`` handler in Detectron2's PathManager.
"""

from .catalog import UnknownZooName, ZooDownloadError
from .detection_checkpoint import AtomicCheckpointer, CheckpointError, CheckpointNotFound, CheckpointWriteError

__all__ = [
    "AtomicCheckpointer",
    "CheckpointError",
    "CheckpointNotFound",
    "CheckpointWriteError",
    "UnknownZooName",
    "ZooDownloadError",
]
