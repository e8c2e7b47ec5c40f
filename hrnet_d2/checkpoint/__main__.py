"""The converter's command line: ``python -m hrnet_d2.checkpoint`` (also ``python -m hrnet_d2.convert``
and the ``hrnet-d2-convert`` script).  See :mod:`hrnet_d2.checkpoint.convert`."""

import argparse
import sys

from ..modeling.arch import ARCHITECTURES
from ..modeling.build import BACKBONES, DETECTOR_BACKBONE
from ..utils.errors import UserError, add_debug_argument, debug_enabled
from .convert import convert_file

__all__ = ["main"]


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m hrnet_d2.convert",
        description="Convert an HRNet checkpoint (official ImageNet .pth, timm .pth/.safetensors, or "
        "mmdetection HRNet Faster/Mask/Cascade (Mask) R-CNN, Hybrid Task Cascade or FCOS .pth) into a Detectron2 checkpoint for MODEL.WEIGHTS.",
    )
    p.add_argument("src", help="input checkpoint")
    p.add_argument("dst", help="output .pth (Detectron2 format)")
    p.add_argument(
        "--config-file",
        help="target config: its backbone and MODEL.HRNET width are checked, and for an mmdetection detector its "
        "kind, cascade stages, MODEL.MASK_ON, NUM_CLASSES and every head tensor's shape",
    )
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), help="expected architecture (checked)")
    p.add_argument(
        "--backbone",
        choices=sorted(BACKBONES),
        help=f"target MODEL.BACKBONE.NAME (default: from --config-file, else {DETECTOR_BACKBONE})",
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
