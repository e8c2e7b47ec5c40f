#!/usr/bin/env python
"""Generate the model-zoo tables from the code: docs/model_zoo.md (the training recipes), the
README's "COCO model zoo" block and the ImageNet-weights block of docs/weights.md.

Parameters and GFLOPs of the training recipes are computed from the code (hrnet_d2/analysis.py),
the AP they target comes from the table below with its source, so docs/model_zoo.md cannot drift
from the configs: tests/test_model_zoo.py regenerates it and compares.  The README's "COCO model
zoo" block (the published detectors, the README's only AP table) and the ImageNet-weights block of
docs/weights.md are rendered from hrnet_d2.checkpoint.zoo, the table behind ``hrnet_d2://``
(tests/test_zoo.py compares).

    python tools/model_zoo.py              # rewrite docs/model_zoo.md and both hrnet_d2:// blocks
    python tools/model_zoo.py --check      # exit 1 if any of them is out of date
    python tools/model_zoo.py --zoo-only   # only the hrnet_d2:// blocks (fast: no model is built)
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional
from urllib.parse import urlsplit

import torch

from hrnet_d2.analysis import count_flops, count_parameters, load_model, norm_affine, parameter_groups
from hrnet_d2.checkpoint import zoo
from hrnet_d2.engine.defaults import run_tool, tool_argument_parser
from hrnet_d2.utils.file_io import atomic_write

REPO = Path(__file__).resolve().parents[1]

CONFIG_DIR = REPO / "configs"
DOC = REPO / "docs" / "model_zoo.md"
README = REPO / "README.md"
WEIGHTS_DOC = REPO / "docs" / "weights.md"
COCO_ZOO_MARKERS = ("<!-- coco-model-zoo:start -->", "<!-- coco-model-zoo:end -->")
IMAGENET_MARKERS = ("<!-- imagenet-weights:start -->", "<!-- imagenet-weights:end -->")
EVAL_MARKERS = ("<!-- coco-eval-commands:start -->", "<!-- coco-eval-commands:end -->")
INPUT_SIZE = (800, 1333)

HRNET_OD = "https://github.com/HRNet/HRNet-Object-Detection"
SOURCES = {
    "faster": f"{HRNET_OD}#faster-r-cnn",
    "mask": f"{HRNET_OD}#mask-r-cnn",
}
# Published COCO val2017 results of the model each training config targets: the
# HRNet-Object-Detection README (mmdetection v0.x), rows "SyncBN N, MS train N"
# (single-scale training with frozen BN statistics, as in our configs).
# params / gflops are that README's own #Params / GFLOPs columns (Faster R-CNN only).
PUBLISHED = {
    "COCO-Detection/faster_rcnn_hrnetv2p_w18_1x.yaml": dict(box=36.1, params=26.2, gflops=159.1, src="faster"),
    "COCO-Detection/faster_rcnn_hrnetv2p_w18_2x.yaml": dict(box=38.1, params=26.2, gflops=159.1, src="faster"),
    "COCO-Detection/faster_rcnn_hrnetv2p_w32_1x.yaml": dict(box=39.5, params=45.0, gflops=245.3, src="faster"),
    "COCO-Detection/faster_rcnn_hrnetv2p_w32_2x.yaml": dict(box=40.8, params=45.0, gflops=245.3, src="faster"),
    "COCO-Detection/faster_rcnn_hrnetv2p_w40_1x.yaml": dict(box=40.4, params=60.5, gflops=314.9, src="faster"),
    "COCO-Detection/faster_rcnn_hrnetv2p_w40_2x.yaml": dict(box=41.4, params=60.5, gflops=314.9, src="faster"),
    "COCO-Detection/faster_rcnn_hrnetv2p_w48_1x.yaml": dict(box=40.9, params=79.4, gflops=399.1, src="faster"),
    # the source labels this row "1x"; its model file is faster_rcnn_hrnetv2p_w48_2x_20190820-79fb8bfc.pth
    "COCO-Detection/faster_rcnn_hrnetv2p_w48_2x.yaml": dict(
        box=41.5, params=79.4, gflops=399.1, src="faster", note="a"
    ),
    "COCO-InstanceSegmentation/mask_rcnn_hrnetv2p_w18_1x.yaml": dict(box=37.3, mask=34.2, src="mask"),
    "COCO-InstanceSegmentation/mask_rcnn_hrnetv2p_w18_2x.yaml": dict(box=39.2, mask=35.7, src="mask"),
    "COCO-InstanceSegmentation/mask_rcnn_hrnetv2p_w32_1x.yaml": dict(box=40.7, mask=36.8, src="mask"),
    "COCO-InstanceSegmentation/mask_rcnn_hrnetv2p_w32_2x.yaml": dict(box=42.1, mask=37.6, src="mask"),
    # the source's W48 rows list 42.4 / 38.1 under "Mask mAP | Box mAP"; box > mask as in every other row
    # (and in mmdetection's own hrnet README), so the columns are swapped there
    "COCO-InstanceSegmentation/mask_rcnn_hrnetv2p_w48_1x.yaml": dict(box=42.4, mask=38.1, src="mask", note="b"),
    "COCO-InstanceSegmentation/mask_rcnn_hrnetv2p_w48_2x.yaml": dict(box=42.9, mask=38.3, src="mask", note="b"),
}
NOTES = {
    "a": 'the source labels this W48 row "1x"; its model file is `faster_rcnn_hrnetv2p_w48_2x_20190820-79fb8bfc.pth`.',
    "b": 'the source lists W48 as "Mask mAP 42.4 / Box mAP 38.1" (2x: 42.9 / 38.3); every other row has box > mask, '
    "so the two columns are swapped there and are shown here as box / mask.",
}
# Configs with no published number for the same recipe (schedule, head, data) get "n/a":
# e.g. HRNet-Object-Detection's Cascade R-CNN is 20 epochs, ours 1x; W40 Mask R-CNN was never published.


@dataclass
class Row:
    config: str
    arch: str
    params: int
    gflops: Optional[str] = None  # formatted, "%.1f"


def coco_configs() -> List[str]:
    """The training recipes (``*_mmdet.yaml`` are inference configs of converted mmdetection models)."""
    return sorted(
        str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.glob("COCO-*/*.yaml") if not p.stem.endswith("_mmdet")
    )


def collect(configs=None, flops_for=None, log=print) -> List[Row]:
    """Params of every config (built on the meta device); GFLOPs at 800x1333 for
    ``flops_for`` (default: all) — the slow part, one real forward per distinct body."""
    configs = coco_configs() if configs is None else configs
    flops_for = set(configs) if flops_for is None else set(flops_for)
    rows = []
    for name in configs:
        cfg, model = load_model(CONFIG_DIR / name, device="meta")
        row = Row(name, cfg.MODEL.HRNET.ARCH, count_parameters(model, norms=False))
        if name in flops_for:
            cfg, model = load_model(CONFIG_DIR / name)
            row.gflops = f"{sum(count_flops(cfg, model, *INPUT_SIZE).values()) / 1e9:.1f}"
            log(f"{name}: {row.params / 1e6:.2f} M params, {row.gflops} GFLOPs")
        rows.append(row)
    return rows


def _ap(value):
    return "n/a" if value is None else f"{value:.1f}"


def render_table(rows: List[Row], root: str = "") -> str:
    """``root``: path from the page to the repository root, for the config links."""
    lines = [
        "| config | body | params (M) | GFLOPs | target box AP | target mask AP | published #Params / GFLOPs | source |",
        "|:--|:--:|--:|--:|--:|--:|:--:|:--|",
    ]
    for r in rows:
        p = PUBLISHED.get(r.config, {})
        pub_cost = f"{p['params']}M / {p['gflops']}" if "params" in p else "n/a"
        note = f" ({p['note']})" if "note" in p else ""
        src = f"[HRNet-OD]({SOURCES[p['src']]}){note}" if p else "n/a"
        stem = Path(r.config).stem
        lines.append(
            f"| [{stem}]({root}configs/{r.config}) | {r.arch} | {r.params / 1e6:.2f} | {r.gflops or '?'} "
            f"| {_ap(p.get('box'))} | {_ap(p.get('mask'))} | {pub_cost} | {src} |"
        )
    return "\n".join(lines)


def _legend():
    notes = "\n".join(f"- ({k}) {v}" for k, v in NOTES.items())
    return (
        f"params and GFLOPs: computed by this project from the configs (`python tools/model_zoo.py`; fvcore, "
        f"1 multiply-add = 1 FLOP, G = 1e9, one {INPUT_SIZE[0]}x{INPUT_SIZE[1]} image, ROI heads on 1000 "
        "proposals / 100 detections; see below). **target** columns: the COCO val2017 AP published for the "
        "model each training config is modelled on (with Detectron2's R-CNN recipe: differences in "
        f"configs/Base-RCNN-HRNetV2p.yaml), copied from [HRNet-Object-Detection]({HRNET_OD}) (mmdetection v0.x, rows "
        'without SyncBN or multi-scale training); "n/a": no published number for the same recipe. These are '
        "other checkpoints than the mmdetection 2.x models of the README's COCO model zoo (`hrnet_d2://coco/...`), "
        "which have their own published AP (e.g. Faster R-CNN W18 1x: 36.1 here, 36.9 there): compare a model "
        "only with the number published for that model. "
        "**Measured by this project: nothing yet** — no COCO training has been run here, so there is no "
        "AP of ours to report. Published #Params count units of 2^20 and exclude BatchNorm affine terms; "
        "our params exclude them too (norm weight/bias: trained with the configs' BNEval norm) and count units "
        'of 10^6 (see "Why the published #Params differ" below).\n\n' + notes
    )


def parse_gflops(text: str) -> Dict[str, str]:
    """GFLOPs per config as written in a rendered table (lets the test recompute one)."""
    out = {}
    for m in re.finditer(r"^\| \[[^\]]+\]\((?:\.\./)?configs/([^)]+)\) \| [^|]+ \| [^|]+ \| ([^|]+?) \|", text, re.M):
        out[m.group(1)] = m.group(2)
    return out


def current_block(text: str, start_marker: str, end_marker: str, path=README) -> str:
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        raise SystemExit(f"{path}: markers {start_marker} ... {end_marker} not found")
    return text[start : end + len(end_marker)]


# ---------------------------------------------------------------- hrnet_d2:// tables (from hrnet_d2.checkpoint.zoo)
def _dash(value):
    return "–" if value is None else f"{value:.1f}"


def eval_command(e) -> str:
    return f"python train_net.py --config-file configs/{e.config} --eval-only MODEL.WEIGHTS hrnet_d2://{e.name}"


def coco_zoo_block() -> str:
    """README block: every published COCO model, its config, name and published AP, and how to evaluate one
    (every model's command: ``eval_block``, in docs/weights.md)."""
    lines = [
        COCO_ZOO_MARKERS[0],
        "| `hrnet_d2://` name | config | body | published box AP | published mask AP | source: mmdetection 3.3.0 model (checkpoint) |",
        "|:--|:--|:--:|--:|--:|:--|",
    ]
    for e in zoo.coco_models():
        lines.append(
            f"| `{e.name}` | [{Path(e.config).name}](configs/{e.config}) | {e.arch} | {_dash(e.box_ap)} | {_dash(e.mask_ap)} "
            f"| [`{e.source_name}`]({e.url}) |"
        )
    lines += [
        "",
        f"**Published** = COCO val2017 AP copied from {zoo.MMDET_METAFILE} ([mmdetection configs/hrnet]({zoo.MMDET_HRNET})): "
        "mmdetection's own evaluation of these checkpoints. **Measured here: none** — the machine this project is built on has "
        "no COCO and no network access, so no AP of a converted model has been measured. Evaluate one (COCO under "
        "`$DETECTRON2_DATASETS/coco`; every model's command: "
        "[docs/weights.md](docs/weights.md#evaluate-a-published-detector)):",
        "",
        "```bash",
        eval_command(zoo.coco_models()[0]),
        "```",
        COCO_ZOO_MARKERS[1],
    ]
    return "\n".join(lines)


def eval_block() -> str:
    """docs/weights.md block: the evaluation command of every published COCO model."""
    return "\n".join(
        [EVAL_MARKERS[0], "```bash", *(eval_command(e) for e in zoo.coco_models()), "```", EVAL_MARKERS[1]]
    )


def imagenet_block() -> str:
    """docs/weights.md block: the ImageNet bodies behind ``hrnet_d2://imagenet/<arch>``."""
    lines = [
        IMAGENET_MARKERS[0],
        "| `hrnet_d2://` name | official file (HRNet-Image-Classification) | timm | downloaded from (sha256 prefix) |",
        "|:--|:--|:--|:--|",
    ]
    for arch, e in zoo.imagenet_bodies().items():
        where = ", else ".join(
            f"[{urlsplit(d.url).netloc}]({d.url}) ({f'`{d.sha256}`' if d.sha256 else 'no published hash: checked by conversion'})"
            for d in e.downloads
        )
        lines.append(f"| `{e.name}` | `{e.official_file}` | `{e.timm_name}.ms_in1k` | {where} |")
    lines.append(IMAGENET_MARKERS[1])
    return "\n".join(lines)


def _replace_block(text, markers, block, path=README):
    return text.replace(current_block(text, *markers, path=path), block)


# (file, markers, block) of every block rendered from hrnet_d2.checkpoint.zoo
def zoo_blocks():
    return [
        (README, COCO_ZOO_MARKERS, coco_zoo_block()),
        (WEIGHTS_DOC, IMAGENET_MARKERS, imagenet_block()),
        (WEIGHTS_DOC, EVAL_MARKERS, eval_block()),
    ]


# ---------------------------------------------------------------- parameter difference
FASTER = [f"COCO-Detection/faster_rcnn_hrnetv2p_{w}_1x.yaml" for w in ("w18", "w32", "w40", "w48")]
MMDET_V0_BBOX_PRED_EXTRA = 4 * 1024 + 4  # 81-class (incl. background) box regression vs Detectron2's 80


def parameter_difference() -> str:
    cols = [
        "backbone.bottom_up",
        "backbone.reduction_conv",
        "backbone.fpn_convs",
        "proposal_generator.rpn_head",
        "roi_heads.box_head",
        "roi_heads.box_predictor",
    ]
    head = "| Faster R-CNN HRNetV2p | " + " | ".join(Path(c).stem.split("_")[3].upper() for c in FASTER) + " |"
    lines = [head, "|:--|" + "--:|" * len(FASTER)]
    data = []
    for c in FASTER:
        cfg, model = load_model(CONFIG_DIR / c, device="meta")
        data.append(
            (
                parameter_groups(model, norms=False),
                count_parameters(model, norms=False),
                norm_affine(model),
                PUBLISHED[c]["params"],
            )
        )
    for col in cols:
        lines.append(f"| `{col}` | " + " | ".join(f"{g[col]:,}" for g, *_ in data) + " |")
    lines.append("| **total (norm weight/bias left out)** | " + " | ".join(f"**{t:,}**" for _, t, _, _ in data) + " |")
    lines.append("| total / 10^6 | " + " | ".join(f"{t / 1e6:.2f} M" for _, t, _, _ in data) + " |")
    lines.append("| total / 2^20 | " + " | ".join(f"**{t / 2**20:.2f}**" for _, t, _, _ in data) + " |")
    lines.append("| published #Params | " + " | ".join(f"**{p}M**" for *_, p in data) + " |")
    lines.append(
        "| difference 10^6-count - published | " + " | ".join(f"{t / 1e6 - p:+.2f} M" for _, t, _, p in data) + " |"
    )
    lines.append("| BN weight+bias (left out above) | " + " | ".join(f"{a:,}" for _, _, a, _ in data) + " |")
    lines.append("| (total + BN affine) / 2^20 | " + " | ".join(f"{(t + a) / 2**20:.2f}" for _, t, a, _ in data) + " |")
    lines.append(
        f"| (total + {MMDET_V0_BBOX_PRED_EXTRA:,}) / 2^20 | "
        + " | ".join(f"{(t + MMDET_V0_BBOX_PRED_EXTRA) / 2**20:.2f}" for _, t, _, _ in data)
        + " |"
    )
    table = "\n".join(lines)
    w18 = data[0]
    with_bn = " / ".join(f"{(t + a) / 2**20:.2f}" for _, t, a, _ in data)
    published = " / ".join(f"{p}" for *_, p in data)
    return f"""## Why the published #Params differ

The HRNet object-detection README gives Faster R-CNN HRNetV2p W18/W32/W40/W48 as
26.2 / 45.0 / 60.5 / 79.4 M parameters; a Detectron2 Faster R-CNN with these bodies and
HRNetV2p counts {", ".join(f"{t / 1e6:.2f}" for _, t, _, _ in data)} M — {w18[1] / 1e6 - w18[3]:.2f} M more
for W18, growing with width ({data[-1][1] / 1e6 - data[-1][3]:.2f} M for W48). Per module
(`python tools/analyze_model.py --config-file configs/COCO-Detection/faster_rcnn_hrnetv2p_w32_1x.yaml --tasks parameter`):

{table}

**No module is missing or extra: the published figure is the same count in units of 2^20 = 1,048,576
("M" as in MiB), not 10^6.** Dividing our exact totals by 2^20 gives the published values to
the published precision for all four widths (bold rows). The gap therefore grows in proportion
to the total (4.9 %: 1 - 10^6/2^20), which is why it looks like a width-dependent module.
Every module matches the reference architecture (mmdetection v0.x `HighResolutionNet` +
`HRFPN` + `RPNHead` + `SharedFCBBoxHead` in `configs/hrnet/faster_rcnn_hrnetv2p_w*_1x.py`):

- body: identical key-for-key and parameter-for-parameter to the official ImageNet model minus its
  classification head (checked against timm for every width in `tests/test_backbone.py`);
- pyramid: 1x1 `reduction_conv` (sum of branch widths -> 256, with bias) and five unshared
  3x3 256 -> 256 `fpn_convs` with bias, as HRFPN;
- RPN head: 3x3 conv 256 -> 256 + objectness (3) + deltas (12) — the same layers as mmdetection's RPNHead
  with sigmoid classification;
- box head: two FCs 12544 -> 1024 -> 1024; predictor: 81-way classification (80 + background) in both.

Two smaller differences exist, each under 0.1 M (104,858 at 2^20):

- BatchNorm affine terms: mmdetection keeps BN weight/bias as `nn.Parameter`s, as our configs' BNEval
  norm does (FrozenBN would store them as buffers); our totals leave them out ({w18[2]:,} for W18). The
  published numbers match only *without* them (row "(total + BN affine) / 2^20" gives {with_bn} instead of
  {published}), i.e. the published counter also left norm layers out;
- box regression: mmdetection v0.x regresses class-specific boxes for 81 classes including background
  (`reg_class_agnostic=False`, 4 x 81 outputs), Detectron2 for 80: {MMDET_V0_BBOX_PRED_EXTRA:,} more parameters
  there (last row: no change at the published 0.1 M precision).

So our architecture is not the one that is wrong, and nothing was changed. The published GFLOPs
(159.1 for W18) follow a convention the source does not state and that we could not reproduce
exactly (the HRNet classification code reports multiply-adds / 2^30; the input size and ROI count
behind the detection numbers are not given). Ours are the fvcore counts defined above: compare
GFLOPs only within this table.
"""


def render_doc(rows: List[Row]) -> str:
    return f"""# Model zoo: the training recipes

Generated by `python tools/model_zoo.py` — do not edit by hand (`tests/test_model_zoo.py` checks that this file
matches the code).

Every COCO training config (`configs/COCO-*/`, not the `*_mmdet.yaml` inference configs of converted
detectors): its size, its cost, and the AP of the published model it is modelled on. Nothing here has been
trained on COCO by this project. The detectors you can download and run by name are in the README's
[COCO model zoo](../README.md#coco-model-zoo).

{render_table(rows, root="../")}

{_legend()}

## How the numbers are computed

- **params**: `sum(p.numel() for p in model.parameters())` of the Detectron2 model built from the config,
  norm layers left out (`count_parameters(model, norms=False)` in `hrnet_d2/analysis.py`): their weight/bias
  (trainable with the configs' BNEval norm) are counted apart below, their statistics are buffers.
- **GFLOPs**: fvcore (`fvcore.nn.FlopCountAnalysis`, one fused multiply-add = one FLOP, G = 10^9) on fixed shapes,
  so the number depends on the config only, not on what a randomly initialised model happens to propose:
  backbone (body + pyramid) on one {INPUT_SIZE[0]}x{INPUT_SIZE[1]} image padded to a multiple of 32 (800x1344),
  RPN / RetinaNet / semantic heads on the resulting feature maps, box head + predictor (each cascade stage) on
  `MODEL.RPN.POST_NMS_TOPK_TEST` = 1000 proposals, mask / keypoint head on `TEST.DETECTIONS_PER_IMAGE` = 100
  detections. ROIAlign, NMS and element-wise ops are not counted. Any config, any size:
  `python tools/analyze_model.py --config-file <config> --input-size 800 1333`.
- The 1x and 2x configs of a model are the same network, so they share params and GFLOPs.

{parameter_difference()}"""


def write(rows: List[Row]):
    DOC.parent.mkdir(parents=True, exist_ok=True)
    _write_text(DOC, render_doc(rows))
    write_zoo_blocks()


def write_zoo_blocks():
    """Only the hrnet_d2:// tables (no model is built): ``--zoo-only``."""
    for path, markers, block in zoo_blocks():
        _write_text(path, _replace_block(path.read_text(), markers, block, path=path))


def _write_text(path, text):
    """The whole file or, if interrupted, the old one (never a half-written README)."""
    atomic_write(path, lambda f: f.write(text), mode="w")


def main(argv=None):
    parser = tool_argument_parser(__doc__.split("\n\n")[0], config=False)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if docs/model_zoo.md or a hrnet_d2:// block is stale"
    )
    parser.add_argument(
        "--zoo-only",
        action="store_true",
        help="only rewrite (or with --check, only check) the tables rendered from hrnet_d2.checkpoint.zoo "
        "(README, docs/weights.md; fast)",
    )
    args = parser.parse_args(argv)
    wanted = [(path, block) for path, _, block in zoo_blocks()]
    if args.zoo_only:
        if args.check:
            stale = [f"{p}: {b.splitlines()[0]}" for p, b in wanted if b not in p.read_text()]
            if stale:
                print("out of date (run python tools/model_zoo.py --zoo-only):", ", ".join(stale))
            return int(bool(stale))
        write_zoo_blocks()
        print(f"wrote the hrnet_d2:// tables in {README} and {WEIGHTS_DOC}")
        return 0
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 8)))
    rows = collect()
    if args.check:
        stale = [
            str(p)
            for p, want in ((DOC, render_doc(rows)), *wanted)
            if want not in (p.read_text() if p.exists() else "")
        ]
        if stale:
            print("out of date (run python tools/model_zoo.py):", ", ".join(stale))
            return 1
        return 0
    write(rows)
    print(f"wrote {DOC} and the hrnet_d2:// tables in {README} and {WEIGHTS_DOC}")
    return 0


if __name__ == "__main__":
    run_tool(main)
