#!/usr/bin/env python
"""Does low-precision inference (autocast bf16 / fp16) give the same detections as fp32?

Runs a trained model over a test set twice per batch, in fp32 and in the low dtype (by default
as MODEL.HRNET.INFERENCE_AUTOCAST runs it: backbone and the heads' convs / FCs; ``--mode
autocast``: the whole model under torch.autocast), and
reports for each the COCO AP (the dataset's evaluator) and how the detections agree:
the share of fp32 detections above ``--score`` that have an autocast detection of the same
class with IoU >= ``--iou``, and the score difference of those pairs.  Writes a JSON.

    # the quickstart model (after bash scripts/quickstart.sh), bf16 on CPU:
    python tools/precision_check.py --dtype bf16
    # any config + weights, fp16 on a GPU:
    python tools/precision_check.py --config-file <yaml> --dtype fp16 --opts MODEL.WEIGHTS model.pth MODEL.DEVICE cuda
"""

import json
import logging
import os
from pathlib import Path

import torch
from tqdm import tqdm

from detectron2.evaluation import print_csv_format

from hrnet_d2.checkpoint.inference import load_inference_weights
from hrnet_d2.data import ensure_all_generated
from hrnet_d2.engine import Trainer
from hrnet_d2.engine.defaults import run_tool, tool_argument_parser, tool_setup
from hrnet_d2.engine.profiling import detection_agreement
from hrnet_d2.modeling.inference_autocast import set_inference_autocast
from hrnet_d2.utils.file_io import atomic_write, check_output_dir

REPO = Path(__file__).resolve().parents[1]

logger = logging.getLogger("hrnet_d2.precision_check")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_CONFIG = REPO / "configs/quickstart/mask_rcnn_hrnetv2p_w18_small_shapes.yaml"


def _shown(path):
    """A path inside the repository relative to it: the JSON names no directory of this machine."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(path)


def main(argv=None):
    parser = tool_argument_parser(__doc__, default_config=DEFAULT_CONFIG, opts_flag=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="autocast dtype to compare with fp32")
    parser.add_argument("--score", type=float, default=0.5, help="fp32 detections at or above this score are matched")
    parser.add_argument("--iou", type=float, default=0.9, help="IoU for a detection to count as the same")
    parser.add_argument(
        "--mode",
        choices=("switch", "autocast"),
        default="switch",
        help="switch: MODEL.HRNET.INFERENCE_AUTOCAST <dtype> (backbone + heads' convs / FCs in the low dtype, "
        "decoding, ROIAlign, NMS, pasting fp32: what users run); autocast: the whole model under torch.autocast",
    )
    parser.add_argument("--max-images", type=int, default=0, help="stop after this many images (0: all)")
    parser.add_argument("--output", default=None, help="JSON path (default: OUTPUT_DIR/precision_<dtype>.json)")
    args = parser.parse_args(argv)
    if args.output:  # before the run, not after it
        check_output_dir(os.path.dirname(os.path.abspath(args.output)), key="--output")
    cfg = tool_setup(args)
    ensure_all_generated(list(cfg.DATASETS.TEST))
    cfg.MODEL.HRNET.INFERENCE_AUTOCAST = ""  # the fp32 reference; the low dtype is switched on per batch
    model = Trainer.build_model(cfg).eval()
    weights = load_inference_weights(model, cfg)  # MODEL.WEIGHTS, else OUTPUT_DIR/model_final.pth
    device = torch.device(cfg.MODEL.DEVICE).type
    dataset = cfg.DATASETS.TEST[0]
    loader = Trainer.build_test_loader(cfg, dataset)
    out_dir = os.path.join(cfg.OUTPUT_DIR, f"precision_{args.dtype}")
    # --dtype fp32 is the tool's own control: fp32 against itself
    names = ("fp32", args.dtype if args.dtype != "fp32" else "fp32 (again)")
    ev_ref, ev_low = (Trainer.build_evaluator(cfg, dataset, os.path.join(out_dir, sub)) for sub in ("fp32", "autocast"))
    for e in (ev_ref, ev_low):
        e.reset()
    matched = total = images = 0
    diffs = []
    with torch.no_grad():
        for inputs in tqdm(loader, desc=f"fp32 vs {args.dtype}", total=len(loader)):
            ref = model(inputs)
            low_dtype = "" if args.dtype == "fp32" else args.dtype
            if args.mode == "switch":
                set_inference_autocast(model, low_dtype)
                low = model(inputs)
                set_inference_autocast(model, "")
            else:
                with torch.autocast(device, dtype=DTYPES[args.dtype], enabled=bool(low_dtype)):
                    low = model(inputs)
            ev_ref.process(inputs, ref)
            ev_low.process(inputs, low)
            for r, o in zip(ref, low):
                m, t, d = detection_agreement(r["instances"], o["instances"], args.score, args.iou)
                matched, total = matched + m, total + t
                diffs += d
            images += len(inputs)
            if args.max_images and images >= args.max_images:
                break
    results = {}
    for name, e in zip(names, (ev_ref, ev_low)):
        results[name] = e.evaluate()
        logger.info("%s:", name)
        print_csv_format(results[name])
    summary = {
        "config": _shown(args.config_file),
        "weights": weights,
        "dataset": dataset,
        "images": images,
        "device": device,
        "dtype": args.dtype,
        "mode": args.mode,
        "score_threshold": args.score,
        "iou_threshold": args.iou,
        "fp32_detections": total,
        "matched": matched,
        "matched_fraction": matched / total if total else float("nan"),
        "max_score_diff": max(diffs, default=0.0),
        "mean_score_diff": sum(diffs) / len(diffs) if diffs else 0.0,
        "results": {k: {task: dict(v) for task, v in r.items()} for k, r in results.items()},
    }
    logger.info(
        "%s vs fp32 on %d images: %d/%d fp32 detections (score >= %.2f) matched (same class, IoU >= %.2f), "
        "score difference max %.4f mean %.4f",
        args.dtype,
        images,
        matched,
        total,
        args.score,
        args.iou,
        summary["max_score_diff"],
        summary["mean_score_diff"],
    )
    path = args.output or out_dir + ".json"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: json.dump(summary, f, indent=1), mode="w")
    logger.info("Wrote %s", path)
    return summary


if __name__ == "__main__":
    run_tool(main)
