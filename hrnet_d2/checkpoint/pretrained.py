"""The converted ImageNet weights the shipped configs name, and a check that stops training
at once (before any model or data is built) when that file is missing.  Where the weights
come from is in the model-zoo table (``hrnet_d2.checkpoint.zoo``)."""

import os

from ..modeling.arch import ARCHITECTURES
from ..utils.errors import UserError
from ..utils.file_io import is_local_path
from .catalog import PREFIX
from .zoo import HRNET_CLASSIFICATION_REPO as OFFICIAL_REPO
from .zoo import imagenet_bodies

__all__ = ["IMAGENET_CHECKPOINTS", "PretrainedWeightsMissing", "converted_weights_path", "check_pretrained_weights"]

# arch -> (file name in the official HRNet-Image-Classification release, timm model name); from hrnet_d2.checkpoint.zoo
IMAGENET_CHECKPOINTS = {arch: (e.official_file, e.timm_name) for arch, e in imagenet_bodies().items()}
assert set(IMAGENET_CHECKPOINTS) == set(ARCHITECTURES)


def converted_weights_path(arch: str) -> str:
    """The MODEL.WEIGHTS the shipped COCO configs use for ``arch``."""
    stem = os.path.splitext(IMAGENET_CHECKPOINTS[arch][0])[0].replace("_pretrained", "")
    return f"pretrained/{stem}_d2.pth"


class PretrainedWeightsMissing(UserError, FileNotFoundError):
    """MODEL.WEIGHTS names a local file that does not exist; the message says how to make it."""


def check_pretrained_weights(cfg, config_file=None, resume=False):
    """Stop with the command that makes the file when MODEL.WEIGHTS is a missing local file.

    Remote weights (``detectron2://``, ``https://``, ...) and "" are left to Detectron2;
    so is a run that resumes from a checkpoint already in OUTPUT_DIR.
    """
    path = cfg.MODEL.WEIGHTS
    if not is_local_path(path) or os.path.exists(path):
        return
    if resume and os.path.exists(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")):
        return
    arch = cfg.MODEL.HRNET.ARCH
    lines = [f"MODEL.WEIGHTS = {path!r} does not exist."]
    if arch in IMAGENET_CHECKPOINTS:
        official, timm_name = IMAGENET_CHECKPOINTS[arch]
        target = f"--config-file {config_file}" if config_file else f"--arch {arch}"
        lines += [
            f"It should hold the ImageNet weights of HRNet {arch} converted for Detectron2. Make it with:",
            f"  1. download {official} from {OFFICIAL_REPO} (README, 'ImageNet pretrained models'),",
            f"     or the timm weights of '{timm_name}' (timm/{timm_name}.ms_in1k on the Hugging Face hub: model.safetensors);",
            f"  2. python -m hrnet_d2.convert {official} {path} {target}",
            f"Or let hrnet_d2 download, check and convert it (network needed): MODEL.WEIGHTS {PREFIX}imagenet/{arch}",
        ]
    lines.append(
        'Or train from scratch with MODEL.WEIGHTS "" (and MODEL.HRNET.NORM BN or GN, since frozen norms need pretrained statistics).'
    )
    raise PretrainedWeightsMissing("\n".join(lines))
