"""A training sampler that can start part-way through its index stream.

Detectron2's training samplers are infinite, seeded streams; on ``--resume`` they
start again from the beginning, so a resumed run sees different images than the run
it continues.  ``ResumableSampler`` skips the indices that the iterations before the
checkpoint consumed (``Trainer.resume_or_load`` sets ``start``), so that the images
after a resume are the ones an uninterrupted run would have seen.
"""

import itertools

from torch.utils.data import Sampler

__all__ = ["ResumableSampler"]


class ResumableSampler(Sampler):
    def __init__(self, sampler):
        self.sampler = sampler
        self.start = 0  # indices of this rank's stream to skip

    def __iter__(self):
        # Skipping indices is cheap (no image is read); TrainingSampler's stream is a
        # seeded sequence of permutations.
        return itertools.islice(iter(self.sampler), self.start, None)
