"""Training and inference around Detectron2's engine: the ``Trainer`` of train_net.py, exact
``--resume`` (``resume``), launching processes (``launch``), test-time preprocessing and the
prediction PNGs (``predictor``)."""

from .launch import create_ddp_model, launch_cli, set_cpu_threads
from .resume import ResumeState, build_resumable_train_loader
from .trainer import Trainer, inference_options, use_checked_data

__all__ = [
    "Trainer",
    "ResumeState",
    "build_resumable_train_loader",
    "create_ddp_model",
    "launch_cli",
    "set_cpu_threads",
    "use_checked_data",
    "inference_options",
]
