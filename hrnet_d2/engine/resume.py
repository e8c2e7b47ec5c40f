"""Exact ``--resume``: a run continued from a checkpoint sees the images, RNG states and
schedule the uninterrupted run would have.

``ResumeState`` (a hook) saves every rank's RNG states with the checkpoint and restores them;
``build_resumable_train_loader`` builds Detectron2's training loader on a ``ResumableSampler``.

Detectron2's training samplers are infinite, seeded streams; on ``--resume`` they
start again from the beginning, so a resumed run sees different images than the run
it continues.  ``ResumableSampler`` skips the indices that the iterations before the
checkpoint consumed (``ResumeState.before_train`` sets ``start``), so that the images
after a resume are the ones an uninterrupted run would have seen.
"""

import itertools
import logging
import random

import numpy as np
import torch
from torch.utils.data import Sampler

from detectron2.data import build_detection_train_loader
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import hooks
from detectron2.utils import comm

from ..utils.errors import UserError

__all__ = [
    "ResumableSampler",
    "ResumeMismatch",
    "ResumeState",
    "build_resumable_train_loader",
    "capture_rng_state",
    "restore_rng_state",
]

logger = logging.getLogger(__name__)


class ResumeMismatch(UserError):
    """The processes of a job would start at different iterations (a checkpoint only some see)."""


def check_same_start(start_iter):
    """Stop every process, with one line, unless all of them start at ``start_iter`` (each
    process reads OUTPUT_DIR/last_checkpoint itself on --resume and restarts)."""
    if comm.get_world_size() == 1:
        return
    starts = comm.all_gather(start_iter)
    if len(set(starts)) > 1:
        by_start = {}
        for rank, start in enumerate(starts):
            by_start.setdefault(start, []).append(rank)
        found = "; ".join(f"iteration {s} on rank(s) {', '.join(map(str, r))}" for s, r in sorted(by_start.items()))
        raise ResumeMismatch(
            f"The processes would resume at different iterations ({found}): not all of them see the same "
            "OUTPUT_DIR/last_checkpoint. With several machines OUTPUT_DIR must be one folder that every machine "
            "sees (a shared file system)"
        )


class ResumableSampler(Sampler):
    def __init__(self, sampler):
        self.sampler = sampler
        self.start = 0  # indices of this rank's stream to skip

    def __iter__(self):
        # Skipping indices is cheap (no image is read); TrainingSampler's stream is a
        # seeded sequence of permutations.
        return itertools.islice(iter(self.sampler), self.start, None)


def capture_rng_state():
    """Python, NumPy and torch (CPU + CUDA) RNG states, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeState(hooks.HookBase):
    """Makes ``--resume`` continue the interrupted run, in every process.

    * The RNG states (Python, NumPy, torch) of every rank are saved in the checkpoint
      (as this hook's state) and restored on the same rank before the first resumed
      step: augmentations and the sampling of anchors / RoIs continue as they would
      have.
    * Each rank's training data stream (a :class:`ResumableSampler`) skips the samples
      that the iterations before the checkpoint consumed.
    * All ranks must start at the same iteration (:func:`check_same_start`): a checkpoint
      that only some ranks see stops the job with one line.

    Register it on every rank, after the LRScheduler hook and right before the
    PeriodicCheckpointer (which exists on rank 0 only); at the checkpointer's
    iterations it gathers the states of all ranks to rank 0.

    Args:
        sampler (ResumableSampler or None): this rank's training sampler.
        images_per_rank (int): images per iteration in each process.
        checkpoint_period (int): the PeriodicCheckpointer's period.
    """

    def __init__(self, sampler, images_per_rank, checkpoint_period):
        self._sampler = sampler
        self._images_per_rank = images_per_rank
        self._period = checkpoint_period
        self._rng, self._rng_iter = None, None  # states of all ranks, captured after iteration _rng_iter
        self._to_restore = None

    def after_step(self):
        it = self.trainer.iter
        # the iterations where fvcore's PeriodicCheckpointer.step saves
        if (it + 1) % self._period == 0 or it >= self.trainer.max_iter - 1:
            state = capture_rng_state()
            self._rng = comm.gather(state) if comm.get_world_size() > 1 else [state]
            self._rng_iter = it

    def state_dict(self):
        if self._rng_iter != self.trainer.iter:  # a save outside the checkpointer's schedule
            if comm.get_world_size() > 1:
                return {}  # the other ranks' states cannot be collected here
            self._rng, self._rng_iter = [capture_rng_state()], self.trainer.iter
        return {"rng": self._rng}

    def load_state_dict(self, state_dict):
        self._to_restore = state_dict.get("rng")

    def before_train(self):
        start = self.trainer.start_iter
        check_same_start(start)
        if self._sampler is not None:
            self._sampler.start = start * self._images_per_rank
        if self._to_restore is not None:
            if len(self._to_restore) == comm.get_world_size():
                restore_rng_state(self._to_restore[comm.get_rank()])
            else:
                logger.warning(
                    "The checkpoint holds the RNG states of %d processes, this run has %d: "
                    "RNGs keep their fresh per-rank seeds",
                    len(self._to_restore),
                    comm.get_world_size(),
                )
            self._to_restore = None
        if start:
            optimizer = self.trainer.optimizer
            lr = optimizer.param_groups[hooks.LRScheduler.get_best_param_group_id(optimizer)]["lr"]
            # every rank logs it (ranks > 0 to OUTPUT_DIR/log.txt.rank<N>)
            logger.info(
                "Rank %d resumes at iteration %d, lr %.10g, after %d samples of its training data stream",
                comm.get_rank(),
                start,
                lr,
                self._sampler.start if self._sampler is not None else -1,
            )


def build_resumable_train_loader(dataset, *, mapper, sampler=None, **kwargs):
    """Detectron2's ``build_detection_train_loader`` (same arguments) whose sampler can
    start part-way through its stream: a :class:`ResumableSampler` around ``sampler``
    (default: Detectron2's TrainingSampler), also returned as the loader's
    ``resumable_sampler`` for :class:`ResumeState`."""
    if sampler is None and not isinstance(dataset, torch.utils.data.IterableDataset):
        sampler = TrainingSampler(len(dataset))
    sampler = ResumableSampler(sampler) if sampler is not None else None
    # The DataLoader draws its workers' base seed when iterated; a private generator
    # (seeded from the already-seeded NumPy RNG) keeps that draw off the global torch
    # RNG, whose state a resumed run restores.
    kwargs.setdefault("seed", int(np.random.randint(2**31)))
    loader = build_detection_train_loader(dataset, mapper=mapper, sampler=sampler, **kwargs)
    loader.resumable_sampler = sampler
    return loader
