"""Convert HRNet checkpoints into Detectron2 checkpoints for ``MODEL.WEIGHTS``.

Accepted inputs (the format is detected from the keys, the width from tensor shapes):
  * official HRNet-Image-Classification ImageNet checkpoints (``hrnetv2_w32_imagenet_pretrained.pth``,
    ``hrnet_w18_small_model_v1.pth``, ...): a plain state dict;
  * timm ``hrnet_*`` state dicts (``.pth`` or ``.safetensors``), which use the same names;
  * mmdetection HRNet detection checkpoints (``backbone.*`` + HRFPN ``neck.*``): the body
    and the HRNetV2p pyramid are converted; detector heads (``rpn_head``, ``roi_head``...)
    are left out because their layout differs from Detectron2's.

Files are read without running pickled code (``torch.load(weights_only=True)``,
safetensors, or for ``.pkl`` the restricted unpickler of ``hrnet_d2.safe_load``).  Usage::

    python -m hrnet_d2.convert hrnetv2_w32_imagenet_pretrained.pth pretrained/hrnetv2_w32_imagenet_d2.pth \\
        --config-file configs/COCO-Detection/faster_rcnn_hrnetv2p_w32_1x.yaml
"""
import argparse
import os
import pickle
import re
import sys
import zipfile
from collections import Counter, OrderedDict
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .arch import ARCHITECTURES, StageSpec
from .errors import UserError, add_debug_argument, debug_enabled
from .safe_load import UnsafeFileError, load_pickle

__all__ = [
    "ConversionError",
    "Conversion",
    "load_state_dict",
    "unwrap_state_dict",
    "detect_stage_specs",
    "arch_name",
    "checkpoint_layout",
    "convert_state_dict",
    "describe_specs",
    "convert_file",
    "main",
]

# Parts of the HRNet body (what hrnet_d2.HRNet holds).
_BODY = re.compile(r"^(conv1|bn1|conv2|bn2|layer1|transition\d+|stage\d+)\.")
# Parts only the ImageNet classifier uses (official / timm).
_CLASSIFICATION_ONLY = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.", "head.", "fc.")
# mmdetection HRFPN neck (v0.x HRNet-Object-Detection, v1 and v2+ layouts) -> HRNetV2p names.
_NECK_RULES = [
    (re.compile(r"^reduction_conv\.(?:0\.|conv\.)?(weight|bias)$"), r"reduction_conv.\1"),
    (re.compile(r"^reduction_conv\.(?:bn|gn|norm)\.(.+)$"), r"reduction_conv.norm.\1"),
    (re.compile(r"^fpn_convs?\.(\d+)\.(?:conv\.)?(weight|bias)$"), r"fpn_convs.\1.\2"),
    (re.compile(r"^fpn_convs?\.(\d+)\.(?:bn|gn|norm)\.(.+)$"), r"fpn_convs.\1.norm.\2"),
    (re.compile(r"^fpn_conv\.(weight|bias)$"), r"fpn_convs.0.\1"),  # share_conv=True
]
# Detectron2 key prefix of the body, per MODEL.BACKBONE.NAME.
BODY_PREFIX = {
    "build_hrnetv2p_backbone": "backbone.bottom_up.",
    "build_hrnetv2p_with_body_backbone": "backbone.bottom_up.",
    "build_hrnet_fpn_backbone": "backbone.bottom_up.",
    "build_hrnet_backbone": "backbone.",
}
PYRAMID_PREFIX = "backbone."


class ConversionError(UserError, ValueError):
    """A checkpoint that cannot be converted; the message says why and names the file."""


def _describe(source):
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


def unwrap_state_dict(data, source=""):
    """The flat state dict of tensors inside a loaded checkpoint (``state_dict`` / ``model``
    containers unwrapped, ``module.`` prefixes removed); ConversionError if there is none."""
    if isinstance(data, dict):
        for key in ("state_dict", "model", "model_state", "state_dict_ema"):
            if key in data and isinstance(data[key], dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not data:
        raise ConversionError(f"{_describe(source)}holds {type(data).__name__}, not a state dict of tensors")
    out = OrderedDict()
    for k, v in data.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ConversionError(
                f"{_describe(source)}entry {k!r} is a {type(v).__name__}, not a tensor: not a state dict"
            )
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def _indices(keys, prefix):
    """Sorted distinct integers ``i`` of keys that start with ``prefix + 'i.'``."""
    found = set()
    for k in keys:
        if k.startswith(prefix):
            head = k[len(prefix):].split(".", 1)[0]
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
            f"{_describe(source)}not an HRNet checkpoint: no {missing[0]!r} "
            f"(HRNet ImageNet/timm/mmdetection checkpoints have it). First keys: {sample}"
        )
    keys = set(body)
    specs = []
    b1 = _block_type(keys, "layer1.0.")
    specs.append(StageSpec(1, 1, b1, (len(_indices(keys, "layer1.")),), (body["layer1.0.conv1.weight"].shape[0],)))
    k = 2
    while f"stage{k}.0.branches.0.0.conv1.weight" in body:
        modules = _indices(keys, f"stage{k}.")
        branches = _indices(keys, f"stage{k}.0.branches.")
        block = _block_type(keys, f"stage{k}.0.branches.0.0.")
        blocks = tuple(len(_indices(keys, f"stage{k}.0.branches.{b}.")) for b in branches)
        channels = tuple(body[f"stage{k}.0.branches.{b}.0.conv1.weight"].shape[0] for b in branches)
        specs.append(StageSpec(len(modules), len(branches), block, blocks, channels))
        k += 1
    return tuple(specs), int(body["conv1.weight"].shape[0])


def arch_name(specs) -> Optional[str]:
    """The name in hrnet_d2.arch.ARCHITECTURES with these stage specs, or None."""
    for name, ref in ARCHITECTURES.items():
        if tuple(ref) == tuple(specs):
            return name
    return None


def describe_specs(specs):
    """E.g. ``w18_small_v1 (branch widths 16/32/64/128)``."""
    name = arch_name(specs)
    widths = "/".join(str(c) for c in specs[-1].num_channels)
    return f"{name} (branch widths {widths})" if name else f"an HRNet not in the architecture table (branch widths {widths})"


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


class Conversion:
    """What a conversion produced: the Detectron2 state dict and a report of every key."""

    def __init__(self):
        self.state_dict = OrderedDict()
        self.mapped: List[Tuple[str, str]] = []
        self.dropped: List[Tuple[str, str]] = []  # (key, reason)
        self.unexpected: List[str] = []
        self.specs = None
        self.stem_channels = None
        self.source_format = ""
        self.body_prefix = ""

    @property
    def arch(self):
        return arch_name(self.specs)

    def report(self) -> str:
        lines = [f"Detected: {self.source_format}, HRNet {describe_specs(self.specs)}, stem width {self.stem_channels}"]
        neck = sum(1 for src, _ in self.mapped if src.startswith("neck."))
        lines.append(f"Mapped {len(self.mapped)} tensors:")
        lines.append(f"  HRNet body ({len(self.mapped) - neck}) -> {self.body_prefix}*")
        if neck:
            lines.append(f"  HRFPN neck ({neck}) -> {PYRAMID_PREFIX}reduction_conv.*, {PYRAMID_PREFIX}fpn_convs.*")
        lines.append(f"Dropped {len(self.dropped)} tensors:")
        for (group, reason), n in sorted(Counter((_group(k), r) for k, r in self.dropped).items()):
            lines.append(f"  {group} ({n}): {reason}")
        lines.append(f"Unexpected (not HRNet, left out) {len(self.unexpected)} tensors" + (":" if self.unexpected else ""))
        for group, n in sorted(Counter(_group(k) for k in self.unexpected).items()):
            lines.append(f"  {group} ({n})")
        return "\n".join(lines)


def _group(key):
    """A short pattern for a set of keys in the report."""
    if key.endswith("num_batches_tracked"):
        return "*.num_batches_tracked"
    parts = key.split(".")
    depth = 2 if parts[0] in ("backbone", "neck", "roi_head", "rpn_head") and len(parts) > 2 else 1
    return ".".join(parts[:depth]) + ".*"


def _expected_body(specs, stem_channels):
    """Names and shapes of the tensors hrnet_d2.HRNet holds for these specs (FrozenBN)."""
    from .hrnet import HRNet

    with torch.device("meta"):
        model = HRNet(specs, norm="FrozenBN", stem_channels=stem_channels)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert_state_dict(
    state_dict: Dict[str, torch.Tensor],
    *,
    backbone: str = "build_hrnetv2p_backbone",
    expected_specs=None,
    expected_stem_channels: Optional[int] = None,
    expected_from: str = "",
    source: str = "",
) -> Conversion:
    """Map an HRNet classification / timm / mmdetection state dict to Detectron2 names.

    ``backbone`` is the target MODEL.BACKBONE.NAME: it decides where the body lives
    ("backbone.bottom_up." for HRNetV2p/FPN, "backbone." for the bare body) and whether
    an mmdetection HRFPN neck has somewhere to go.  With ``expected_specs`` the
    checkpoint's width must match it; ``expected_from`` names where the expectation
    came from (a config key) for the error message.
    """
    if backbone not in BODY_PREFIX:
        raise ConversionError(f"backbone {backbone!r} is not one of {sorted(BODY_PREFIX)}")
    body_prefix = BODY_PREFIX[backbone]
    conv = Conversion()
    conv.body_prefix = body_prefix
    mmdet = any(k.startswith("backbone.") for k in state_dict)
    conv.source_format = "mmdetection detection checkpoint" if mmdet else "HRNet ImageNet (official/timm) checkpoint"
    body, neck = OrderedDict(), OrderedDict()
    for k, v in state_dict.items():
        if mmdet:
            if k.startswith("backbone."):
                body[k[len("backbone."):]] = v
            elif k.startswith("neck."):
                neck[k[len("neck."):]] = v
            elif k.split(".")[0] in ("rpn_head", "roi_head", "bbox_head", "mask_head", "bbox_roi_extractor", "mask_roi_extractor"):
                conv.dropped.append((k, "detector head: not converted (layout differs from Detectron2's)"))
            else:
                conv.unexpected.append(k)
        else:
            body[k] = v

    specs, stem = detect_stage_specs(body, source)
    conv.specs, conv.stem_channels = specs, stem
    if expected_specs is not None and tuple(expected_specs) != specs:
        raise ConversionError(
            f"{_describe(source)}width mismatch: found HRNet {describe_specs(specs)} in the checkpoint, "
            f"expected {describe_specs(tuple(expected_specs))} from {expected_from or 'the target'}"
        )
    if expected_stem_channels is not None and expected_stem_channels != stem:
        raise ConversionError(
            f"{_describe(source)}stem width mismatch: the checkpoint's conv1 has {stem} channels, "
            f"but MODEL.HRNET.STEM_CHANNELS = {expected_stem_channels}"
        )

    expected = _expected_body(specs, stem)
    for k, v in body.items():
        if k.endswith("num_batches_tracked"):
            conv.dropped.append((("backbone." if mmdet else "") + k, "BatchNorm step counter (FrozenBN has none)"))
        elif _BODY.match(k):
            if k not in expected:
                conv.unexpected.append(("backbone." if mmdet else "") + k)
                continue
            if tuple(v.shape) != expected[k]:
                raise ConversionError(
                    f"{_describe(source)}{k} has shape {tuple(v.shape)}, expected {expected[k]} for HRNet {describe_specs(specs)}"
                )
            dst = body_prefix + k
            conv.state_dict[dst] = v
            conv.mapped.append((k, dst))
        elif k.startswith(_CLASSIFICATION_ONLY):
            conv.dropped.append((k, "ImageNet classification head (not used by detectors)"))
        else:
            conv.unexpected.append(("backbone." if mmdet else "") + k)
    absent = [k for k in expected if body_prefix + k not in conv.state_dict]
    if absent:
        raise ConversionError(
            f"{_describe(source)}incomplete HRNet body: {len(absent)} tensors missing, e.g. {absent[:3]}"
        )

    pyramid_target = backbone == "build_hrnetv2p_backbone"
    for k, v in neck.items():
        if k.endswith("num_batches_tracked"):
            conv.dropped.append(("neck." + k, "BatchNorm step counter"))
            continue
        for pattern, repl in _NECK_RULES:
            if pattern.match(k):
                if pyramid_target:
                    dst = PYRAMID_PREFIX + pattern.sub(repl, k)
                    conv.state_dict[dst] = v
                    conv.mapped.append(("neck." + k, dst))
                else:
                    conv.dropped.append(("neck." + k, "HRFPN neck: the target backbone has no HRNetV2p pyramid"))
                break
        else:
            conv.unexpected.append("neck." + k)
    return conv


def _target_from_config(config_file, opts):
    from .build import stage_specs_from_cfg
    from .config import get_hrnet_cfg

    cfg = get_hrnet_cfg(config_file, opts)
    name = cfg.MODEL.BACKBONE.NAME
    if name not in BODY_PREFIX:
        raise ConversionError(
            f"{config_file}: MODEL.BACKBONE.NAME = {name!r} is not an hrnet_d2 backbone; allowed: {sorted(BODY_PREFIX)}"
        )
    where = f"{config_file} (MODEL.HRNET.ARCH = {cfg.MODEL.HRNET.ARCH!r})"
    return name, stage_specs_from_cfg(cfg), cfg.MODEL.HRNET.STEM_CHANNELS, where


def convert_file(src, dst, *, config_file=None, opts=(), arch=None, backbone=None) -> Conversion:
    """Convert ``src`` and write a Detectron2 checkpoint to ``dst``; see :func:`main`."""
    target = backbone or "build_hrnetv2p_backbone"
    expected_specs, expected_stem, expected_from = None, None, ""
    if config_file:
        cfg_backbone, expected_specs, expected_stem, expected_from = _target_from_config(config_file, opts)
        if backbone is None:
            target = cfg_backbone
    if arch:
        if arch not in ARCHITECTURES:
            raise ConversionError(f"--arch {arch!r} is not one of {sorted(ARCHITECTURES)}")
        if expected_specs is not None and tuple(ARCHITECTURES[arch]) != tuple(expected_specs):
            raise ConversionError(f"--arch {arch} contradicts {expected_from}")
        expected_specs, expected_from = ARCHITECTURES[arch], expected_from or f"--arch {arch}"
    conv = convert_state_dict(
        load_state_dict(src),
        backbone=target,
        expected_specs=expected_specs,
        expected_stem_channels=expected_stem,
        expected_from=expected_from,
        source=src,
    )
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    torch.save(
        {"model": {k: v.contiguous() for k, v in conv.state_dict.items()}, "__author__": f"hrnet_d2.convert from {os.path.basename(src)}", "matching_heuristics": False},
        dst,
    )
    return conv


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m hrnet_d2.convert",
        description="Convert an HRNet checkpoint (official ImageNet .pth, timm .pth/.safetensors, or "
        "mmdetection HRNet detection .pth) into a Detectron2 checkpoint for MODEL.WEIGHTS.",
    )
    p.add_argument("src", help="input checkpoint")
    p.add_argument("dst", help="output .pth (Detectron2 format)")
    p.add_argument("--config-file", help="target config: its backbone and MODEL.HRNET width are checked")
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), help="expected architecture (checked)")
    p.add_argument(
        "--backbone",
        choices=sorted(BODY_PREFIX),
        help="target MODEL.BACKBONE.NAME (default: from --config-file, else build_hrnetv2p_backbone)",
    )
    p.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE", help="config overrides for --config-file")
    return add_debug_argument(p)


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.opts and not args.config_file:
        parser.error("--opts needs --config-file")
    try:
        conv = convert_file(
            args.src, args.dst, config_file=args.config_file, opts=args.opts, arch=args.arch, backbone=args.backbone
        )
    except UserError as e:  # ConversionError, or a config error of --config-file
        if args.debug or debug_enabled([]):
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(conv.report())
    print(f"Wrote {args.dst}; use it with MODEL.WEIGHTS {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
