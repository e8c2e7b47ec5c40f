"""Test helper (run as a script): train with hrnet_d2's Trainer under Detectron2's
``launch``, as train_net.py does, and write every iteration's losses to a JSON file
(train_net.py's writers log them every 20 iterations only).

    python tests/loss_trace.py OUT.json --num-gpus 2 --dist-url auto --config-file ... KEY VALUE ...

$LOSS_TRACE_SAME_DATA_ON_EVERY_RANK=1: every rank trains on rank 0's images (a negative control).
"""

import json
import os
import sys

import detectron2.utils.comm as comm
from detectron2.engine import default_argument_parser, default_setup, hooks, launch

from hrnet_d2 import get_hrnet_cfg
from hrnet_d2.data import ensure_all_generated, register_all_shapes
from hrnet_d2.engine import Trainer, set_cpu_threads


class LossTrace(hooks.HookBase):
    """Rank 0 keeps the losses of each iteration (averaged over the ranks by the trainer)."""

    def __init__(self):
        self.losses = []

    def after_step(self):
        if comm.is_main_process():
            storage = self.trainer.storage
            names = [k for k in storage.histories() if k == "total_loss" or k.startswith("loss_")]
            self.losses.append({k: storage.history(k).latest() for k in names})


def _every_rank_reads_rank_0s_images():
    """A faulty data split (for a negative control): each rank's TrainingSampler yields rank 0's share."""
    from detectron2.data.samplers import TrainingSampler

    init = TrainingSampler.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._rank, self._world_size = 0, comm.get_world_size()

    TrainingSampler.__init__ = __init__


def _main(args, out):
    if os.environ.get("LOSS_TRACE_SAME_DATA_ON_EVERY_RANK") == "1":  # in each spawned worker
        _every_rank_reads_rank_0s_images()
    register_all_shapes()
    cfg = get_hrnet_cfg(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    set_cpu_threads(cfg.MODEL.DEVICE, cfg.DATALOADER.NUM_WORKERS)
    if comm.is_main_process():
        ensure_all_generated(list(cfg.DATASETS.TRAIN))
    comm.synchronize()
    trainer = Trainer(cfg)
    trace = LossTrace()
    trainer.register_hooks([trace])
    trainer.resume_or_load(resume=False)
    trainer.train()
    if comm.is_main_process():
        with open(out, "w") as f:
            json.dump(trace.losses, f)


if __name__ == "__main__":
    args = default_argument_parser().parse_args(sys.argv[2:])
    launch(_main, args.num_gpus, dist_url=args.dist_url, args=(args, sys.argv[1]))
