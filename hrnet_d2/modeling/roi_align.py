"""ROIAlign on several CPU threads at inference, with the plain kernel's results bit for bit.

torchvision's CPU ``roi_align`` runs one thread whatever ``torch.get_num_threads()`` says, and
copies a channels_last input (our pyramid's outputs at inference) to NCHW on every call.  Each
region's output depends on that region alone, so :class:`ParallelROIAlign` converts the input
once, splits the regions into ``torch.get_num_threads()`` consecutive chunks of about equal work
(with ``sampling_ratio`` 0 a region samples ``ceil(h / output_h) * ceil(w / output_w)`` points per
output bin) and runs the same kernel on each chunk in a thread (the op releases the GIL); the
outputs are concatenated in order.  Training, autograd, tracing, scripting, GPUs and a single
thread take the plain path.  :func:`parallel_roi_align` puts it into every ``ROIPooler`` of a model
(Detectron2 builds them from a pooler-type string, so they cannot be chosen by config); it is
applied where :func:`~hrnet_d2.modeling.inference_autocast.autocast_heads` is
(``Trainer.build_model``, ``demo.py``, the tools).
"""

from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from detectron2.layers import ROIAlign
from detectron2.modeling.poolers import ROIPooler

__all__ = ["ParallelROIAlign", "parallel_roi_align"]

# regions below this count per thread are not worth a thread hand-off (~50 us)
MIN_ROIS_PER_THREAD = 16

_POOL = {"workers": 0, "executor": None}


def _executor(workers: int) -> ThreadPoolExecutor:
    if _POOL["workers"] != workers:
        if _POOL["executor"] is not None:
            _POOL["executor"].shutdown(wait=False)
        _POOL.update(workers=workers, executor=ThreadPoolExecutor(workers, thread_name_prefix="roi_align"))
    return _POOL["executor"]


def _chunk_bounds(rois: torch.Tensor, parts: int, output_size, spatial_scale: float, sampling_ratio: int):
    """Split points of ``rois`` into ``parts`` consecutive chunks of about equal sampling work."""
    if sampling_ratio > 0:
        work = torch.ones(len(rois), dtype=torch.float64)
    else:
        wh = ((rois[:, 3:5] - rois[:, 1:3]) * spatial_scale).double()
        out = torch.tensor(output_size, dtype=torch.float64).flip(0)  # (w, h)
        work = torch.ceil(wh.clamp(min=1.0) / out).prod(dim=1)
    cum = work.cumsum(0)
    targets = cum[-1] * torch.arange(1, parts, dtype=torch.float64) / parts
    cuts = torch.searchsorted(cum, targets).tolist()
    bounds = [0, *cuts, len(rois)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


class ParallelROIAlign(ROIAlign):
    """Detectron2's :class:`~detectron2.layers.ROIAlign` that runs the regions of one call on all of
    torch's CPU threads at inference (see the module doc); the same outputs bit for bit."""

    def __init__(self, output_size, spatial_scale, sampling_ratio, aligned=True):
        """
        Args:
            output_size, spatial_scale, sampling_ratio, aligned: as Detectron2's ``ROIAlign``.
        """
        super().__init__(output_size, spatial_scale, sampling_ratio, aligned)

    @classmethod
    def from_roi_align(cls, module: ROIAlign) -> "ParallelROIAlign":
        return cls(module.output_size, module.spatial_scale, module.sampling_ratio, module.aligned)

    def forward(self, input, rois):
        threads = torch.get_num_threads()
        if (
            threads < 2
            or input.device.type != "cpu"
            or len(rois) < 2 * MIN_ROIS_PER_THREAD
            or (torch.is_grad_enabled() and (input.requires_grad or rois.requires_grad))
            or torch.jit.is_scripting()
            or torch.jit.is_tracing()
            or input.is_quantized
        ):
            return super().forward(input, rois)
        assert rois.dim() == 2 and rois.size(1) == 5
        input = input.contiguous()  # once, not once per chunk (the kernel needs NCHW)
        rois = rois.to(dtype=input.dtype)
        parts = min(threads, len(rois) // MIN_ROIS_PER_THREAD)
        size = self.output_size if isinstance(self.output_size, (tuple, list)) else (self.output_size,) * 2
        bounds = _chunk_bounds(rois, parts, tuple(size), self.spatial_scale, self.sampling_ratio)
        plain = super().forward
        outputs = list(_executor(threads).map(lambda ab: plain(input, rois[ab[0] : ab[1]]), bounds))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


def parallel_roi_align(model: nn.Module, enabled: bool = True):
    """Put :class:`ParallelROIAlign` into every ``ROIPooler`` of ``model`` (``enabled`` False puts the plain
    ``ROIAlign`` back).  Returns the names of the poolers changed.  No parameters or buffers change."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, ROIPooler):
            continue
        for i, level in enumerate(module.level_poolers):
            if type(level) is ROIAlign and enabled:
                module.level_poolers[i] = ParallelROIAlign.from_roi_align(level)
            elif type(level) is ParallelROIAlign and not enabled:
                module.level_poolers[i] = ROIAlign(
                    level.output_size, level.spatial_scale, level.sampling_ratio, level.aligned
                )
            else:
                continue
            if not names or names[-1] != name:
                names.append(name)
    return names
