"""Starting training processes, joining the job they belong to, and ending the job when one is lost.

Three launchers, one result: a process group (NCCL with one device per local rank on GPUs, gloo
on CPU), Detectron2's ``comm`` ready (``get_rank``, ``get_local_rank``, ``get_local_size``), and
the command's ``main(args)`` run in every process behind one-line errors.

* Detectron2's ``launch``: ``--num-gpus N`` processes per machine, ``--num-machines M
  --machine-rank R --dist-url tcp://HOST:PORT`` for several machines.
* torchrun (``python -m torch.distributed.run``): it starts the processes and sets RANK,
  LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT and TORCHELASTIC_*; each
  process joins the group (``env://``).  After a restart of its agent
  (TORCHELASTIC_RESTART_COUNT > 0, ``--max-restarts K``) training resumes by itself from the
  last complete checkpoint (``--resume`` implied).
* SLURM's ``srun`` with one task per device: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
  SLURM_NTASKS_PER_NODE and the node list give the same variables (the first node of the list
  hosts rank 0; the port comes from SLURM_JOB_ID unless MASTER_PORT is set).  A requeued job
  (SLURM_RESTART_COUNT > 0) resumes like a torchrun restart.

Collectives wait at most ``DIST.TIMEOUT_SECONDS`` (the ``timeout`` of :func:`launch_cli`).  When
one fails because a process ended or stopped answering, each process asks the others on a
separate gloo group (at most as long again) and ends with one line naming the lost rank,
instead of a gloo/NCCL traceback or a hang.
"""

import logging
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.multiprocessing import ProcessExitedException

from detectron2.engine import launch
from detectron2.engine.defaults import create_ddp_model as d2_create_ddp_model
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm

from ..utils.errors import (
    DEBUG_ENV,
    WORKER_MESSAGE_DELAY_S,
    ConfigValueError,
    UserError,
    debug_enabled,
    exit_on_user_error,
    exit_on_user_error_in_worker,
)

__all__ = [
    "JobEnvironment",
    "LaunchError",
    "create_ddp_model",
    "detect_job_environment",
    "find_lost_ranks",
    "first_slurm_host",
    "is_distributed_failure",
    "join_process_group",
    "launch_cli",
    "set_cpu_threads",
    "slurm_master_port",
]

logger = logging.getLogger(__name__)

_TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 20000


class LaunchError(UserError):
    """The launcher's variables or flags do not describe a job this process can join."""


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
    there is no CUDA) takes none.  On GPUs the process's current device (the same as the
    local rank's unless the launcher gave each process one GPU of its own).
    """
    if comm.get_world_size() > 1:
        device = next(model.parameters()).device
        # the process's own GPU: the local rank's, or the only one a launcher left it (CUDA_VISIBLE_DEVICES)
        kwargs.setdefault("device_ids", None if device.type == "cpu" else [torch.cuda.current_device()])
    return d2_create_ddp_model(model, **kwargs)


# --- which launcher started this process ---------------------------------------------


@dataclass(frozen=True)
class JobEnvironment:
    """This process's place in a job started by torchrun or srun (see :func:`detect_job_environment`)."""

    launcher: str  # "torchrun", "env://" (another launcher with torchrun's variables) or "slurm"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    restart_count: int = 0  # torchrun's TORCHELASTIC_RESTART_COUNT, SLURM's SLURM_RESTART_COUNT

    @property
    def machine_rank(self):
        return self.rank // self.local_world_size


def _int(env, key, default=None):
    value = env.get(key)
    if value is None:
        if default is None:
            raise LaunchError(f"{key} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{key}={value!r} is not an integer") from None


def _slurm_tasks_per_node(env):
    """Tasks per node: SLURM_NTASKS_PER_NODE (``--ntasks-per-node``), else the step's or the job's
    compressed count (``2(x3)``); the same on every node, or a LaunchError."""
    for key in ("SLURM_NTASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        value = env.get(key)
        if value:
            counts = {int(m.group(1)) for m in re.finditer(r"(\d+)(?:\(x\d+\))?", value)}
            if len(counts) != 1:
                raise LaunchError(
                    f"{key}={value!r}: the nodes run different numbers of tasks; start the same number on "
                    "every node (srun --ntasks-per-node=<devices per node>)"
                )
            return counts.pop()
    return None


def first_slurm_host(nodelist):
    """The first host of a SLURM node list (``node[01-03,7],gpu5`` -> ``node01``), by
    ``scontrol show hostnames`` when it is installed, else read here."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
            ).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass  # read it here
    depth, first = 0, nodelist
    for i, c in enumerate(nodelist):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            first = nodelist[:i]
            break
    # each bracket's first value, leading zeros kept: rack[1-2]-n[03-04] -> rack1-n03
    host = re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], first.strip())
    if not host or not re.fullmatch(r"[\w.\-]+", host):
        raise LaunchError(f"cannot read a host name from the SLURM node list {nodelist!r}")
    return host


def slurm_master_port(job_id):
    """The port all tasks of SLURM job ``job_id`` agree on: 15000 + job id mod 20000."""
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN


def detect_job_environment(environ=None):
    """The :class:`JobEnvironment` torchrun or srun gave this process, or None (Detectron2's
    ``launch`` then starts the processes).  torchrun's variables win over SLURM's (torchrun run
    by srun once per node).  SLURM counts when a step has more than one task."""
    env = os.environ if environ is None else environ
    if all(k in env for k in _TORCHRUN_KEYS):
        launcher = "torchrun" if any(k.startswith("TORCHELASTIC_") for k in env) else "env://"
        rank, world, local_rank = _int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK")
        if "LOCAL_WORLD_SIZE" not in env:
            raise LaunchError(
                "RANK, WORLD_SIZE and MASTER_ADDR are set but LOCAL_WORLD_SIZE is not: "
                "set it to the number of processes on each machine (torchrun sets it)"
            )
        job = JobEnvironment(
            launcher,
            rank,
            world,
            local_rank,
            _int(env, "LOCAL_WORLD_SIZE"),
            env["MASTER_ADDR"],
            _int(env, "MASTER_PORT"),
            _int(env, "TORCHELASTIC_RESTART_COUNT", 0),
        )
    elif "SLURM_PROCID" in env and _int(env, "SLURM_NTASKS", 1) > 1:
        rank, world, local_rank = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), _int(env, "SLURM_LOCALID")
        per_node = _slurm_tasks_per_node(env) or world
        node = _int(env, "SLURM_NODEID", rank // per_node)
        if world % per_node or rank != node * per_node + local_rank:
            raise LaunchError(
                f"SLURM task {rank} of {world} is task {local_rank} on node {node} with {per_node} tasks per node: "
                "ranks must be numbered node by node (srun --distribution=block, the default)"
            )
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not env.get("MASTER_ADDR") and not nodelist:
            raise LaunchError("SLURM_JOB_NODELIST / SLURM_NODELIST is not set (nor MASTER_ADDR)")
        if "MASTER_PORT" not in env and "SLURM_JOB_ID" not in env:
            raise LaunchError("SLURM_JOB_ID is not set (nor MASTER_PORT)")
        job = JobEnvironment(
            "slurm",
            rank,
            world,
            local_rank,
            per_node,
            env.get("MASTER_ADDR") or first_slurm_host(nodelist),
            _int(env, "MASTER_PORT") if "MASTER_PORT" in env else slurm_master_port(_int(env, "SLURM_JOB_ID")),
            _int(env, "SLURM_RESTART_COUNT", 0),
        )
    else:
        return None
    if not (0 <= job.rank < job.world_size and 0 <= job.local_rank < job.local_world_size <= job.world_size):
        raise LaunchError(
            f"{job.launcher}: rank {job.rank} of {job.world_size}, local rank {job.local_rank} of "
            f"{job.local_world_size} is not a place in a job"
        )
    if job.world_size % job.local_world_size:
        raise LaunchError(
            f"{job.launcher}: {job.world_size} processes do not split into machines of {job.local_world_size} each; "
            "start the same number of processes on every machine"
        )
    return job


def _attempt_store(job, timeout):
    """After a torchrun restart on one machine, the store the agent shares with its workers
    (TORCHELASTIC_USE_AGENT_STORE) still holds the keys of the failed attempt, and a worker that
    reads them before rank 0 has written its new address connects to a dead process
    (pytorch/pytorch#135712): each attempt gets keys of its own.  The restart count is the same
    for all workers of one agent only; across machines torch's remedy is to start torchrun with
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a store per attempt), which docs/distributed.md uses."""
    env = os.environ
    if not (job.launcher == "torchrun" and job.restart_count and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"):
        return None
    if env.get("GROUP_WORLD_SIZE", "1") != "1":
        if job.rank == 0:
            logger.warning(
                "torchrun restart %d across %s machines with the agents' shared store: if the workers cannot "
                "join, start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (pytorch/pytorch#135712)",
                job.restart_count,
                env["GROUP_WORLD_SIZE"],
            )
        return None
    store = dist.TCPStore(job.master_addr, job.master_port, job.world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"hrnet_d2/attempt_{job.restart_count}", store)


def join_process_group(job, timeout):
    """Join the job's process group (``env://``) as Detectron2's ``launch`` does for its
    workers: NCCL and the local rank's GPU when there is CUDA, else gloo; then Detectron2's
    per-machine group (``comm.get_local_rank()``)."""
    os.environ.update(
        MASTER_ADDR=job.master_addr,
        MASTER_PORT=str(job.master_port),
        RANK=str(job.rank),
        WORLD_SIZE=str(job.world_size),
        LOCAL_RANK=str(job.local_rank),
        LOCAL_WORLD_SIZE=str(job.local_world_size),
    )
    has_gpu = torch.cuda.is_available()
    if has_gpu:
        count = torch.cuda.device_count()
        if count == 1:  # srun --gpus-per-task=1, or CUDA_VISIBLE_DEVICES per process: this process's GPU
            torch.cuda.set_device(0)
        elif job.local_world_size <= count:
            torch.cuda.set_device(job.local_rank)
        else:
            raise LaunchError(
                f"{job.launcher} starts {job.local_world_size} processes on this machine, which has {count} "
                "GPUs: start one process per GPU"
            )
    backend = "nccl" if has_gpu else "gloo"
    try:
        store = _attempt_store(job, timeout)
        if store is None:
            dist.init_process_group(backend, init_method="env://", timeout=timeout)
        else:
            dist.init_process_group(backend, store=store, rank=job.rank, world_size=job.world_size, timeout=timeout)
    except Exception as e:  # nobody at MASTER_ADDR:MASTER_PORT, or not everybody came
        raise LaunchError(
            f"rank {job.rank} of {job.world_size} ({job.launcher}) could not join the process group at "
            f"{job.master_addr}:{job.master_port} within {timeout.total_seconds():g} s: {_first_line(e)}"
        ) from e
    comm.create_local_process_group(job.local_world_size)
    comm.synchronize()


# --- a lost process -------------------------------------------------------------------


def _first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def is_distributed_failure(error):
    """True when ``error`` (or what caused it) is a failed collective: torch.distributed's own
    errors (DistError: NCCL, the store) and gloo's RuntimeErrors (peer gone, timed out)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "gloo" in str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def find_lost_ranks(group, timeout):
    """Which ranks are gone, asked on ``group`` (a gloo group every rank joined at the start).

    Every rank calls it after a failed collective.  Rank 0 waits (at most ``timeout`` in all)
    for a message from each other rank: a rank that ended fails at once, one that stopped
    answering at the deadline.  Returns the lost ranks on rank 0 (maybe []); on other ranks
    [0] when rank 0 is gone, else None (rank 0 names them)."""
    deadline = time.monotonic() + timeout.total_seconds()
    token = torch.zeros(1)
    if dist.get_rank(group) != 0:
        try:
            dist.isend(token, dst=0, group=group).wait(timeout)
            return None
        except RuntimeError:
            return [0]
    lost, works = [], {}
    for peer in range(1, dist.get_world_size(group)):
        try:
            works[peer] = dist.irecv(torch.zeros(1), src=peer, group=group)
        except RuntimeError:  # its connection is already closed
            lost.append(peer)
    for peer, work in works.items():
        try:
            work.wait(timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
        except RuntimeError:
            lost.append(peer)
    return sorted(lost)


def _describe_lost(lost, error, timeout):
    seconds = f"{timeout.total_seconds():g}"
    if lost is None:
        return (
            f"rank {comm.get_rank()}: a collective failed ({_first_line(error)}); "
            "the process of rank 0 names the rank that was lost"
        )
    if not lost:
        return None
    ranks = f"rank {lost[0]}" if len(lost) == 1 else "ranks " + ", ".join(map(str, lost))
    return (
        f"lost {ranks} of {comm.get_world_size()}: the process ended or did not answer within "
        f"DIST.TIMEOUT_SECONDS = {seconds} s ({_first_line(error)}); training stopped "
        "(torchrun --max-restarts K restarts from the last complete checkpoint; or rerun with --resume)"
    )


class _OneLineTrainingExceptions(logging.Filter):
    """Detectron2's training loop logs "Exception during training:" with the traceback before
    re-raising; for a user mistake or a lost rank, whose one ``error:`` line follows, the log
    keeps one line (``--debug``: the traceback)."""

    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and not debug_enabled() and (isinstance(exc, UserError) or is_distributed_failure(exc)):
            record.msg, record.args = f"{record.getMessage()} {type(exc).__name__}: {_first_line(exc)}", ()
            record.exc_info = record.exc_text = None
        return True


def _run(main, args, timeout):
    """``main(args)`` in one process of the job; a failed collective ends it with one line
    naming the lost rank (exit status 1)."""
    probe = dist.new_group(backend="gloo", timeout=timeout) if comm.get_world_size() > 1 else None
    quiet = _OneLineTrainingExceptions()
    train_loop_logger = logging.getLogger("detectron2.engine.train_loop")
    train_loop_logger.addFilter(quiet)
    try:
        return main(args)
    except Exception as e:
        if probe is None or not is_distributed_failure(e):
            raise
        message = _describe_lost(find_lost_ranks(probe, timeout), e, timeout)
        if message is None:  # everybody answered: not a lost rank
            raise
        if debug_enabled():
            traceback.print_exc()
        if comm.get_rank() != 0:
            time.sleep(WORKER_MESSAGE_DELAY_S)  # a launcher that saw the loss too may end this process first
        print(f"error: {message}", file=sys.stderr, flush=True)
        # an orderly exit would close the process groups, which can wait on the lost peer
        logging.shutdown()
        sys.stdout.flush()
        os._exit(1)
    finally:
        train_loop_logger.removeFilter(quiet)


def _join_and_run(job, main, args, timeout):
    if job.world_size > 1:
        join_process_group(job, timeout)
    return _run(main, args, timeout)


# --- the command line -----------------------------------------------------------------


def _timeout(timeout_seconds, world_size):
    """The collective timeout: ``timeout_seconds()`` (DIST.TIMEOUT_SECONDS of the config) for a
    job of several processes, else (or when it returns None) Detectron2's default (30 minutes)."""
    seconds = timeout_seconds() if timeout_seconds is not None and world_size > 1 else None
    if seconds is None:
        return DEFAULT_TIMEOUT
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ConfigValueError("DIST.TIMEOUT_SECONDS", seconds, "must be a positive number of seconds")
    return timedelta(seconds=seconds)


def _check_flags(job, args):
    if args.num_gpus > 1 or args.num_machines > 1:
        flag = f"--num-gpus {args.num_gpus}" if args.num_gpus > 1 else f"--num-machines {args.num_machines}"
        starter = "srun" if job.launcher == "slurm" else job.launcher
        raise LaunchError(
            f"{flag}: this process was started by {starter} as rank {job.rank} of {job.world_size}, and "
            f"{starter} starts the processes itself; drop --num-gpus/--num-machines/--machine-rank/--dist-url"
        )


def launch_cli(main, args, timeout_seconds=None):
    """Run ``main(args)`` in every process of the job: joining the group of torchrun or srun when
    they started this process (:func:`detect_job_environment`), else through Detectron2's
    ``launch`` (``args.num_gpus`` processes per machine, ``--num-machines``/``--dist-url``).

    A user mistake ends the command with one ``error:`` line and exit status 2 from any
    process (``--debug``: the traceback, also in the spawned workers); a lost process with one
    line naming its rank and exit status 1.  ``timeout_seconds``: a function returning the
    collective timeout (the config's DIST.TIMEOUT_SECONDS), called when there are several
    processes.  After a torchrun restart or a SLURM requeue, ``args.resume`` is set.
    """
    if args.debug:
        os.environ[DEBUG_ENV] = "1"  # seen by the spawned workers too
    job = exit_on_user_error(detect_job_environment)
    if job is not None and job.launcher == "slurm" and args.num_machines > 1:
        job = None  # srun once per machine, Detectron2's flags say the rest
    if job is not None:
        exit_on_user_error(_check_flags, job, args)
        timeout = exit_on_user_error(_timeout, timeout_seconds, job.world_size)
        if job.restart_count and not args.resume:
            args.resume = True
            if job.rank == 0:
                print(
                    f"hrnet_d2: restart {job.restart_count} of this {job.launcher} job: resuming from the last "
                    "complete checkpoint in OUTPUT_DIR (--resume implied)",
                    file=sys.stderr,
                    flush=True,
                )
        return exit_on_user_error_in_worker(_join_and_run, job, main, args, timeout)
    timeout = exit_on_user_error(_timeout, timeout_seconds, args.num_gpus * args.num_machines)
    try:
        return launch(
            exit_on_user_error_in_worker,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(_run, main, args, timeout),
            timeout=timeout,
        )
    except ProcessExitedException as e:
        if e.signal_name:  # killed from outside: say which one (the others were stopped)
            rank = args.machine_rank * args.num_gpus + e.error_index
            print(
                f"error: the training process of rank {rank} (pid {e.error_pid}) was ended by {e.signal_name}; "
                "the others were stopped (rerun with --resume to continue from the last complete checkpoint)",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(1) from None
        raise SystemExit(e.exit_code) from None  # the worker said why (error line or traceback)
