"""Starting training processes: Detectron2's ``launch`` behind one-line errors, CPU threads per
process, and DistributedDataParallel for CPU models too."""

import logging
import os

import torch
from torch.multiprocessing import ProcessExitedException

from detectron2.engine import launch
from detectron2.engine.defaults import create_ddp_model as d2_create_ddp_model
from detectron2.utils import comm

from ..utils.errors import DEBUG_ENV, UserError, exit_on_user_error_in_worker

__all__ = ["create_ddp_model", "launch_cli", "set_cpu_threads"]

logger = logging.getLogger(__name__)


def set_cpu_threads(device, num_workers):
    """On CPU, give each training process its share of the cores, less one per
    data-loader worker (at least 1 thread).

    PyTorch's default (one thread per core in every process) plus the workers
    oversubscribes the cores, and OpenMP's spinning threads then slow down many-fold
    when anything else runs.  With ``--num-gpus N`` on CPU the N processes of a machine
    share its cores.  An explicit OMP_NUM_THREADS wins.
    """
    if torch.device(device).type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    processes = comm.get_local_size()
    torch.set_num_threads(max(1, cores // processes - num_workers))
    logger.info(
        "Using %d CPU threads (%d cores, %d training processes on this machine, %d data-loader workers each)",
        torch.get_num_threads(),
        cores,
        processes,
        num_workers,
    )


def create_ddp_model(model, **kwargs):
    """Detectron2's ``create_ddp_model``, also for a model on the CPU.

    Detectron2 gives DistributedDataParallel ``device_ids=[local rank]``, which only a
    single-GPU module accepts; a CPU module (``launch`` picks the gloo backend when
    there is no CUDA) takes none.
    """
    if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return d2_create_ddp_model(model, **kwargs)


def launch_cli(main, args):
    """Run ``main(args)`` through Detectron2's ``launch`` (``args.num_gpus`` processes per machine,
    NCCL on GPUs, gloo on CPU) so that a user mistake ends the command with one ``error:`` line and
    exit status 2 from any process (``--debug``: the traceback, also in the spawned workers)."""
    if args.debug:
        os.environ[DEBUG_ENV] = "1"  # seen by the spawned workers too
    try:
        return launch(
            exit_on_user_error_in_worker,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(main, args),
        )
    except ProcessExitedException as e:  # a worker stopped on a user mistake and said why
        if e.exit_code == UserError.exit_code:
            raise SystemExit(e.exit_code) from None
        raise
