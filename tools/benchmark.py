#!/usr/bin/env python
"""Speed and memory of hrnet_d2 against the timm ``hrnet_*`` body, in one process, same weights, same input.

Measured (medians over ``--reps`` runs after ``--warmup``; the variants are interleaved
round-robin so load from other processes hits all of them alike):

* body + HRNetV2p forward: ours (defaults: channels_last, folded norms, fused add/ReLU)
  against timm's body + our pyramid, with timm at its defaults (fp32, NCHW), with timm
  in channels_last, and both under autocast (bf16 on CPU, fp16 on CUDA);
* Faster R-CNN (``faster_rcnn_hrnetv2p_w32_1x.yaml`` with MODEL.HRNET.ARCH <arch>) inference and one training
  step (forward + backward), ours against the same detector with the timm body;
* training peak memory, with and without MODEL.HRNET.ACTIVATION_CHECKPOINT;
* with ``--parts profile``: where Faster and Mask R-CNN inference time goes, stage by stage
  (``hrnet_d2.engine.profiling``: preprocessing, body, pyramid, RPN head, proposal selection, ROIAlign,
  box head, box post-processing, mask head, mask pasting), seconds, % of the whole and GFLOP/s
  of the conv / FC stages against the peak rows, fp32 and (``--amp``) under
  MODEL.HRNET.INFERENCE_AUTOCAST on backbone and heads.  The detectors have random weights whose
  class scores are spread so that they detect things (``calibrate_detections``).

Ratios are ours / timm (< 1: ours is faster / smaller).  Writes ``benchmark.json`` and
``benchmark.md`` into ``--output-dir``.

  .venv/bin/python tools/benchmark.py                       # w32, 800x1333, batch 1 and 2, CPU
  .venv/bin/python tools/benchmark.py --device cuda --amp   # GPU, fp16 autocast rows included
  .venv/bin/python tools/benchmark.py --parts profile --amp --batch 1   # per-stage profile, fp32 and bf16
  .venv/bin/python tools/benchmark.py --quick               # smoke test (tiny model and input)
"""

import argparse
import copy
import ctypes
import gc
import json
import os
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
from hrnet_d2.engine import Trainer
from hrnet_d2.engine.profiling import (
    ISA_FLAGS,
    STAGES,
    calibrate_detections,
    interleaved,
    machine_info,
    native_bf16,
    peak_gflops,
    profile_inference,
    summarize,
)
from hrnet_d2.modeling.inference_autocast import set_inference_autocast
from hrnet_d2.modeling.pyramid import HRNetV2p
from hrnet_d2.modeling.roi_align import parallel_roi_align
from hrnet_d2.utils.errors import UserError, add_debug_argument, exit_on_user_error
from hrnet_d2.utils.file_io import check_output_dir

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


AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_AMP_DTYPE = {
    "cpu": "bf16",
    "cuda": "fp16",
}  # what SOLVER.AMP.ENABLED uses (Detectron2's AMPTrainer / ours on CPU)


def autocast(args, enabled):
    return torch.autocast(args.device, dtype=AMP_DTYPES[args.amp_dtype], enabled=enabled)


def rel_l2(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


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


def check_device(device):
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "--device cuda: no CUDA device is available (torch.cuda.is_available() is False); use --device cpu"
        )


def padded_size(args):
    h, w = args.size
    return (h + 31) // 32 * 32, (w + 31) // 32 * 32  # what the detector's padding gives


def peak_rows(args, peaks):
    """One row per dtype: the machine's 3x3-conv and matmul throughput (``peak_gflops``)."""
    rows = []
    for name, p in peaks.items():
        rows.append(
            {
                "measure": f"peak: 3x3 conv / matmul, {name}",
                "batch": 1,
                "conv3x3_gflops": p["conv3x3"],
                "matmul_gflops": p["matmul"],
            }
        )
        print(f"{rows[-1]['measure']:<70} conv3x3 {p['conv3x3']:.1f} GFLOP/s  matmul {p['matmul']:.1f} GFLOP/s")
    return rows


def body_pair(args, timm_model):
    """Our body + HRNetV2p and timm's body + our HRNetV2p, same weights (NCHW and channels_last timm)."""
    device = args.device
    # weights are loaded after HRNetV2p is built: its init touches every conv below it
    ours = HRNetV2p(HRNet(ARCHITECTURES[args.arch], norm="FrozenBN"), ["hr2", "hr3", "hr4", "hr5"])
    load_timm_body(ours.bottom_up, timm_model)
    ours = ours.to(device).eval()
    theirs = HRNetV2p(TimmBody(copy.deepcopy(timm_model), ours.bottom_up.output_shape()), ["hr2", "hr3", "hr4", "hr5"])
    theirs.reduction_conv.load_state_dict(ours.reduction_conv.state_dict())
    theirs.fpn_convs.load_state_dict(ours.fpn_convs.state_dict())
    theirs = theirs.to(device).eval()
    return ours, theirs, copy.deepcopy(theirs).to(memory_format=torch.channels_last)


def body_rows(args, ours, theirs, theirs_cl, peaks, batch):
    """body + HRNetV2p forward, ours against timm's body (fp32, channels_last, autocast)."""
    ph, pw = padded_size(args)
    x = torch.randn(batch, 3, ph, pw, device=args.device)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def fwd(model, inp, amp=False):
        def fn():
            with torch.no_grad(), autocast(args, amp):
                model(inp)

        return fn

    variants = {"timm": fwd(theirs, x), "ours": fwd(ours, x), "timm_channels_last": fwd(theirs_cl, x_cl)}
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
    times = interleaved(variants, args.reps, args.warmup, args.device)
    med = {k: statistics.median(v) for k, v in times.items()}
    gflop = model_gflop(theirs, x)  # the same arithmetic as ours (traced graph, plain convs)
    pairs = [
        ("body+HRNetV2p forward, fp32", "ours", "timm"),
        ("body+HRNetV2p forward, fp32, both channels_last", "ours", "timm_channels_last"),
    ]
    if args.amp:
        amp = args.amp_dtype
        pairs += [
            (f"body+HRNetV2p forward, ours {amp} autocast vs timm fp32", "ours_amp", "timm"),
            (f"body+HRNetV2p forward, both {amp} autocast + channels_last", "ours_amp", "timm_channels_last_amp"),
        ]
    rows = []
    for title, a, b in pairs:
        dtype = args.amp_dtype if a.endswith("_amp") else "fp32"
        rows.append(
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
            rows[-1]["amp_rel_l2_vs_fp32"] = amp_err
    print_row(rows)
    return rows


def inference_rows(args, det, det_timm, batch):
    """Faster R-CNN inference, ours against the timm-bodied twin (and ours under autocast)."""
    h, w = args.size
    inputs = detector_inputs(batch, h, w, args.device, with_gt=False)

    def infer(model, amp=False):
        def fn():
            model.eval()  # the training-step rows of the previous batch size left it in train mode
            with torch.no_grad(), autocast(args, amp):
                model(inputs)

        return fn

    variants = {"timm": infer(det_timm), "ours": infer(det)}
    if args.amp:
        variants["ours_amp"] = infer(det, True)
    times = interleaved(variants, args.reps, args.warmup, args.device)
    rows = [timed_row("Faster R-CNN inference", batch, times, "ours", "timm")]
    if args.amp:
        rows.append(timed_row("Faster R-CNN inference, ours autocast vs timm fp32", batch, times, "ours_amp", "timm"))
    print_row(rows)
    return rows


def training_rows(args, det, det_timm, det_ckpt, batch):
    """One training step (time, peak memory), ours against timm-bodied, and activation checkpointing on / off."""
    h, w = args.size
    device = args.device
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
    rows = [
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
        title = f"Faster R-CNN training step (fwd+bwd), both {args.amp_dtype} autocast"
        rows.append(timed_row(title, batch, times, "ours_amp", "timm_amp"))
    print_row(rows)
    det.eval()
    return rows


PROFILE_CONFIGS = {
    "Faster R-CNN": "COCO-Detection/faster_rcnn_hrnetv2p_w32_1x.yaml",
    "Mask R-CNN": "COCO-InstanceSegmentation/mask_rcnn_hrnetv2p_w32_1x.yaml",
}


def profile_model(args, config):
    """A randomly initialised detector of ``config`` (MODEL.HRNET.ARCH ``args.arch``) that detects
    things on the profile's input (``calibrate_detections``), and that input (one image)."""
    cfg = get_hrnet_cfg(get_config_file(config), ["MODEL.HRNET.ARCH", args.arch])
    cfg.MODEL.DEVICE = args.device
    cfg.MODEL.WEIGHTS = ""
    torch.manual_seed(0)
    model = Trainer.build_model(cfg).eval()  # the inference path train_net.py --eval-only runs
    h, w = args.size
    inputs = detector_inputs(1, h, w, args.device, with_gt=False)
    calibrate_detections(model, inputs)
    return model, inputs


def profile_rows(args, peaks):
    """Per-stage inference times of Faster and Mask R-CNN at batch 1, fp32 and (with --amp) under
    MODEL.HRNET.INFERENCE_AUTOCAST <amp dtype> (backbone and heads)."""
    rows = []
    dtypes = ["fp32"] + ([args.amp_dtype] if args.amp else [])
    for name, config in PROFILE_CONFIGS.items():
        model, inputs = profile_model(args, config)
        for dtype in dtypes:
            set_inference_autocast(model, "" if dtype == "fp32" else dtype)
            result = profile_inference(model, inputs, reps=args.reps, warmup=args.warmup)
            with torch.no_grad():
                detections = len(model(inputs)[0]["instances"])
            stages = summarize(result)
            for stage in stages.values():
                if "gflops" in stage:
                    stage["pct_of_conv_peak"] = 100 * stage["gflops"] / peaks[dtype]["conv3x3"]
            rows.append(
                {
                    "measure": f"profile: {name} {args.arch.upper()}, {dtype}",
                    "batch": 1,
                    "dtype": dtype,
                    "detections": detections,
                    "stages": stages,
                    "runs": result["runs"],
                }
            )
            print_profile(rows[-1])
        set_inference_autocast(model, "")
        if name.startswith("Faster"):
            rows += roi_align_row(args, model, inputs)
    return rows


def roi_align_row(args, model, inputs):
    """The box pooler on the inputs of one forward (pyramid levels, 1000 proposals): Detectron2's ROIAlign
    (torchvision's one-thread kernel) against ParallelROIAlign (all threads), interleaved, outputs equal."""
    captured = {}
    handle = model.roi_heads.box_pooler.register_forward_pre_hook(lambda m, a: captured.setdefault("args", a))
    with torch.no_grad():
        model(inputs)
    handle.remove()
    feats, boxes = captured["args"]
    fast = model.roi_heads.box_pooler
    plain = copy.deepcopy(fast)
    parallel_roi_align(plain, enabled=False)
    with torch.no_grad():
        if not torch.equal(fast(feats, boxes), plain(feats, boxes)):
            raise RuntimeError("ParallelROIAlign differs from Detectron2's ROIAlign")
        times = interleaved(
            {"parallel": lambda: fast(feats, boxes), "plain": lambda: plain(feats, boxes)}, args.reps, 1
        )
    row = timed_row(
        f"ROIAlign of the box pooler ({sum(len(b) for b in boxes)} boxes, {args.arch.upper()} pyramid, "
        f"channels_last {feats[0].is_contiguous(memory_format=torch.channels_last)}), all threads",
        1,
        times,
        "parallel",
        "plain",
    )
    row["baseline"] = "Detectron2's ROIAlign, one thread"
    print_row([row])
    return [row]


def print_profile(row):
    print(f"{row['measure']} ({row['detections']} detections)")
    for stage, s in row["stages"].items():
        achieved = f"  {s['gflops']:.0f} GFLOP/s ({s['pct_of_conv_peak']:.0f}% of peak)" if "gflops" in s else ""
        print(f"  {stage:<26} {s['s']:.4f} s {s['pct']:5.1f}%{achieved}", flush=True)


def run(args):
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    ph, pw = padded_size(args)
    torch.manual_seed(0)
    dtypes = ["fp32"] + ([args.amp_dtype] if args.amp else [])
    peaks = peak_gflops(args.device, dtypes, args.reps, args.warmup)
    results = peak_rows(args, peaks)
    if "profile" in args.parts:
        results += profile_rows(args, peaks)
    if not {"body", "detector"} & set(args.parts):
        return results
    timm_model = timm_baseline(args.arch, torch.randn(1, 3, min(ph, 256), min(pw, 256)))
    if "body" in args.parts:
        ours, theirs, theirs_cl = body_pair(args, timm_model)
        for batch in args.batch:
            results += body_rows(args, ours, theirs, theirs_cl, peaks, batch)
        del ours, theirs, theirs_cl
    if "detector" in args.parts:
        det = make_detector(args, args.device, timm_model).eval()
        det_timm = timm_detector(det, timm_model, args.device).eval()
        det_ckpt = make_detector(args, args.device, timm_model, activation_checkpoint=True)
        det_ckpt.load_state_dict(det.state_dict())
        for batch in args.batch:
            results += inference_rows(args, det, det_timm, batch)
            results += training_rows(args, det, det_timm, det_ckpt, batch)
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
        if r["measure"].startswith(("peak: ", "profile: ")):
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
    lines += profile_markdown([r for r in results if r["measure"].startswith("profile: ")])
    lines += ["", f"Command: `{' '.join(['.venv/bin/python', 'tools/benchmark.py'] + sys.argv[1:])}`", ""]
    return "\n".join(lines)


def profile_markdown(rows):
    """One table: a row per stage, per profiled model and dtype seconds / % of whole / GFLOP/s (% of the same-dtype conv peak)."""
    if not rows:
        return []
    lines = [
        "",
        "Per-stage inference profile (batch 1; median s over the runs, % of the median whole; GFLOP/s for "
        "the conv / FC stages, % of the same-dtype 3x3-conv peak above):",
        "",
        "| stage | " + " | ".join(f"{r['measure'][9:]} ({r['detections']} det.)" for r in rows) + " |",
        "|---|" + "---:|" * len(rows),
    ]
    for stage in (*STAGES, "whole"):
        cells = []
        for r in rows:
            s = r["stages"].get(stage)
            if s is None:
                cells.append("")
                continue
            cell = f"{s['s']:.3f} s ({s['pct']:.0f}%)"
            if "gflops" in s:
                cell += f", {s['gflops']:.0f} GFLOP/s ({s['pct_of_conv_peak']:.0f}%)"
            if stage == "whole":
                cell = f"**{s['s']:.3f} s** (runs {s['min']:.3f}-{s['max']:.3f})"
            cells.append(cell)
        if any(cells):
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return lines


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
    parser.add_argument("--skip-detector", action="store_true", help="only the body + HRNetV2p forward (--parts body)")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=("body", "detector", "profile"),
        default=("body", "detector"),
        help="body: body + HRNetV2p vs timm; detector: Faster R-CNN inference / training vs timm-bodied; "
        "profile: per-stage inference time of Faster and Mask R-CNN (fp32, and the --amp dtype on backbone + heads)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: w18_small_v1, 64x96, batch 1, 1 run")
    parser.add_argument("--output-dir", default=str(REPO / "docs"))
    args = add_debug_argument(parser).parse_args(argv)
    check_output_dir(args.output_dir, key="--output-dir")  # before minutes of measuring, not after
    if args.quick:
        args.arch, args.size, args.batch, args.reps, args.warmup = "w18_small_v1", (64, 96), (1,), 1, 1
        args.parts = ("body", "detector", "profile")
    if args.skip_detector:
        args.parts = [p for p in args.parts if p != "detector"]
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
