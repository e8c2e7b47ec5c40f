"""Where an R-CNN's inference time goes: per-stage wall-clock times of one forward.

:class:`StageProfile` times one ``GeneralizedRCNN`` inference (Faster / Mask / Cascade R-CNN
with any backbone; the HRNetV2p backbone is split into body and pyramid) by forward hooks on
its modules and by wrapping a few of its bound methods for the duration of the profile (the
model is unchanged afterwards).  Stages, in the order they run:

========================  =====================================================================
preprocessing             ``model.preprocess_image``: normalise, pad, batch
body                      ``backbone.bottom_up`` (the HRNet body)
pyramid                   the rest of ``backbone`` (HRNetV2p: upsample, concat, reduce, pool, 3x3 convs)
RPN head                  ``proposal_generator.rpn_head`` (3x3 conv + 1x1 objectness / delta convs)
proposal selection        the rest of the proposal generator: anchors, decoding, top-k, NMS
ROIAlign                  ``roi_heads.box_pooler`` and ``roi_heads.mask_pooler``
box head                  ``roi_heads.box_head`` (the FC layers) + ``box_predictor`` forward
box post-processing       ``box_predictor.inference``: decoding, clipping, score filter, per-class NMS
mask head                 ``roi_heads.mask_head`` (convs, deconv, predictor, per-class selection)
ROI heads, other          the rest of ``roi_heads`` (Python glue between the parts above)
postprocess, mask paste   ``GeneralizedRCNN._postprocess``: boxes rescaled, masks pasted into the image
========================  =====================================================================

Every stage time is exclusive (a stage's sub-stages are not counted twice); the stages add
up to the whole.  With ``count_flops`` the conv / linear / deconv FLOPs of the stages made of
them are counted from the shapes seen during the profile (2 FLOPs per multiply-add; the body
and pyramid by fvcore on the plain graph), so a stage's GFLOP/s can be set against the
machine's peak.
"""

import os
import platform
import statistics
import time
from collections import defaultdict

import torch
from torch import nn

from detectron2.modeling import GeneralizedRCNN
from detectron2.structures import pairwise_iou

__all__ = [
    "STAGES",
    "StageProfile",
    "profile_inference",
    "layer_flops",
    "summarize",
    "calibrate_detections",
    "detection_agreement",
    "ISA_FLAGS",
    "isa_flags",
    "native_bf16",
    "machine_info",
    "interleaved",
    "peak_gflops",
    "DTYPES",
]

# the CPU features that decide which fp32 / bf16 / int8 kernels oneDNN can use
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def machine_info(device="cpu"):
    """What a timing depends on: CPU model and ISA flags, cores, torch threads and version, load."""
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
        "isa": isa_flags(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(variants, reps, warmup, device="cpu"):
    """{name: [seconds]}: every variant once per round, ``warmup`` rounds discarded (round-robin,
    so load from other processes hits all variants alike)."""
    times = {name: [] for name in variants}
    for r in range(warmup + reps):
        for name, fn in variants.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def peak_gflops(device, dtypes, reps=3, warmup=1):
    """The machine's own throughput for what the body is made of, in GFLOP/s (2 FLOPs per
    multiply-add): a 3x3 convolution (128 -> 128 channels at 200x336, a stride-4 map of an
    800x1344 image; channels_last) and a 2048^3 matmul, for each dtype name in ``dtypes``.
    Medians over ``reps`` runs after ``warmup``: what this torch build reaches on this
    machine, not a datasheet number."""
    c, h, w = 128, 200, 336
    n = 2048
    peaks = {}
    for name in dtypes:
        dtype = DTYPES[name]
        conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).to(device, dtype).to(memory_format=torch.channels_last)
        x = torch.randn(1, c, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)

        def run_conv():
            with torch.no_grad():
                conv(x)

        def run_mm():
            torch.mm(a, b)

        times = interleaved({"conv": run_conv, "mm": run_mm}, max(reps, 3), max(warmup, 1), device)
        peaks[name] = {
            "conv3x3": 2 * c * c * 9 * h * w / statistics.median(times["conv"]) / 1e9,
            "matmul": 2 * n**3 / statistics.median(times["mm"]) / 1e9,
        }
    return peaks


STAGES = (
    "preprocessing",
    "body",
    "pyramid",
    "RPN head",
    "proposal selection",
    "ROIAlign",
    "box head",
    "box post-processing",
    "mask head",
    "ROI heads, other",
    "postprocess, mask paste",
)

# stage -> (path of the module / method from the model, inclusive stage it is carved from)
_MODULES = {
    "backbone": ("backbone", None),
    "body": ("backbone.bottom_up", "backbone"),
    "proposals": ("proposal_generator", None),
    "RPN head": ("proposal_generator.rpn_head", "proposals"),
    "roi_heads": ("roi_heads", None),
    "ROIAlign": ("roi_heads.box_pooler", "roi_heads"),
    "ROIAlign ": ("roi_heads.mask_pooler", "roi_heads"),
    "box head": ("roi_heads.box_head", "roi_heads"),
    "box head ": ("roi_heads.box_predictor", "roi_heads"),
    "mask head": ("roi_heads.mask_head", "roi_heads"),
}


def _get(model, path):
    for part in path.split("."):
        model = getattr(model, part, None)
        if model is None:
            return None
    return model


def layer_flops(module, inputs, output):
    """FLOPs (2 per multiply-add) of one call of a Conv2d / ConvTranspose2d / Linear, from its shapes."""
    if isinstance(module, nn.Linear):
        return 2 * output.numel() * module.in_features
    if isinstance(module, nn.ConvTranspose2d):
        x = inputs[0]
        k = module.kernel_size[0] * module.kernel_size[1]
        return 2 * x.numel() * module.out_channels * k // module.groups
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size[0] * module.kernel_size[1]
        return 2 * output.numel() * module.in_channels * k // module.groups
    return 0


class StageProfile:
    """Context manager: while open, every ``model(inputs)`` in eval mode adds its stage times to
    ``self.runs`` (one {stage: seconds} dict per forward, plus "whole")."""

    def __init__(self, model: GeneralizedRCNN, count_flops=False):
        self.model = model
        self.count_flops = count_flops
        self.runs = []
        self.flops = defaultdict(int)
        self._handles = []
        self._patched = []
        self._active = []  # stack of inclusive stage names
        self._current = None

    # --- timing -------------------------------------------------------------------------
    def _open(self, stage):
        self._active.append((stage, time.perf_counter()))

    def _close(self, stage):
        name, start = self._active.pop()
        assert name == stage, (name, stage)
        self._current[name] += time.perf_counter() - start

    def _wrap_module(self, stage, module):
        for mod in module if isinstance(module, nn.ModuleList) else [module]:  # cascade: one per stage
            self._handles.append(mod.register_forward_pre_hook(lambda m, a: self._open(stage)))
            self._handles.append(mod.register_forward_hook(lambda m, a, o: self._close(stage), always_call=True))

    def _wrap_method(self, stage, owner, name):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            self._open(stage)
            try:
                return original(*args, **kwargs)
            finally:
                self._close(stage)

        setattr(owner, name, timed)
        self._patched.append((owner, name))

    def _count(self, stage):
        def hook(module, inputs, output):
            if self._current is not None and not self.runs:  # shapes of the first run
                self.flops[stage] += layer_flops(module, inputs, output)

        return hook

    def __enter__(self):
        m = self.model
        for stage, (path, _) in _MODULES.items():
            module = _get(m, path)
            if isinstance(module, nn.Module):
                self._wrap_module(stage, module)
                if self.count_flops and stage.strip() in ("RPN head", "box head", "mask head"):
                    for sub in module.modules():
                        if isinstance(sub, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)):
                            self._handles.append(sub.register_forward_hook(self._count(stage.strip())))
        self._wrap_method("preprocessing", m, "preprocess_image")
        predictor = _get(m, "roi_heads.box_predictor")
        if isinstance(predictor, nn.ModuleList):  # cascade: one predictor per stage
            for p in predictor:
                self._wrap_method("box post-processing", p, "inference")
        elif predictor is not None:
            self._wrap_method("box post-processing", predictor, "inference")
        self._handles.append(m.register_forward_pre_hook(lambda mod, a: self._start_run()))
        self._handles.append(m.register_forward_hook(lambda mod, a, o: self._end_run(), always_call=True))
        self._wrap_postprocess()
        if self.count_flops:
            self._handles.append(m.backbone.register_forward_pre_hook(self._count_backbone))
        return self

    def _wrap_postprocess(self):
        # GeneralizedRCNN.inference calls the static GeneralizedRCNN._postprocess by class name
        original = GeneralizedRCNN.__dict__["_postprocess"]
        profile = self

        def timed(*args, **kwargs):
            profile._open("postprocess, mask paste")
            try:
                return original.__func__(*args, **kwargs)
            finally:
                profile._close("postprocess, mask paste")

        GeneralizedRCNN._postprocess = staticmethod(timed)
        self._restore_postprocess = original

    def _count_backbone(self, module, args):
        if self.runs or "body" in self.flops:
            return
        from fvcore.nn import FlopCountAnalysis

        x = args[0]
        with torch.no_grad():
            for stage, mod in (("body", module.bottom_up), ("backbone", module)):
                analysis = FlopCountAnalysis(mod, (x,))
                analysis.unsupported_ops_warnings(False)
                analysis.uncalled_modules_warnings(False)
                self.flops[stage] = 2 * analysis.total()
        self.flops["pyramid"] = self.flops.pop("backbone") - self.flops["body"]

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        for owner, name in self._patched:
            delattr(owner, name)  # the instance attribute: the class's method shows again
        GeneralizedRCNN._postprocess = self._restore_postprocess

    def _start_run(self):
        self._current = defaultdict(float)
        self._start = time.perf_counter()

    def _end_run(self):
        whole = time.perf_counter() - self._start
        c = self._current
        run = {
            "preprocessing": c["preprocessing"],
            "body": c["body"],
            "pyramid": c["backbone"] - c["body"],
            "RPN head": c["RPN head"],
            "proposal selection": c["proposals"] - c["RPN head"],
            "ROIAlign": c["ROIAlign"] + c["ROIAlign "],
            "box head": c["box head"] + c["box head "],
            "box post-processing": c["box post-processing"],
            "mask head": c["mask head"],
            "postprocess, mask paste": c["postprocess, mask paste"],
        }
        parts = ("ROIAlign", "ROIAlign ", "box head", "box head ", "box post-processing", "mask head")
        run["ROI heads, other"] = c["roi_heads"] - sum(c[k] for k in parts)
        run["whole"] = whole
        self.runs.append(run)
        self._current = None


def profile_inference(model, inputs, reps=3, warmup=1, count_flops=True):
    """Per-stage times of ``model(inputs)`` (eval, no grad): {"runs": [{stage: s}], "flops": {stage: FLOPs}}.
    ``warmup`` forwards run first, untimed."""
    model.eval()
    flops = {}
    with torch.no_grad():
        for i in range(warmup):
            if i == 0 and count_flops:  # counted on the shapes of an untimed run
                with StageProfile(model, count_flops=True) as counting:
                    model(inputs)
                flops = dict(counting.flops)
            else:
                model(inputs)
        with StageProfile(model) as profile:
            for _ in range(reps):
                model(inputs)
    return {"runs": profile.runs, "flops": flops}


def summarize(result):
    """{stage: {"s": median seconds, "min", "max", "pct": % of the median whole, "gflops": GFLOP/s}}
    for the stages that ran, "whole" last."""
    runs = result["runs"]
    whole = statistics.median(r["whole"] for r in runs)
    rows = {}
    for stage in (*STAGES, "whole"):
        values = [r.get(stage, 0.0) for r in runs]
        med = statistics.median(values)
        if stage != "whole" and med <= 0 and stage not in result["flops"]:
            continue
        row = {"s": med, "min": min(values), "max": max(values), "pct": 100 * med / whole}
        flops = result["flops"].get(stage)
        if flops:
            row["gflop"] = flops / 1e9
            row["gflops"] = flops / 1e9 / med if med > 0 else float("nan")
        rows[stage] = row
    return rows


@torch.no_grad()
def calibrate_detections(model, inputs, min_detections=50, logits=tuple(8.0 - 0.5 * i for i in range(33)), seed=0):
    """Make a randomly initialised R-CNN detect things, so that the box post-processing, mask
    head and mask pasting of a profile do real work: the background logit's bias of every box
    predictor is lowered (over ``logits``) until ``inputs`` give at least ``min_detections``
    detections per image (capped by TEST.DETECTIONS_PER_IMAGE); first the class logits are spread
    as in a trained detector (predictor weights N(0, 0.03), biases N(0, 1), seeded: tests/mmdet_oracle.py's scales).  The backbone and RPN run once;
    only the ROI heads are re-run.  Returns the detections per image of the first image."""
    model.eval()
    images = model.preprocess_image(inputs)
    features = model.backbone(images.tensor)
    if not hasattr(model, "roi_heads"):  # a dense detector (FCOS): its classifier's bias, raised
        return _calibrate_dense_detections(model, images, features, min_detections, seed)
    proposals, _ = model.proposal_generator(images, features, None)
    predictors = model.roi_heads.box_predictor
    predictors = list(predictors) if isinstance(predictors, nn.ModuleList) else [predictors]
    cap = min(min_detections, predictors[-1].test_topk_per_image)
    g = torch.Generator().manual_seed(seed)
    for p in predictors:  # spread class scores as a trained detector's (the test oracle's scales)
        p.cls_score.weight.copy_(torch.randn(p.cls_score.weight.shape, generator=g) * 0.03)
        if p.cls_score.bias is not None:
            p.cls_score.bias.copy_(torch.randn(p.cls_score.bias.shape, generator=g))
    found = 0
    for logit in logits:
        for p in predictors:
            if p.cls_score.bias is not None:
                p.cls_score.bias[-1] = logit
        results, _ = model.roi_heads(images, features, proposals)
        found = len(results[0])
        if found >= cap:
            break
    return found


def _calibrate_dense_detections(
    model, images, features, min_detections, seed, biases=tuple(-12.0 + 0.5 * i for i in range(25))
):
    """:func:`calibrate_detections` for Detectron2's dense detectors (``model.head.cls_score``): class logits
    spread (weights N(0, 0.04), the test oracle's FCOS scale), their common bias raised over ``biases``."""
    features = [features[f] for f in model.head_in_features]
    cls_score = model.head.cls_score
    g = torch.Generator().manual_seed(seed)
    cls_score.weight.copy_(torch.randn(cls_score.weight.shape, generator=g) * 0.04)
    cap = min(min_detections, model.max_detections_per_image)
    found = 0
    for bias in biases:
        cls_score.bias.fill_(bias)
        results = model.forward_inference(images, features, model.head(features))
        found = len(results[0])
        if found >= cap:
            break
    return found


def detection_agreement(reference, other, score, iou):
    """(matched, total, |score differences| of matched) for one image's Instances: how many of ``reference``'s
    detections scoring at least ``score`` have a detection in ``other`` of the same class with box IoU >= ``iou``
    (the precision checks of low-precision and compiled inference against fp32 / eager)."""
    ref = reference[reference.scores >= score]
    if len(ref) == 0:
        return 0, 0, []
    if len(other) == 0:
        return 0, len(ref), []
    overlaps = pairwise_iou(ref.pred_boxes, other.pred_boxes.to(ref.pred_boxes.device))
    same_class = ref.pred_classes[:, None] == other.pred_classes[None, :].to(ref.pred_classes.device)
    overlaps = torch.where(same_class, overlaps, torch.zeros_like(overlaps))
    best, index = overlaps.max(dim=1)
    hit = best >= iou
    diffs = (ref.scores[hit] - other.scores[index[hit]].float()).abs().tolist()
    return int(hit.sum()), len(ref), diffs
