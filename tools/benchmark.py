#!/usr/bin/env python
"""Speed and memory of hrnet_d2 against the timm ``hrnet_*`` body, in one process, same weights, same input.

Measured (medians over ``--reps`` runs after ``--warmup``; the variants are interleaved
round-robin so load from other processes hits all of them alike):

* body + HRNetV2p forward: ours (defaults: channels_last, folded norms, fused add/ReLU)
  against timm's body + our pyramid, with timm at its defaults (fp32, NCHW), with timm
  in channels_last, and both under autocast (bf16 on CPU, fp16 on CUDA);
* Faster R-CNN (``faster_rcnn_hrnetv2p_w32_1x.yaml`` with MODEL.HRNET.ARCH <arch>) inference and one training
  step (forward + backward), ours against the same detector with the timm body;
* training peak memory, with and without MODEL.HRNET.ACTIVATION_CHECKPOINT.

Ratios are ours / timm (< 1: ours is faster / smaller).  Writes ``benchmark.json`` and
``benchmark.md`` into ``--output-dir``.

  .venv/bin/python tools/benchmark.py                       # w32, 800x1333, batch 1 and 2, CPU
  .venv/bin/python tools/benchmark.py --device cuda --amp   # GPU, fp16 autocast rows included
  .venv/bin/python tools/benchmark.py --quick               # smoke test (tiny model and input)
"""
import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detectron2.layers import FrozenBatchNorm2d, ShapeSpec  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.backbone import Backbone  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from hrnet_d2 import ARCHITECTURES, HRNet  # noqa: E402
from hrnet_d2.config import get_config_file, get_hrnet_cfg  # noqa: E402
from hrnet_d2.pyramid import HRNetV2p  # noqa: E402
from hrnet_d2.timm_peer import CLASSIFICATION_ONLY, body_state_dict, calibrated_timm, timm_branches  # noqa: E402
from hrnet_d2.errors import UserError, add_debug_argument, exit_on_user_error  # noqa: E402

class TimmBody(Backbone):
    """timm's ``hrnet_*`` body (stem + stages) with our body's output names."""

    def __init__(self, model, shapes):
        super().__init__()
        for name in CLASSIFICATION_ONLY:
            if hasattr(model, name):
                setattr(model, name, None)
        self.model = model
        self._shapes = shapes

    def forward(self, x):
        return {f"hr{i + 2}": f for i, f in enumerate(timm_branches(self.model, x)) if f"hr{i + 2}" in self._shapes}

    def output_shape(self):
        return self._shapes

    @property
    def size_divisibility(self):
        return 32


def machine_info(device):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "device": device,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_AMP_DTYPE = {"cpu": "bf16", "cuda": "fp16"}  # what SOLVER.AMP.ENABLED uses (Detectron2's AMPTrainer / ours on CPU)


def autocast(args, enabled):
    return torch.autocast(args.device, dtype=AMP_DTYPES[args.amp_dtype], enabled=enabled)


def rel_l2(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def interleaved(variants, reps, warmup, device):
    """{name: [seconds]}: every variant once per round, ``warmup`` rounds discarded."""
    times = {name: [] for name in variants}
    for r in range(warmup + reps):
        for name, fn in variants.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, or on CPU the
    process RSS sampled every 2 ms by a thread (the CPU allocator returns large
    blocks to the OS, so RSS follows the live activations)."""

    def __init__(self, device):
        self.device = device
        self.peak = 0

    @staticmethod
    def _rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        _release_freed_memory()
        self.base = self._rss()
        self.max = self.base
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.max = max(self.max, self._rss())
                time.sleep(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.max = max(self.max, self._rss())
            self.peak = self.max - self.base


def _release_freed_memory():
    """Hand memory freed by earlier steps back to the OS (glibc keeps it in its heap), so the
    RSS growth of the next step is that step's own, not hidden by a bigger step before it."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS growth may then understate later variants
        pass


def make_detector(args, device, timm_model, activation_checkpoint=False):
    # the 1x Faster R-CNN recipe (all widths share it but for MODEL.HRNET.ARCH)
    cfg = get_hrnet_cfg(get_config_file("COCO-Detection/faster_rcnn_hrnetv2p_w32_1x.yaml"))
    cfg.MODEL.HRNET.ARCH = args.arch
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.HRNET.ACTIVATION_CHECKPOINT = activation_checkpoint
    torch.manual_seed(0)
    model = build_model(cfg)
    body = model.backbone.bottom_up
    body.load_state_dict(body_state_dict(timm_model, keep_num_batches_tracked=False), strict=False)
    return model


def timm_detector(ours, timm_model, device):
    """The same detector (same weights) with timm's body (norms frozen as ours) in place of ours."""
    peer = copy.deepcopy(ours)
    body = FrozenBatchNorm2d.convert_frozen_batchnorm(copy.deepcopy(timm_model))
    peer.backbone.bottom_up = TimmBody(body, ours.backbone.bottom_up.output_shape()).to(device)
    return peer


def detector_inputs(batch, h, w, device, with_gt):
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(0)
    inputs = []
    for _ in range(batch):
        d = {"image": (torch.rand(3, h, w, generator=g) * 255).to(device), "height": h, "width": w}
        if with_gt:
            inst = Instances((h, w))
            xy = torch.rand(4, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
            wh = 32 + torch.rand(4, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
            inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1).to(device))
            inst.gt_classes = torch.randint(0, 80, (4,), generator=g).to(device)
            d["instances"] = inst
        inputs.append(d)
    return inputs


def run(args):
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False); use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    h, w = args.size
    ph, pw = (h + 31) // 32 * 32, (w + 31) // 32 * 32  # what the detector's padding gives
    results = []
    torch.manual_seed(0)
    timm_model = calibrated_timm(args.arch, torch.randn(1, 3, min(ph, 256), min(pw, 256)))

    # --- body + HRNetV2p forward -------------------------------------------------------------
    # weights are loaded after HRNetV2p is built: its init touches every conv below it
    ours = HRNetV2p(HRNet(ARCHITECTURES[args.arch], norm="FrozenBN"), ["hr2", "hr3", "hr4", "hr5"])
    ours.bottom_up.load_state_dict(body_state_dict(timm_model, keep_num_batches_tracked=False), strict=False)
    ours = ours.to(device).eval()
    theirs = HRNetV2p(TimmBody(copy.deepcopy(timm_model), ours.bottom_up.output_shape()), ["hr2", "hr3", "hr4", "hr5"])
    theirs.bottom_up.model.load_state_dict(body_state_dict(timm_model, keep_num_batches_tracked=False), strict=False)
    theirs.reduction_conv.load_state_dict(ours.reduction_conv.state_dict())
    theirs.fpn_convs.load_state_dict(ours.fpn_convs.state_dict())
    theirs = theirs.to(device).eval()
    theirs_cl = copy.deepcopy(theirs).to(memory_format=torch.channels_last)
    for batch in args.batch:
        x = torch.randn(batch, 3, ph, pw, device=device)
        x_cl = x.contiguous(memory_format=torch.channels_last)

        def fwd(model, inp, amp=False):
            def fn():
                with torch.no_grad(), autocast(args, amp):
                    model(inp)

            return fn

        variants = {
            "timm": fwd(theirs, x),
            "ours": fwd(ours, x),
            "timm_channels_last": fwd(theirs_cl, x_cl),
        }
        if args.amp:
            variants["timm_channels_last_amp"] = fwd(theirs_cl, x_cl, True)
            variants["ours_amp"] = fwd(ours, x, True)
        with torch.no_grad():  # parity of what is timed
            ref, out = theirs(x), ours(x)
            err = max(((out[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref)
            if args.amp:
                with autocast(args, True):
                    low = ours(x)
                amp_err = max(rel_l2(low[k], out[k]) for k in out)
        times = interleaved(variants, args.reps, args.warmup, device)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows = [
            ("body+HRNetV2p forward, fp32", "ours", "timm", None),
            ("body+HRNetV2p forward, fp32, both channels_last", "ours", "timm_channels_last", None),
        ]
        if args.amp:
            amp = args.amp_dtype
            rows += [
                (f"body+HRNetV2p forward, ours {amp} autocast vs timm fp32", "ours_amp", "timm", None),
                (f"body+HRNetV2p forward, both {amp} autocast + channels_last", "ours_amp", "timm_channels_last_amp", None),
            ]
        for title, a, b, _ in rows:
            results.append(
                {"measure": title, "batch": batch, "ours_s": med[a], "timm_s": med[b], "ratio": med[a] / med[b],
                 "ours_runs": times[a], "timm_runs": times[b], "max_rel_diff_fp32": err}
            )
            if a == "ours_amp":  # what autocast costs in accuracy: ||amp - fp32|| / ||fp32||, worst pyramid level
                results[-1]["amp_rel_l2_vs_fp32"] = amp_err
        print_row(results[-len(rows):])
    del ours, theirs, theirs_cl

    if args.skip_detector:
        return results
    # --- Faster R-CNN inference / training step --------------------------------------------------
    det = make_detector(args, device, timm_model).eval()
    det_timm = timm_detector(det, timm_model, device).eval()
    det_ckpt = make_detector(args, device, timm_model, activation_checkpoint=True)
    det_ckpt.load_state_dict(det.state_dict())
    for batch in args.batch:
        inputs = detector_inputs(batch, h, w, device, with_gt=False)

        def infer(model):
            def fn():
                model.eval()  # the training-step rows of the previous batch size left it in train mode
                with torch.no_grad():
                    model(inputs)

            return fn

        variants = {"timm": infer(det_timm), "ours": infer(det)}
        if args.amp:

            def infer_amp():
                det.eval()
                with torch.no_grad(), autocast(args, True):
                    det(inputs)

            variants["ours_amp"] = infer_amp
        times = interleaved(variants, args.reps, args.warmup, device)
        med = {k: statistics.median(v) for k, v in times.items()}
        new = [{"measure": "Faster R-CNN inference", "batch": batch, "ours_s": med["ours"], "timm_s": med["timm"],
                "ratio": med["ours"] / med["timm"], "ours_runs": times["ours"], "timm_runs": times["timm"]}]
        if args.amp:
            new.append({"measure": "Faster R-CNN inference, ours autocast vs timm fp32", "batch": batch,
                        "ours_s": med["ours_amp"], "timm_s": med["timm"], "ratio": med["ours_amp"] / med["timm"],
                        "ours_runs": times["ours_amp"], "timm_runs": times["timm"]})
        results += new
        print_row(new)

        train_inputs = detector_inputs(batch, h, w, device, with_gt=True)
        peaks = {}

        def step(model, name, amp=False):
            def fn():
                model.train()
                model.zero_grad(set_to_none=True)
                with PeakMemory(device) as mem, EventStorage():
                    with autocast(args, amp):
                        losses = model(train_inputs)
                    sum(losses.values()).backward()
                peaks.setdefault(name, []).append(mem.peak)

            return fn

        variants = {"timm": step(det_timm, "timm"), "ours": step(det, "ours"), "ours_ckpt": step(det_ckpt, "ours_ckpt")}
        if args.amp:
            variants["timm_amp"] = step(det_timm, "timm_amp", True)
            variants["ours_amp"] = step(det, "ours_amp", True)
        times = interleaved(variants, args.reps, args.warmup, device)
        med = {k: statistics.median(v) for k, v in times.items()}
        mem = {k: statistics.median(v[args.warmup:] or v) for k, v in peaks.items()}
        new = [
            {"measure": "Faster R-CNN training step (fwd+bwd)", "batch": batch, "ours_s": med["ours"],
             "timm_s": med["timm"], "ratio": med["ours"] / med["timm"], "ours_runs": times["ours"], "timm_runs": times["timm"]},
            {"measure": "Faster R-CNN training peak memory (MiB)", "batch": batch, "ours_s": mem["ours"] / 2**20,
             "timm_s": mem["timm"] / 2**20, "ratio": _ratio(mem["ours"], mem["timm"])},
            {"measure": "training step, activation checkpoint on / off (ours)", "batch": batch,
             "ours_s": med["ours_ckpt"], "timm_s": med["ours"], "ratio": med["ours_ckpt"] / med["ours"],
             "baseline": "ours, checkpoint off"},
            {"measure": "training peak memory (MiB), activation checkpoint on / off (ours)", "batch": batch,
             "ours_s": mem["ours_ckpt"] / 2**20, "timm_s": mem["ours"] / 2**20, "ratio": _ratio(mem["ours_ckpt"], mem["ours"]),
             "baseline": "ours, checkpoint off"},
        ]
        if args.amp:
            new.append({"measure": f"Faster R-CNN training step (fwd+bwd), both {args.amp_dtype} autocast", "batch": batch,
                        "ours_s": med["ours_amp"], "timm_s": med["timm_amp"], "ratio": med["ours_amp"] / med["timm_amp"],
                        "ours_runs": times["ours_amp"], "timm_runs": times["timm_amp"]})
        results += new
        print_row(new)
        det.eval()
    return results


def _ratio(a, b):
    return a / b if b > 0 else float("nan")


def print_row(rows):
    for r in rows:
        print(f"{r['measure']:<70} batch {r['batch']}: ours {r['ours_s']:.4g}  ref {r['timm_s']:.4g}  ratio {r['ratio']:.3f}",
              flush=True)


def markdown(results, info, args):
    h, w = args.size
    lines = [
        f"HRNet-{args.arch.upper()} at {h}x{w} (padded to multiples of 32), {args.reps} runs after {args.warmup} warm-up, "
        f"median; device {info['device']}" + (f" ({info['gpu']})" if "gpu" in info else "") + ".",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads, "
        f"{info['cpu_capability']}), torch {info['torch']}, load average at start {info['load_average']}.",
        "",
        "| measure | batch | ours | reference | ours / reference |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        unit = "" if "MiB" in r["measure"] else " s"
        ref = r.get("baseline", "timm")
        measure = r["measure"]
        if "amp_rel_l2_vs_fp32" in r:
            measure += f" (outputs vs fp32: {r['amp_rel_l2_vs_fp32']:.2%} rel. L2)"
        lines.append(
            f"| {measure} | {r['batch']} | {r['ours_s']:.4g}{unit} | {r['timm_s']:.4g}{unit} ({ref}) | **{r['ratio']:.2f}** |"
        )
    lines += ["", f"Command: `{' '.join(['.venv/bin/python', 'tools/benchmark.py'] + sys.argv[1:])}`", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="w32", choices=sorted(ARCHITECTURES))
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, nargs="+", default=(1, 2))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--amp", action="store_true", help="also time autocast (bf16 on CPU, fp16 on CUDA by default)")
    parser.add_argument("--amp-dtype", choices=sorted(AMP_DTYPES), help="autocast dtype for --amp (default: bf16 on CPU, fp16 on CUDA)")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN pick conv algorithms by timing (CUDNN_BENCHMARK)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    parser.add_argument("--skip-detector", action="store_true", help="only the body + HRNetV2p forward")
    parser.add_argument("--quick", action="store_true", help="smoke test: w18_small_v1, 64x96, batch 1, 1 run")
    parser.add_argument("--output-dir", default=str(REPO / "docs"))
    args = add_debug_argument(parser).parse_args(argv)
    if args.quick:
        args.arch, args.size, args.batch, args.reps, args.warmup = "w18_small_v1", (64, 96), (1,), 1, 1
    args.amp_dtype = args.amp_dtype or DEFAULT_AMP_DTYPE[args.device]
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    info = machine_info(args.device)
    info["amp_dtype"] = args.amp_dtype if args.amp else None
    info["cudnn_benchmark"] = args.cudnn_benchmark
    results = run(args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "args": vars(args), "results": results}
    (out / "benchmark.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out / "benchmark.md").write_text(markdown(results, info, args))
    print(f"wrote {out / 'benchmark.json'} and {out / 'benchmark.md'}")
    return payload


if __name__ == "__main__":
    exit_on_user_error(main)
