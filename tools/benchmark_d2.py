#!/usr/bin/env python
"""Speed of a config's data loader, training and inference, as Detectron2's ``tools/benchmark.py``.

The pip detectron2 package does not ship ``tools/``; this is that tool's behaviour with
our config keys and the generated datasets registered.  Training and inference run on a
fixed set of pre-loaded batches, so they measure the model, not the disk.  Progress is
logged (Detectron2's metric printer with ETA for ``train``, a tqdm bar otherwise), and the
result is printed as one JSON line.  (``tools/benchmark.py`` compares our body with timm's.)

    python tools/benchmark_d2.py --config-file configs/shapes/Base-HRNetV2p-shapes.yaml --task train
    python tools/benchmark_d2.py --config-file configs/COCO-Detection/faster_rcnn_hrnetv2p_w32_1x.yaml \
        --task eval --iters 50 MODEL.WEIGHTS model_final.pth
    python tools/benchmark_d2.py --config-file ... --task data
"""

import itertools
import json
import logging
import time

import torch
from tqdm import tqdm

from detectron2.data import DatasetFromList, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import SimpleTrainer, hooks
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.utils.events import CommonMetricPrinter

from hrnet_d2.checkpoint import AtomicCheckpointer
from hrnet_d2.checkpoint.inference import load_inference_weights
from hrnet_d2.data import ensure_all_generated
from hrnet_d2.data.checks import check_datasets
from hrnet_d2.engine.defaults import run_tool, tool_argument_parser, tool_setup

logger = logging.getLogger("hrnet_d2.benchmark")

NUM_PRELOADED = 20  # distinct batches kept in memory for train / eval


def _repeat(batches):
    """An endless loader cycling over pre-loaded batches (Detectron2's benchmark does the same)."""
    return itertools.cycle(batches)


def benchmark_data(cfg, iters):
    loader = iter(build_detection_train_loader(cfg))
    next(loader)  # start-up (workers, dataset loading) is not speed
    start = time.perf_counter()
    for _ in tqdm(range(iters), desc="data loader"):
        next(loader)
    seconds = time.perf_counter() - start
    return {
        "task": "data",
        "iters": iters,
        "seconds_per_iter": seconds / iters,
        "images_per_second": iters * cfg.SOLVER.IMS_PER_BATCH / seconds,
    }


def benchmark_train(cfg, iters):
    model = build_model(cfg)
    model.train()
    if cfg.MODEL.WEIGHTS:
        AtomicCheckpointer(model, cfg=cfg).load(cfg.MODEL.WEIGHTS)
    optimizer = build_optimizer(cfg, model)
    loader = build_detection_train_loader(cfg)
    batches = DatasetFromList(list(itertools.islice(loader, min(iters, NUM_PRELOADED))), copy=False, serialize=False)
    trainer = SimpleTrainer(model, _repeat(batches), optimizer)
    timer = hooks.IterationTimer(warmup_iter=min(3, max(iters - 1, 0)))
    trainer.register_hooks(
        [timer, hooks.PeriodicWriter([CommonMetricPrinter(iters)], period=max(1, min(20, iters // 5)))]
    )
    trainer.train(0, iters)
    times = trainer.storage.history("time").values() if "time" in trainer.storage.histories() else []
    seconds = [t for t, _ in times] or [float("nan")]
    median = sorted(seconds)[len(seconds) // 2]
    return {
        "task": "train",
        "iters": iters,
        "seconds_per_iter": median,
        "images_per_second": cfg.SOLVER.IMS_PER_BATCH / median,
    }


@torch.no_grad()
def benchmark_eval(cfg, iters, warmup=3):
    model = build_model(cfg)
    model.eval()
    if cfg.MODEL.WEIGHTS:
        load_inference_weights(model, cfg)  # the one place MODEL.WEIGHTS is resolved for inference
    loader = build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])
    batches = list(itertools.islice(loader, NUM_PRELOADED))
    data = _repeat(batches)
    for _ in range(warmup):
        model(next(data))
    seconds = []
    for _ in tqdm(range(iters), desc="inference"):
        batch = next(data)
        start = time.perf_counter()
        model(batch)
        seconds.append(time.perf_counter() - start)
    median = sorted(seconds)[len(seconds) // 2]
    return {"task": "eval", "iters": iters, "seconds_per_iter": median, "images_per_second": 1.0 / median}


TASKS = {"data": benchmark_data, "train": benchmark_train, "eval": benchmark_eval}


def get_parser():
    parser = tool_argument_parser(__doc__)
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--iters", type=int, default=100)
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    cfg = tool_setup(args)
    names = list(cfg.DATASETS.TEST[:1]) if args.task == "eval" else list(cfg.DATASETS.TRAIN)
    ensure_all_generated(names)
    check_datasets(names)
    logger.info("Benchmarking %s of %s on %s", args.task, args.config_file, cfg.MODEL.DEVICE)
    result = dict(TASKS[args.task](cfg, args.iters), config=args.config_file, device=cfg.MODEL.DEVICE)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_tool(main)
