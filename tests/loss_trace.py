"""Test helper (run as a script, by any launcher, like train_net.py): train_net.py whose rank 0
also appends the losses of every iteration (averaged over the ranks by the trainer) to a
JSON-lines file; train_net.py's writers log them every 20 iterations only.

    python tests/loss_trace.py OUT.jsonl --num-gpus 2 --dist-url auto --config-file ... KEY VALUE ...
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/loss_trace.py OUT.jsonl --config-file ...

A restarted or resumed run appends again from where it continues (tests read the last line of
each iteration).  ``HRNET_D2_TEST_SAME_DATA=1`` (negative control of the
parity tests): every rank reads rank 0's share of the training data.
"""

import json
import os
import sys
from pathlib import Path

import detectron2.utils.comm as comm
from detectron2.data import samplers
from detectron2.engine import hooks


class LossTrace(hooks.HookBase):
    def __init__(self, path):
        self.path = path

    def after_step(self):
        if comm.is_main_process():
            storage = self.trainer.storage
            names = [k for k in storage.histories() if k == "total_loss" or k.startswith("loss_")]
            row = {"iteration": self.trainer.iter, **{k: storage.history(k).latest() for k in names}}
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def _same_data_for_every_rank():
    init = samplers.TrainingSampler.__init__

    def rank_zero_share(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._rank = 0

    samplers.TrainingSampler.__init__ = rank_zero_share


def _install(out):
    """Make train_net.py's Trainer trace to ``out`` (and, on request, read the same data on every rank)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train_net.py
    import train_net

    class TracingTrainer(train_net.Trainer):
        def build_hooks(self):
            return super().build_hooks() + [LossTrace(out)]

    train_net.Trainer = TracingTrainer
    if os.environ.get("HRNET_D2_TEST_SAME_DATA") == "1":
        _same_data_for_every_rank()
    return train_net


# the script, and the workers Detectron2's launch spawns (they import it as __mp_main__, argv kept)
if __name__ in ("__main__", "__mp_main__"):
    _train_net = _install(sys.argv[1])
if __name__ == "__main__":
    _train_net.cli(sys.argv[2:])
