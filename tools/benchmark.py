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

from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.modeling.backbone import Backbone
from detectron2.utils.events import EventStorage

from hrnet_d2 import ARCHITECTURES, HRNet
from hrnet_d2.checkpoint.pretrained import IMAGENET_CHECKPOINTS
from hrnet_d2.config import get_config_file, get_hrnet_cfg
from hrnet_d2.modeling.pyramid import HRNetV2p
from hrnet_d2.utils.errors import UserError, add_debug_argument, exit_on_user_error

REPO = Path(__file__).resolve().parents[1]


def timm_branches(timm_model, x):
    """timm's stem + stages: the four branch outputs, as our hr2..hr5."""
    t = timm_model
    return t.stages(t.act2(t.bn2(t.conv2(t.act1(t.bn1(t.conv1(x)))))))


def timm_baseline(arch, x, seed=0):
    """timm's ``hrnet_*`` for ``arch``, the reference: random weights (a private generator:
    the same for a seed) whose BN statistics are calibrated on ``x`` (a train-mode pass),
    with non-trivial affine terms, so activations stay normalised as in a trained network.
    (tests/timm_peer.py makes the tests' oracle the same way; tools do not import tests.)"""
    import timm

    with torch.random.fork_rng(devices=[]):
        model = timm.create_model(IMAGENET_CHECKPOINTS[arch][1], pretrained=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
        model.train()
        timm_branches(model, x)
    return model.eval()


def load_timm_body(ours, timm_model):
    """timm's weights into our body (the same official names; its classification head is left out)."""
    result = ours.load_state_dict(timm_model.state_dict(), strict=False)
    if result.missing_keys:
        raise RuntimeError(f"keys of our body missing from timm's model: {result.missing_keys[:5]}")


class TimmBody(Backbone):
    """timm's ``hrnet_*`` body (stem + stages) with our body's output names."""

    def __init__(self, model, shapes):
        super().__init__()
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
    info["isa"] = isa_flags()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


# the CPU features that decide which fp32 / bf16 kernels oneDNN can use
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def isa_flags(cpuinfo="/proc/cpuinfo"):
    """The ISA_FLAGS this CPU reports in ``cpuinfo`` (Linux's /proc/cpuinfo), in that order."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return [flag for flag in ISA_FLAGS if flag in flags]


def native_bf16(info):
    """Whether the CPU computes bf16 natively (AMX or AVX-512 bf16); elsewhere autocast bf16 is emulated."""
    return any(flag in info["isa"] for flag in ("amx_bf16", "avx512_bf16"))


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_AMP_DTYPE = {
    "cpu": "bf16",
    "cuda": "fp16",
}  # what SOLVER.AMP.ENABLED uses (Detectron2's AMPTrainer / ours on CPU)


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


def peak_gflops(args, device, dtypes):
    """The machine's own throughput for what the body is made of, in GFLOP/s (2 FLOPs per
    multiply-add): a 3x3 convolution (128 -> 128 channels at 200x336, a stride-4 map of an
    800x1344 image; channels_last) and a 2048^3 matmul, for each dtype in ``dtypes``.
    Medians over ``args.reps`` runs after ``args.warmup``.  These are the "peak" the body
    rows are compared with: what this torch build reaches on this machine, not a datasheet number."""
    c, h, w = 128, 200, 336
    n = 2048
    peaks = {}
    for name in dtypes:
        dtype = {"fp32": torch.float32, **AMP_DTYPES}[name]
        conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).to(device, dtype).to(memory_format=torch.channels_last)
        x = torch.randn(1, c, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)

        def run_conv():
            with torch.no_grad():
                conv(x)

        def run_mm():
            torch.mm(a, b)

        times = interleaved({"conv": run_conv, "mm": run_mm}, max(args.reps, 3), max(args.warmup, 1), device)
        peaks[name] = {
            "conv3x3": 2 * c * c * 9 * h * w / statistics.median(times["conv"]) / 1e9,
            "matmul": 2 * n**3 / statistics.median(times["mm"]) / 1e9,
        }
    return peaks


def model_gflop(model, x):
    """FLOPs (2 per multiply-add, in G) of one forward of ``model`` on ``x`` (fvcore counts multiply-adds)."""
    from fvcore.nn import FlopCountAnalysis

    with torch.no_grad():
        analysis = FlopCountAnalysis(model, x)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        return 2 * analysis.total() / 1e9


def make_detector(args, device, timm_model, activation_checkpoint=False):
    # the 1x Faster R-CNN recipe (all widths share it but for MODEL.HRNET.ARCH)
    cfg = get_hrnet_cfg(get_config_file("COCO-Detection/faster_rcnn_hrnetv2p_w32_1x.yaml"))
    cfg.MODEL.HRNET.ARCH = args.arch
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.HRNET.ACTIVATION_CHECKPOINT = activation_checkpoint
    torch.manual_seed(0)
    model = build_model(cfg)
    load_timm_body(model.backbone.bottom_up, timm_model)
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
        raise UserError(
            "--device cuda: no CUDA device is available (torch.cuda.is_available() is False); use --device cpu"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    h, w = args.size
    ph, pw = (h + 31) // 32 * 32, (w + 31) // 32 * 32  # what the detector's padding gives
    results = []
    torch.manual_seed(0)
    timm_model = timm_baseline(args.arch, torch.randn(1, 3, min(ph, 256), min(pw, 256)))

    # --- body + HRNetV2p forward -------------------------------------------------------------
    # weights are loaded after HRNetV2p is built: its init touches every conv below it
    ours = HRNetV2p(HRNet(ARCHITECTURES[args.arch], norm="FrozenBN"), ["hr2", "hr3", "hr4", "hr5"])
    load_timm_body(ours.bottom_up, timm_model)
    ours = ours.to(device).eval()
    theirs = HRNetV2p(TimmBody(copy.deepcopy(timm_model), ours.bottom_up.output_shape()), ["hr2", "hr3", "hr4", "hr5"])
    theirs.reduction_conv.load_state_dict(ours.reduction_conv.state_dict())
    theirs.fpn_convs.load_state_dict(ours.fpn_convs.state_dict())
    theirs = theirs.to(device).eval()
    theirs_cl = copy.deepcopy(theirs).to(memory_format=torch.channels_last)
    peak_dtypes = ["fp32"] + ([args.amp_dtype] if args.amp else [])
    peaks = peak_gflops(args, device, peak_dtypes)
    for name, p in peaks.items():
        results.append(
            {
                "measure": f"peak: 3x3 conv / matmul, {name}",
                "batch": 1,
                "conv3x3_gflops": p["conv3x3"],
                "matmul_gflops": p["matmul"],
            }
        )
        print(
            f"{results[-1]['measure']:<70} conv3x3 {p['conv3x3']:.1f} GFLOP/s  matmul {p['matmul']:.1f} GFLOP/s",
            flush=True,
        )
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
        gflop = model_gflop(theirs, x)  # the same arithmetic as ours (traced graph, plain convs)
        rows = [
            ("body+HRNetV2p forward, fp32", "ours", "timm", None),
            ("body+HRNetV2p forward, fp32, both channels_last", "ours", "timm_channels_last", None),
        ]
        if args.amp:
            amp = args.amp_dtype
            rows += [
                (f"body+HRNetV2p forward, ours {amp} autocast vs timm fp32", "ours_amp", "timm", None),
                (
                    f"body+HRNetV2p forward, both {amp} autocast + channels_last",
                    "ours_amp",
                    "timm_channels_last_amp",
                    None,
                ),
            ]
        for title, a, b, _ in rows:
            dtype = args.amp_dtype if a.endswith("_amp") else "fp32"
            results.append(
                {
                    **timed_row(title, batch, times, a, b),
                    "max_rel_diff_fp32": err,
                    "gflop": gflop,
                    "ours_gflops": gflop / med[a],
                    "peak_dtype": dtype,
                    "ours_pct_of_conv_peak": 100 * gflop / med[a] / peaks[dtype]["conv3x3"],
                }
            )
            if a == "ours_amp":  # what autocast costs in accuracy: ||amp - fp32|| / ||fp32||, worst pyramid level
                results[-1]["amp_rel_l2_vs_fp32"] = amp_err
        print_row(results[-len(rows) :])
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
        new = [timed_row("Faster R-CNN inference", batch, times, "ours", "timm")]
        if args.amp:
            new.append(
                timed_row("Faster R-CNN inference, ours autocast vs timm fp32", batch, times, "ours_amp", "timm")
            )
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
        mem = {k: statistics.median(v[args.warmup :] or v) for k, v in peaks.items()}
        new = [
            timed_row("Faster R-CNN training step (fwd+bwd)", batch, times, "ours", "timm"),
            {
                "measure": "Faster R-CNN training peak memory (MiB)",
                "batch": batch,
                "ours_s": mem["ours"] / 2**20,
                "timm_s": mem["timm"] / 2**20,
                "ratio": _ratio(mem["ours"], mem["timm"]),
            },
            {
                "measure": "training step, activation checkpoint on / off (ours)",
                "batch": batch,
                "ours_s": med["ours_ckpt"],
                "timm_s": med["ours"],
                "ratio": med["ours_ckpt"] / med["ours"],
                "baseline": "ours, checkpoint off",
            },
            {
                "measure": "training peak memory (MiB), activation checkpoint on / off (ours)",
                "batch": batch,
                "ours_s": mem["ours_ckpt"] / 2**20,
                "timm_s": mem["ours"] / 2**20,
                "ratio": _ratio(mem["ours_ckpt"], mem["ours"]),
                "baseline": "ours, checkpoint off",
            },
        ]
        if args.amp:
            new.append(
                timed_row(
                    f"Faster R-CNN training step (fwd+bwd), both {args.amp_dtype} autocast",
                    batch,
                    times,
                    "ours_amp",
                    "timm_amp",
                )
            )
        results += new
        print_row(new)
        det.eval()
    return results


def timed_row(measure, batch, times, ours, ref):
    """One result row: median times of the variants ``ours`` and ``ref`` from ``interleaved``'s ``times``."""
    a, b = statistics.median(times[ours]), statistics.median(times[ref])
    return {"measure": measure, "batch": batch, "ours_s": a, "timm_s": b, "ratio": a / b,
            "ours_runs": times[ours], "timm_runs": times[ref]}  # fmt: skip


def _ratio(a, b):
    return a / b if b > 0 else float("nan")


def print_row(rows):
    for r in rows:
        achieved = (
            f"  ({r['ours_gflops']:.0f} GFLOP/s, {r['ours_pct_of_conv_peak']:.0f}% of {r['peak_dtype']} conv peak)"
            if "ours_gflops" in r
            else ""
        )
        print(
            f"{r['measure']:<70} batch {r['batch']}: ours {r['ours_s']:.4g}  ref {r['timm_s']:.4g}  ratio {r['ratio']:.3f}"
            + achieved,
            flush=True,
        )


def markdown(results, info, args):
    h, w = args.size
    lines = [
        f"HRNet-{args.arch.upper()} at {h}x{w} (padded to multiples of 32), {args.reps} runs after {args.warmup} warm-up, "
        f"median; device {info['device']}" + (f" ({info['gpu']})" if "gpu" in info else "") + ".",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads, "
        f"{info['cpu_capability']}), torch {info['torch']}, load average at start {info['load_average']}.",
        f"CPU ISA flags: {', '.join(info['isa']) or 'none of ' + ', '.join(ISA_FLAGS)}"
        + ("" if native_bf16(info) else " (no native bf16: bf16 autocast on this CPU is emulated)")
        + ".",
        "",
        "Peak (this machine, this torch build; 2 FLOPs per multiply-add):",
        "",
        "| dtype | 3x3 conv, channels_last (GFLOP/s) | matmul 2048^3 (GFLOP/s) |",
        "|---|---:|---:|",
    ]
    for r in results:
        if r["measure"].startswith("peak: "):
            lines.append(
                f"| {r['measure'].rsplit(', ', 1)[1]} | {r['conv3x3_gflops']:.0f} | {r['matmul_gflops']:.0f} |"
            )
    lines += [
        "",
        "| measure | batch | ours | reference | ours / reference | ours GFLOP/s (% of conv peak) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r["measure"].startswith("peak: "):
            continue
        unit = "" if "MiB" in r["measure"] else " s"
        ref = r.get("baseline", "timm")
        measure = r["measure"]
        if "amp_rel_l2_vs_fp32" in r:
            measure += f" (outputs vs fp32: {r['amp_rel_l2_vs_fp32']:.2%} rel. L2)"
        achieved = (
            f"{r['ours_gflops']:.0f} ({r['ours_pct_of_conv_peak']:.0f}% of {r['peak_dtype']})"
            if "ours_gflops" in r
            else ""
        )
        lines.append(
            f"| {measure} | {r['batch']} | {r['ours_s']:.4g}{unit} | {r['timm_s']:.4g}{unit} ({ref}) | **{r['ratio']:.2f}** | {achieved} |"
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
    parser.add_argument(
        "--amp-dtype", choices=sorted(AMP_DTYPES), help="autocast dtype for --amp (default: bf16 on CPU, fp16 on CUDA)"
    )
    parser.add_argument(
        "--cudnn-benchmark", action="store_true", help="let cuDNN pick conv algorithms by timing (CUDNN_BENCHMARK)"
    )
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
