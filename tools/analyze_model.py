#!/usr/bin/env python
"""Parameters and FLOPs (fvcore) of any hrnet_d2 config at a given input size.

Every part is counted on fixed shapes (``hrnet_d2.analysis``), so the numbers are a
property of the config alone.  fvcore counts one fused multiply-add as one FLOP; G = 1e9.

    python tools/analyze_model.py --config-file configs/COCO-Detection/faster_rcnn_hrnetv2p_w32_1x.yaml
    python tools/analyze_model.py --config-file ... --tasks parameter --input-size 800 1333 MODEL.HRNET.ARCH w18
"""

import torch

from hrnet_d2.analysis import count_flops, count_parameters, load_model, norm_affine, parameter_groups
from hrnet_d2.engine.defaults import run_tool, tool_argument_parser


def _format_table(rows, headers):
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda r: "  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def main(argv=None):
    parser = tool_argument_parser(__doc__)
    parser.add_argument("--tasks", nargs="+", choices=["parameter", "flop"], default=["parameter", "flop"])
    parser.add_argument("--input-size", nargs=2, type=int, default=[800, 1333], metavar=("H", "W"))
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 8)))

    cfg, model = load_model(args.config_file, args.opts, device="cpu" if "flop" in args.tasks else "meta")
    print(f"Config: {args.config_file}  (MODEL.HRNET.ARCH = {cfg.MODEL.HRNET.ARCH!r}, {cfg.MODEL.META_ARCHITECTURE})")
    if "parameter" in args.tasks:
        groups = parameter_groups(model)
        total = count_parameters(model)
        rows = [[k, f"{v:,}", f"{v / 1e6:.2f}"] for k, v in groups.items()]
        rows.append(["total", f"{total:,}", f"{total / 1e6:.2f}"])
        print("\nParameters (model.parameters(); FrozenBN affine/statistics are buffers):")
        print(_format_table(rows, ["module", "params", "M"]))
        affine = norm_affine(model)
        if affine:
            print(f"Norm weight+bias (parameters with BN/BNEval, buffers with FrozenBN): {affine:,}")
    if "flop" in args.tasks:
        h, w = args.input_size
        parts = count_flops(cfg, model, h, w)
        total = sum(parts.values())
        rows = [[k, f"{v / 1e9:.2f}"] for k, v in parts.items()] + [["total", f"{total / 1e9:.2f}"]]
        print(
            f"\nFLOPs (fvcore, 1 multiply-add = 1 FLOP) at {h}x{w}; ROI heads on "
            f"{cfg.MODEL.RPN.POST_NMS_TOPK_TEST} proposals / {cfg.TEST.DETECTIONS_PER_IMAGE} detections:"
        )
        print(_format_table(rows, ["part", "GFLOPs"]))
    return 0


if __name__ == "__main__":
    run_tool(main)
