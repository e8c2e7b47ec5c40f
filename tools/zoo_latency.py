#!/usr/bin/env python
"""A picture for choosing a model: published COCO box AP of every ``hrnet_d2://coco/`` model
against its inference latency measured on this machine, fp32 and under
MODEL.HRNET.INFERENCE_AUTOCAST (``--dtype``, backbone and heads).

AP is the published one (hrnet_d2.checkpoint.zoo: mmdetection 3.3.0's metafile); latency is
measured here, per architecture (the 1x / 2x / 20e entries of one config share it), on each
model's own config with random weights whose class scores are spread so that it detects things
(``calibrate_detections``: the box post-processing, mask head and pasting do their work), one
image of ``--size`` (default 800x1333; a smaller size makes the tool cheap: the PNG then says
so), ``--reps`` runs after one warm-up, medians, fp32 and low precision interleaved.
Writes ``zoo_latency.{png,json,md}`` into ``--output-dir``.

  .venv/bin/python tools/zoo_latency.py --output-dir docs/performance
  .venv/bin/python tools/zoo_latency.py --size 512 853 --reps 1     # cheaper
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from hrnet_d2.checkpoint.zoo import coco_models
from hrnet_d2.config import get_config_file, get_hrnet_cfg
from hrnet_d2.engine import Trainer
from hrnet_d2.engine.profiling import calibrate_detections, interleaved, machine_info
from hrnet_d2.modeling.inference_autocast import set_inference_autocast
from hrnet_d2.utils.errors import UserError, add_debug_argument, exit_on_user_error
from hrnet_d2.utils.file_io import check_output_dir

REPO = Path(__file__).resolve().parents[1]
KINDS = {  # config folder / name prefix -> label, matplotlib marker
    "cascade_mask_rcnn": ("Cascade Mask R-CNN", "D"),
    "cascade_rcnn": ("Cascade R-CNN", "s"),
    "mask_rcnn": ("Mask R-CNN", "^"),
    "faster_rcnn": ("Faster R-CNN", "o"),
    "htc": ("Hybrid Task Cascade", "P"),
    "fcos": ("FCOS", "v"),
}


def kind_of(config):
    name = Path(config).name
    return next(k for k in KINDS if name.startswith(k))


def structure_key(config):
    """Entries whose configs differ only in the schedule (1x / 2x / 20e) share one latency."""
    name = Path(config).name
    return kind_of(config), name.split("_hrnetv2p_")[1].split("_")[0]


def latency(config, args, inputs):
    cfg = get_hrnet_cfg(get_config_file(config), ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    model = Trainer.build_model(cfg).eval()  # the inference path train_net.py --eval-only runs
    with torch.no_grad():
        detections = calibrate_detections(model, inputs)

    def run(dtype):
        def fn():
            set_inference_autocast(model, dtype)
            with torch.no_grad():
                model(inputs)

        return fn

    times = interleaved({"fp32": run(""), args.dtype: run(args.dtype)}, args.reps, 1)
    return {k: statistics.median(v) for k, v in times.items()}, times, detections


def plot(rows, info, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for kind, (label, marker) in KINDS.items():
        mine = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["fp32_s"])
        if not mine:
            continue
        for dtype, fill in (("fp32", True), (args.dtype, False)):
            xs = [r[f"{dtype}_s"] for r in mine]
            ys = [r["box_ap"] for r in mine]
            ax.scatter(
                xs,
                ys,
                marker=marker,
                s=50,
                facecolors=None if fill else "none",
                edgecolors=f"C{list(KINDS).index(kind)}",
                color=f"C{list(KINDS).index(kind)}",
                label=f"{label}, {dtype}",
            )
        for r in mine:
            ax.annotate(
                r["name"].split("_hrnetv2p_")[1],
                (r["fp32_s"], r["box_ap"]),
                fontsize=6,
                xytext=(3, 2),
                textcoords="offset points",
            )
            ax.plot([r["fp32_s"], r[f"{args.dtype}_s"]], [r["box_ap"], r["box_ap"]], lw=0.5, color="grey")
    size = f"{args.size[0]}x{args.size[1]}"
    ax.set_xlabel(
        f"latency per image, s (batch 1, {size}{'' if tuple(args.size) == (800, 1333) else ', reduced from 800x1333'})"
    )
    ax.set_ylabel("published COCO val2017 box AP (mmdetection 3.3 metafile)")
    ax.set_title(
        f"hrnet_d2://coco/ models on {info['cpu']}\n{info['torch_threads']} torch threads, torch {info['torch']}, "
        f"random weights for timing; filled fp32, hollow {args.dtype}",
        fontsize=8,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    parser.add_argument("--only", nargs="*", default=None, help="zoo names (coco/...) to time (default: all)")
    parser.add_argument("--output-dir", default=str(REPO / "docs" / "performance"))
    args = add_debug_argument(parser).parse_args(argv)
    check_output_dir(args.output_dir, key="--output-dir")  # before minutes of measuring, not after
    g = torch.Generator().manual_seed(0)
    h, w = args.size
    inputs = [{"image": torch.rand(3, h, w, generator=g) * 255, "height": h, "width": w}]
    names = [e.name for e in coco_models()]
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        raise UserError(f"--only {unknown}: not in the zoo; allowed: {names}")
    entries = [e for e in coco_models() if args.only is None or e.name in args.only]
    measured, rows = {}, []
    for e in entries:
        key = structure_key(e.config)
        if key not in measured:
            measured[key] = latency(e.config, args, inputs)
            print(e.name, measured[key][0], flush=True)
        med, times, detections = measured[key]
        rows.append(
            {
                "name": e.name,
                "kind": kind_of(e.config),
                "config": e.config,
                "box_ap": e.box_ap,
                "mask_ap": e.mask_ap,
                "fp32_s": med["fp32"],
                f"{args.dtype}_s": med[args.dtype],
                "runs": times,
                "detections": detections,
            }
        )
    info = machine_info("cpu")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, info, args, out / "zoo_latency.png")
    (out / "zoo_latency.json").write_text(json.dumps({"machine": info, "args": vars(args), "rows": rows}, indent=1))
    lines = [
        f"Published COCO box AP against latency here ({info['cpu']}; ISA flags {', '.join(info['isa'])}; "
        f"{args.size[0]}x{args.size[1]}, batch 1, median of {args.reps} after 1 warm-up; random weights):",
        "",
        f"| model | box AP | mask AP | fp32 s | {args.dtype} s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['name']}` | {r['box_ap']} | {r['mask_ap'] or ''} | {r['fp32_s']:.2f} | {r[f'{args.dtype}_s']:.2f} |"
        )
    lines += ["", f"Command: `{' '.join(['.venv/bin/python', 'tools/zoo_latency.py'] + sys.argv[1:])}`", ""]
    (out / "zoo_latency.md").write_text("\n".join(lines))
    print(f"wrote {out / 'zoo_latency.png'}")
    return rows


if __name__ == "__main__":
    exit_on_user_error(main)
