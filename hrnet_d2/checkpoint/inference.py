"""What ``MODEL.WEIGHTS`` / ``train.init_checkpoint`` mean for inference, decided once (demo.py, the
tools): the checkpoint named there (a local file, ``hrnet_d2://<name>``, or any URL Detectron2's
PathManager opens), else the ``model_final.pth`` that training wrote to OUTPUT_DIR; loaded whole
(every tensor of the model from the file, ``AtomicCheckpointer(complete=True)``)."""

import os

from ..utils.errors import UserError
from ..utils.file_io import is_local_path
from .detection_checkpoint import AtomicCheckpointer

__all__ = ["InferenceWeightsMissing", "inference_weights", "load_inference_weights"]


class InferenceWeightsMissing(UserError, FileNotFoundError):
    """No checkpoint where the config says (or, with none named, no trained model in the output folder)."""


def _keys(cfg):
    if hasattr(cfg, "MODEL"):
        return "MODEL.WEIGHTS", cfg.MODEL.WEIGHTS, "OUTPUT_DIR", cfg.OUTPUT_DIR
    return "train.init_checkpoint", cfg.train.init_checkpoint, "train.output_dir", cfg.train.output_dir


def inference_weights(cfg):
    """(config key, checkpoint path) of the weights to run ``cfg``'s model with (YAML or LazyConfig).

    A local path that does not exist raises ``InferenceWeightsMissing`` naming the key; remote
    names (``hrnet_d2://``, ``https://``...) are resolved when loaded."""
    key, weights, out_key, out_dir = _keys(cfg)
    setting = f"{key} path.pth" if key == "MODEL.WEIGHTS" else f"{key}=path.pth"
    if not weights:
        weights = os.path.join(out_dir, "model_final.pth")
        if not os.path.isfile(weights):
            raise InferenceWeightsMissing(
                f"{key} is empty and {out_key} has no trained model ({weights} does not exist): set {setting} "
                "(a checkpoint, or hrnet_d2://coco/<name> for a published detector), or train first "
                "(bash scripts/quickstart.sh for the quickstart model)"
            )
    elif is_local_path(weights) and not os.path.isfile(weights):
        raise InferenceWeightsMissing(f"{key} = {weights!r} does not exist: set {setting} to a checkpoint")
    return key, weights


def load_inference_weights(model, cfg):
    """Load the weights of :func:`inference_weights` into ``model``, whole; returns their path."""
    _, weights = inference_weights(cfg)
    AtomicCheckpointer(model, cfg=cfg, complete=True).load(weights)
    return weights
