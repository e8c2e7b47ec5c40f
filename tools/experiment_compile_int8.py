#!/usr/bin/env python
"""torch.compile and int8 (PT2E) of body + HRNetV2p against today's fused eager path, on this CPU.

Measured in one process on the same input (medians over ``--reps`` after the first call,
round-robin):

* eager fp32: the default inference path (folded norms, fused add/ReLU, channels_last);
* eager bf16: the same under autocast bf16 (MODEL.HRNET.INFERENCE_AUTOCAST bf16);
* compile fp32 / compile bf16: ``torch.compile`` (inductor, ``freezing``: weights constant-folded
  and pre-packed) of the plain graph (compilation traces the plain graph, not the eager fused path);
* int8: PT2E quantization (torchao's ``X86InductorQuantizer``, static per-channel weights,
  per-tensor activations, calibrated on ``--calibration`` random images of the same size) of the
  exported plain graph, then ``torch.compile`` with freezing (needs ``requirements-int8.txt``).

For each: compile time (the first call, including tracing and C++ compilation), steady-state
time, output error against eager fp32 (||x - ref|| / ||ref||, worst pyramid level), and how many
times compilation ran again when the input size changed (Detectron2 pads to multiples of 32:
``--sizes`` are further padded sizes; dynamo's ``automatic_dynamic_shapes`` makes the second
size compile a dynamic-shape graph).  The body has random weights with BN statistics from the
input (as ``tools/benchmark.py``'s timm baseline), so activations are in a trained network's range.
Writes ``compile_int8.{json,md}`` into ``--output-dir``.

  .venv/bin/python tools/experiment_compile_int8.py --output-dir docs/performance
  .venv/bin/python tools/experiment_compile_int8.py --quick     # w18_small_v1 at 128x192
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from hrnet_d2 import ARCHITECTURES, HRNet
from hrnet_d2.engine.profiling import interleaved, machine_info
from hrnet_d2.modeling.pyramid import HRNetV2p
from hrnet_d2.utils.errors import add_debug_argument, exit_on_user_error
from hrnet_d2.utils.file_io import check_output_dir

REPO = Path(__file__).resolve().parents[1]


def body_and_pyramid(arch, x, seed=0):
    """HRNet body (FrozenBN) + HRNetV2p, random weights, BN statistics from ``x`` (train-mode pass first)."""
    torch.manual_seed(seed)
    net = HRNetV2p(HRNet(ARCHITECTURES[arch], norm="BN"), ["hr2", "hr3", "hr4", "hr5"])
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        net.train()
        net(x)
    return net.eval()


def rel_l2(out, ref):
    return max(((out[k].float() - ref[k]).norm() / ref[k].norm()).item() for k in ref)


def compile_model(model, dtype):
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    compiled = torch.compile(model)
    if dtype == "fp32":
        return compiled

    def run(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return compiled(x)

    return run


def int8_model(model, x, calibration):
    """PT2E: export, X86InductorQuantizer (default static config), calibrate, convert, compile with freezing."""
    import torch._inductor.config as inductor_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    inductor_config.freezing = True
    exported = torch.export.export(model, (x,)).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    g = torch.Generator().manual_seed(1)
    for _ in range(calibration):
        prepared(torch.randn(x.shape, generator=g))
    prepared(x)
    converted = convert_pt2e(prepared)
    return torch.compile(converted)


def dynamo_compiles():
    from torch._dynamo.utils import counters

    return sum(counters["stats"].values()) if "stats" in counters else 0, dict(counters.get("stats", {}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="w32", choices=sorted(ARCHITECTURES))
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1344), metavar=("H", "W"), help="padded input")
    parser.add_argument("--sizes", type=int, nargs="+", default=(800, 1216, 768, 1344), help="H W pairs: recompiles")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--calibration", type=int, default=4)
    parser.add_argument("--variants", nargs="+", default=("compile_fp32", "compile_bf16", "int8"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output-dir", default=str(REPO / "docs" / "performance"))
    args = add_debug_argument(parser).parse_args(argv)
    check_output_dir(args.output_dir, key="--output-dir")  # before minutes of measuring, not after
    if args.quick:
        args.arch, args.size, args.sizes, args.reps, args.calibration = "w18_small_v1", (128, 192), (128, 160), 1, 1
    torch.manual_seed(0)
    x = torch.randn(1, 3, *args.size)
    model = body_and_pyramid(args.arch, x)
    with torch.no_grad():
        ref = {k: v.float() for k, v in model(x).items()}
    eager_bf16 = copy.deepcopy(model)
    eager_bf16.inference_autocast = "bf16"
    fns = {"eager fp32": model, "eager bf16": eager_bf16}
    rows = {}
    for name in args.variants:
        torch._dynamo.reset()
        start = time.perf_counter()
        with torch.no_grad():
            if name == "int8":
                fn = int8_model(copy.deepcopy(model), x, args.calibration)
            else:
                fn = compile_model(copy.deepcopy(model), name.split("_")[1])
            out = fn(x)  # compiles
        rows[name] = {"compile_s": time.perf_counter() - start, "rel_l2_vs_eager_fp32": rel_l2(out, ref)}
        # other padded sizes: how often compilation runs again
        before, _ = dynamo_compiles()
        extra = []
        sizes = list(zip(args.sizes[::2], args.sizes[1::2]))
        for h, w in sizes:
            start = time.perf_counter()
            try:
                with torch.no_grad():
                    fn(torch.randn(1, 3, h, w))
            except Exception as e:  # the int8 graph is exported for one input size: another size fails
                extra.append({"size": [h, w], "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
                continue
            extra.append({"size": [h, w], "first_call_s": time.perf_counter() - start})
        after, stats = dynamo_compiles()
        rows[name]["other_sizes"] = extra
        rows[name]["dynamo_stats_after_sizes"] = stats
        fns[name] = fn
        print(name, json.dumps(rows[name]), flush=True)
    with torch.no_grad():
        rows["eager bf16"] = {"rel_l2_vs_eager_fp32": rel_l2(eager_bf16(x), ref)}
        rows["eager fp32"] = {"rel_l2_vs_eager_fp32": 0.0}

        def call(fn):
            return lambda: fn(x)

        times = interleaved({k: call(fn) for k, fn in fns.items()}, args.reps, 1)
    for k, v in times.items():
        rows[k].update({"median_s": statistics.median(v), "runs": v})
    base = rows["eager fp32"]["median_s"]
    for r in rows.values():
        r["vs_eager_fp32"] = r["median_s"] / base
    info = machine_info("cpu")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile_int8.json").write_text(json.dumps({"machine": info, "args": vars(args), "rows": rows}, indent=1))
    lines = [
        f"body + HRNetV2p {args.arch.upper()} at {args.size[0]}x{args.size[1]}, batch 1, {args.reps} runs after the first "
        f"(compiling) call, medians, round-robin.  Machine: {info['cpu']}, {info['cores']} cores, torch "
        f"{info['torch']}, ISA flags {', '.join(info['isa'])}, load average at end {info['load_average']}.",
        "",
        "| variant | steady s (runs) | vs eager fp32 | compile s (first call) | rel. L2 vs eager fp32 | first call at other padded sizes |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for k, r in rows.items():
        others = ", ".join(
            f"{s['size'][0]}x{s['size'][1]}: " + (f"{s['first_call_s']:.1f} s" if "error" not in s else s["error"])
            for s in r.get("other_sizes", [])
        )
        runs = "-".join(f"{t:.2f}" for t in (min(r["runs"]), max(r["runs"])))
        compile_s = f"{r['compile_s']:.0f}" if "compile_s" in r else ""
        lines.append(
            f"| {k} | {r['median_s']:.3f} ({runs}) | **{r['vs_eager_fp32']:.2f}** | {compile_s} | "
            f"{r['rel_l2_vs_eager_fp32']:.2%} | {others} |"
        )
    lines += ["", f"Command: `{' '.join(['.venv/bin/python', 'tools/experiment_compile_int8.py'] + sys.argv[1:])}`", ""]
    (out / "compile_int8.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    exit_on_user_error(main)
