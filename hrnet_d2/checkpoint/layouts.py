"""Reading checkpoints and recognising their layout: the flat state dict of any accepted file
(``.pth``, ``.pkl``, ``.safetensors``, wrapped or DataParallel-prefixed), which layout it has
(ImageNet body, mmdetection detector), and the HRNet architecture its tensors describe.

Files are read without running pickled code (``torch.load(weights_only=True)``, safetensors,
or for ``.pkl`` the restricted unpickler of ``hrnet_d2.utils.safe_load``).
"""

import os
import pickle
import zipfile
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from ..modeling.arch import ARCHITECTURES, StageSpec
from ..utils.errors import UserError
from ..utils.safe_load import UnsafeFileError, load_pickle

__all__ = [
    "ConversionError",
    "arch_name",
    "checkpoint_layout",
    "describe_source",
    "describe_specs",
    "detect_stage_specs",
    "key_indices",
    "load_state_dict",
    "strip_module_prefix",
    "unwrap_state_dict",
]


class ConversionError(UserError, ValueError):
    """A checkpoint that cannot be converted; the message says why and names the file."""


def describe_source(source):
    """``'<source>: '`` to start an error message with, or nothing."""
    return f"{source}: " if source else ""


def load_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read a checkpoint without executing pickled code and return its flat state dict.

    Unwraps the usual containers (``state_dict``, ``model``, ``module.`` prefixes).
    """
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise ConversionError(f"{path}: the file is empty (truncated download?)")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            data = load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ConversionError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    elif path.endswith(".pkl"):  # Detectron2 / Caffe2 layout: numpy arrays
        try:
            data = load_pickle(path)
        except UnsafeFileError as e:
            raise ConversionError(str(e)) from None
        except Exception as e:  # truncated or not a pickle: UnpicklingError, EOFError, ValueError, ...
            raise ConversionError(f"{path}: not a readable pickle (truncated or corrupt?): {e}") from e
        data = _arrays_to_tensors(data)
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            blocked = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
            if blocked:  # weights_only refused a class/function reference: code would have run
                raise ConversionError(
                    f"{path}: holds pickled objects other than tensors and plain containers; refusing to "
                    "load it because unpickling could run arbitrary code. Re-save only the state dict "
                    f"(torch.save(model.state_dict(), ...)) or use safetensors. ({blocked[0]})"
                ) from e
            raise ConversionError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, AttributeError) as e:
            raise ConversionError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e
    return unwrap_state_dict(data, path)


def _arrays_to_tensors(data):
    if isinstance(data, dict):
        return type(data)((k, _arrays_to_tensors(v)) for k, v in data.items())
    return torch.from_numpy(data) if isinstance(data, np.ndarray) else data


def strip_module_prefix(key: str) -> str:
    """``key`` without the ``module.`` prefix that (Distributed)DataParallel adds."""
    return key[len("module.") :] if key.startswith("module.") else key


def unwrap_state_dict(data, source=""):
    """The flat state dict of tensors inside a loaded checkpoint (``state_dict`` / ``model``
    containers unwrapped, ``module.`` prefixes removed); ConversionError if there is none."""
    if isinstance(data, dict):
        for key in ("state_dict", "model", "model_state", "state_dict_ema"):
            if key in data and isinstance(data[key], dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not data:
        raise ConversionError(f"{describe_source(source)}holds {type(data).__name__}, not a state dict of tensors")
    out = OrderedDict()
    for k, v in data.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ConversionError(
                f"{describe_source(source)}entry {k!r} is a {type(v).__name__}, not a tensor: not a state dict"
            )
        out[strip_module_prefix(k)] = v
    return out


def key_indices(keys, prefix):
    """Sorted distinct integers ``i`` of keys that start with ``prefix + 'i.'``."""
    found = set()
    for k in keys:
        if k.startswith(prefix):
            head = k[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _block_type(keys, prefix):
    return "BOTTLENECK" if f"{prefix}conv3.weight" in keys else "BASIC"


def detect_stage_specs(body: Dict[str, torch.Tensor], source="") -> Tuple[Tuple[StageSpec, ...], int]:
    """The architecture of an HRNet body state dict, read from its keys and shapes.

    Returns the stage specs and the stem width.  Raises ConversionError when the
    tensors are not those of an HRNet body.
    """
    needed = ["conv1.weight", "conv2.weight", "layer1.0.conv1.weight", "stage2.0.branches.0.0.conv1.weight"]
    missing = [k for k in needed if k not in body]
    if missing:
        sample = ", ".join(list(body)[:5])
        raise ConversionError(
            f"{describe_source(source)}not an HRNet checkpoint: no {missing[0]!r} "
            f"(HRNet ImageNet/timm/mmdetection checkpoints have it). First keys: {sample}"
        )
    keys = set(body)
    specs = []
    b1 = _block_type(keys, "layer1.0.")
    specs.append(StageSpec(1, 1, b1, (len(key_indices(keys, "layer1.")),), (body["layer1.0.conv1.weight"].shape[0],)))
    k = 2
    while f"stage{k}.0.branches.0.0.conv1.weight" in body:
        modules = key_indices(keys, f"stage{k}.")
        branches = key_indices(keys, f"stage{k}.0.branches.")
        block = _block_type(keys, f"stage{k}.0.branches.0.0.")
        blocks = tuple(len(key_indices(keys, f"stage{k}.0.branches.{b}.")) for b in branches)
        channels = tuple(body[f"stage{k}.0.branches.{b}.0.conv1.weight"].shape[0] for b in branches)
        specs.append(StageSpec(len(modules), len(branches), block, blocks, channels))
        k += 1
    return tuple(specs), int(body["conv1.weight"].shape[0])


def arch_name(specs) -> Optional[str]:
    """The name in hrnet_d2.modeling.arch.ARCHITECTURES with these stage specs, or None."""
    for name, ref in ARCHITECTURES.items():
        if tuple(ref) == tuple(specs):
            return name
    return None


def describe_specs(specs):
    """E.g. ``w18_small_v1 (branch widths 16/32/64/128)``."""
    name = arch_name(specs)
    widths = "/".join(str(c) for c in specs[-1].num_channels)
    return (
        f"{name} (branch widths {widths})"
        if name
        else f"an HRNet not in the architecture table (branch widths {widths})"
    )


_MMDET_PARTS = ("neck.", "rpn_head.", "roi_head.", "bbox_head.", "mask_head.")


def checkpoint_layout(state_dict) -> Optional[str]:
    """Which convertible layout a state dict has, from its keys: ``"imagenet"`` (official
    HRNet-Image-Classification or timm: the body at the top level), ``"mmdetection"``
    (``backbone.`` body + ``neck.`` / ``*_head.``), or None (e.g. Detectron2's own names)."""
    if "conv1.weight" in state_dict and "layer1.0.conv1.weight" in state_dict:
        return "imagenet"
    if "backbone.layer1.0.conv1.weight" in state_dict and any(k.startswith(_MMDET_PARTS) for k in state_dict):
        return "mmdetection"
    return None
