#!/usr/bin/env python
"""Ours against mmdetection 3.3's own HRNet detector: same CPU, same weights, same image, one process.

mmdetection's shipped ``configs/hrnet/{faster,mask}-rcnn_hrnetv2p-w32-1x_coco.py`` is built with
random weights that detect things on the test image (BN statistics from that image, the neck's
outputs scaled to std ~1, head layers spread: the test oracle's ``randomly_initialised_detector``),
saved as an mmdetection checkpoint and converted by our CLI (``python -m hrnet_d2.convert``) for
the matching ``configs/*/*_w32_1x_mmdet.yaml``.  Both run image-in, detections-out on the same
800x1333 RGB image (coloured shapes): mmdetection through ``inference_detector`` (its test
pipeline + ``test_step``), ours through the test-time resize + ``model(inputs)`` (Detectron2's
DefaultPredictor path).  Timed round-robin (``interleaved``), medians:

* mmdetection fp32;
* ours fp32;
* ours under MODEL.HRNET.INFERENCE_AUTOCAST bf16 (backbone and heads, ``--dtype`` to change).

mmcv-lite has no compiled ops: this uses the test oracle's set-up (``tests/mmdet_oracle.py``:
mmdetection's config and code, torchvision's ``nms`` / ``roi_align`` standing in for mmcv's two
kernels; test code, imported from tests/ by path).  Needs ``requirements-mmdet.txt``.
Detections of ours (fp32) are matched against mmdetection's as the oracle tests do, so the
rows compare the same computation.  Writes ``benchmark_mmdet.{json,md}`` into ``--output-dir``.

  .venv/bin/python tools/benchmark_mmdet.py --reps 3 --output-dir docs/performance
  .venv/bin/python tools/benchmark_mmdet.py --quick    # W18, 256x448, 1 run (smoke test)
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from detectron2.checkpoint import DetectionCheckpointer

from hrnet_d2.checkpoint.__main__ import main as convert_main
from hrnet_d2.config import get_config_file, get_hrnet_cfg
from hrnet_d2.engine import Trainer
from hrnet_d2.engine.predictor import model_input, test_augmentations
from hrnet_d2.engine.profiling import detection_agreement, interleaved, machine_info, profile_inference, summarize
from hrnet_d2.modeling.inference_autocast import set_inference_autocast
from hrnet_d2.utils.errors import UserError, add_debug_argument, exit_on_user_error
from hrnet_d2.utils.file_io import check_output_dir

REPO = Path(__file__).resolve().parents[1]
MODELS = {  # name: (mmdetection config, our config), W32 1x; {w} is the width
    "Faster R-CNN": ("faster-rcnn_hrnetv2p-{w}-1x_coco", "COCO-Detection/faster_rcnn_hrnetv2p_{w}_1x_mmdet.yaml"),
    "Mask R-CNN": ("mask-rcnn_hrnetv2p-{w}-1x_coco", "COCO-InstanceSegmentation/mask_rcnn_hrnetv2p_{w}_1x_mmdet.yaml"),
}


def oracle():
    """tests/mmdet_oracle.py, with mmcv's ops stood in (raises UserError without mmdetection)."""
    sys.path.insert(0, str(REPO / "tests"))
    import mmdet_oracle

    if not mmdet_oracle.install_ext_stand_in():
        raise UserError("mmdetection is not installed: pip install -r requirements-mmdet.txt")
    return mmdet_oracle


def pair(mo, name, width, image, scale, workdir):
    """mmdetection's detector (calibrated on ``image``) and ours from its converted checkpoint."""
    mm_name, config = (s.format(w=width) for s in MODELS[name])
    h, w = image.shape[:2]  # the calibration's raw backbone pass needs a size mmdet's HRNet takes unpadded
    calibration = np.ascontiguousarray(image[: h // 32 * 32, : w // 32 * 32])
    mm = mo.randomly_initialised_detector(mo.mmdet_config(mm_name, test_scale=scale), calibration)
    mm_ckpt, d2_ckpt = workdir / f"{mm_name}.pth", workdir / f"{mm_name}_d2.pth"
    mo.save_mmdet_checkpoint(mm, mm_ckpt)
    opts = ["INPUT.MIN_SIZE_TEST", str(scale[1]), "INPUT.MAX_SIZE_TEST", str(scale[0])]
    if convert_main([str(mm_ckpt), str(d2_ckpt), "--config-file", get_config_file(config)]) != 0:
        raise RuntimeError(f"conversion of {mm_ckpt} failed")
    cfg = get_hrnet_cfg(get_config_file(config), opts + ["MODEL.WEIGHTS", str(d2_ckpt), "MODEL.DEVICE", "cpu"])
    ours = Trainer.build_model(cfg).eval()  # the inference path train_net.py --eval-only runs
    DetectionCheckpointer(ours).load(str(d2_ckpt))
    return mm, ours, cfg


def rows_for(mo, name, args, image, workdir):
    mm, ours, cfg = pair(mo, name, args.width, image, args.scale, workdir)
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    augmentations = test_augmentations(cfg)

    def run_ours(dtype, compiled=False):
        def fn():
            set_inference_autocast(ours, dtype)
            ours.backbone.inference_compile = compiled
            with torch.no_grad():
                return ours([model_input(image, augmentations)])[0]["instances"]

        return fn

    def run_mmdet():
        with torch.no_grad():
            return mo.mmdet_predict(mm, bgr)[0]

    # the same computation: ours (fp32, through the oracle's own Detectron2 call) against mmdetection's detections
    ref = run_mmdet()
    ours_fp32, _ = mo.d2_predict(ours, cfg, image)
    agreement = mo.match_detections(ref, ours_fp32)
    variants = {"mmdet fp32": run_mmdet, "ours fp32": run_ours(""), f"ours {args.dtype}": run_ours(args.dtype)}
    compile_s, compiled_agreement = {}, {}
    if args.compile:  # MODEL.HRNET.INFERENCE_COMPILE: the first call compiles (timed here, not in the medians)
        for dtype in ("", args.dtype):
            variant = f"ours {dtype or 'fp32'} compiled"
            eager = run_ours(dtype)()
            variants[variant] = run_ours(dtype, compiled=True)
            start = time.perf_counter()
            got = variants[variant]()
            compile_s[variant] = time.perf_counter() - start
            matched, _, _ = detection_agreement(eager, got, score=0.0, iou=0.9)  # every eager detection
            compiled_agreement[variant] = {"detections": len(got), "eager": len(eager), "matched": matched}
    times = interleaved(variants, args.reps, args.warmup)
    ours.backbone.inference_compile = False
    low = run_ours(args.dtype)()
    set_inference_autocast(ours, "")
    med = {k: statistics.median(v) for k, v in times.items()}
    profiles = {}
    for dtype in ("", args.dtype) if args.profile else ():
        set_inference_autocast(ours, dtype)
        inputs = [model_input(image, augmentations)]
        profiles[dtype or "fp32"] = summarize(profile_inference(ours, inputs, reps=args.reps, warmup=1))
    set_inference_autocast(ours, "")
    return {
        "model": f"{name} {args.width.upper()}",
        "detections": {
            "mmdet": len(ref["scores"]),
            "ours fp32": len(ours_fp32["scores"]),
            f"ours {args.dtype}": len(low),
        },
        "agreement_fp32": {k: v for k, v in agreement.items() if isinstance(v, (int, float, type(None)))},
        "times": times,
        "median_s": med,
        "ratios": {
            "ours fp32 / mmdet fp32": med["ours fp32"] / med["mmdet fp32"],
            f"ours {args.dtype} / mmdet fp32": med[f"ours {args.dtype}"] / med["mmdet fp32"],
            f"ours {args.dtype} / ours fp32": med[f"ours {args.dtype}"] / med["ours fp32"],
            **{f"{k} / mmdet fp32": med[k] / med["mmdet fp32"] for k in compile_s},
            **{f"{k} / {k.rsplit(' ', 1)[0]}": med[k] / med[k.rsplit(" ", 1)[0]] for k in compile_s},
        },
        "profile": profiles,
        "compile_s": compile_s,
        "compiled_vs_eager_fp32": compiled_agreement,
    }


def markdown(rows, info, args):
    lines = [
        f"Ours against mmdetection 3.3's own HRNet detectors, {args.scale[1]}x{args.scale[0]} test scale "
        f"(image {args.size[0]}x{args.size[1]}), batch 1, {args.reps} runs after {args.warmup} warm-up, medians "
        "(runs min-max), interleaved; image in, detections out.",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads, "
        f"{info['cpu_capability']}), torch {info['torch']}, load average at start {info['load_average']}; "
        f"ISA flags: {', '.join(info['isa'])}.",
        "",
        f"| model | mmdet fp32 | ours fp32 | ours {args.dtype} | ours fp32 / mmdet | ours {args.dtype} / mmdet "
        f"| ours {args.dtype} / ours fp32 | detections (mmdet / ours fp32 matched) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        cells = []
        for k in ("mmdet fp32", "ours fp32", f"ours {args.dtype}"):
            t = r["times"][k]
            cells.append(f"{r['median_s'][k]:.3f} s ({min(t):.2f}-{max(t):.2f})")
        ratios = " | ".join(f"**{v:.2f}**" for v in list(r["ratios"].values())[:3])
        a = r["agreement_fp32"]
        lines.append(
            f"| {r['model']} | {' | '.join(cells)} | {ratios} | {r['detections']['mmdet']} / {a.get('matched')} |"
        )
    for r in rows:
        for k, c in r["compile_s"].items():
            t = r["times"][k]
            ratio = ", ".join(f"{n} **{v:.2f}**" for n, v in r["ratios"].items() if n.startswith(k))
            agree = r["compiled_vs_eager_fp32"][k]
            lines.append(
                f"* {r['model']}, {k} (MODEL.HRNET.INFERENCE_COMPILE): {r['median_s'][k]:.3f} s "
                f"({min(t):.2f}-{max(t):.2f}); {ratio}; first call (compiling) {c:.0f} s; {agree['matched']} of the "
                f"{agree['eager']} eager detections of the same dtype found (same class, IoU >= 0.9) among its "
                f"{agree['detections']}"
            )
    if args.profile:
        lines += ["", "Our per-stage profile on the same image and weights (median s, % of whole):", ""]
    for r in rows:
        for dtype, stages in r["profile"].items():
            lines.append(
                f"* {r['model']}, {dtype}: "
                + ", ".join(f"{k} {v['s']:.3f} s ({v['pct']:.0f}%)" for k, v in stages.items() if v["s"] >= 0.0005)
            )
    lines += ["", f"Command: `{' '.join(['.venv/bin/python', 'tools/benchmark_mmdet.py'] + sys.argv[1:])}`", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", default="w32", choices=("w18", "w32", "w40"))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"), help="the image")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--profile", action="store_true", help="also our per-stage profile on the same image and weights"
    )
    parser.add_argument(
        "--compile", action="store_true", help="also ours with MODEL.HRNET.INFERENCE_COMPILE (fp32 and --dtype)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: W18, 256x448, 1 run")
    parser.add_argument("--output-dir", default=str(REPO / "docs" / "performance"))
    args = add_debug_argument(parser).parse_args(argv)
    check_output_dir(args.output_dir, key="--output-dir")  # before minutes of measuring, not after
    if args.quick:
        args.width, args.size, args.reps, args.warmup = "w18", (256, 448), 1, 0
    args.scale = (args.size[1], args.size[0])  # mmdetection's (long, short): the image is already at scale
    if args.threads:
        torch.set_num_threads(args.threads)
    mo = oracle()
    info = machine_info("cpu")
    image = mo.shapes_image(0, *args.size, count=24, min_size=20)  # a busier image than the tests'
    rows = []
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows.append(rows_for(mo, name, args, image, Path(tmp)))
            print(json.dumps({k: rows[-1][k] for k in ("model", "median_s", "ratios", "detections")}), flush=True)
            # written after every model: a long run stopped half-way keeps what it measured
            (out / "benchmark_mmdet.json").write_text(
                json.dumps({"machine": info, "args": vars(args), "rows": rows}, indent=1) + "\n"
            )
            (out / "benchmark_mmdet.md").write_text(markdown(rows, info, args))
    print(f"wrote {out / 'benchmark_mmdet.json'} and {out / 'benchmark_mmdet.md'}")
    return rows


if __name__ == "__main__":
    exit_on_user_error(main)
