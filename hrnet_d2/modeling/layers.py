"""Layer helpers shared by the HRNet body (``blocks.py``, ``hrnet.py``) and the pyramid:
norms (Detectron2's ``get_norm`` plus BNEval), ``conv -> norm [-> ReLU]`` with the official
child names, size-based upsampling, and the activation-checkpoint helpers.  The folding of
``conv -> norm`` pairs (the inference and training fast paths) is in ``fold.py``.
"""

import contextlib
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import get_norm as d2_get_norm

from .fold import FoldsConvNorms

__all__ = [
    "EvalBatchNorm2d",
    "NORMS",
    "get_norm",
    "conv3x3",
    "upsample_to",
    "add_upsampled_",
    "exporting",
    "checkpointing",
    "recompute_context",
    "ConvNorm",
    "ConvNormChain",
]


class EvalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose statistics never move: it normalises with its running statistics in
    training too, while ``weight`` and ``bias`` stay trainable parameters (so the optimizer,
    with SOLVER.WEIGHT_DECAY_NORM, decays them like any norm parameter).  This is the norm of
    the published HRNet detectors: mmdetection's ``norm_eval=True`` with ``requires_grad=True``.
    MODEL.HRNET.NORM "BNEval"; the state dict is BatchNorm2d's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.training = False  # from the start, not only after the first .train()/.eval()

    def train(self, mode=True):
        return super().train(False)


# MODEL.*.NORM names hrnet_d2 adds to Detectron2's ``get_norm``
NORMS = {"BNEval": EvalBatchNorm2d}


def get_norm(norm, out_channels):
    """Detectron2's ``get_norm`` (BN, SyncBN, FrozenBN, GN, ...), plus the names in :data:`NORMS`."""
    if isinstance(norm, str) and norm in NORMS:
        norm = NORMS[norm]
    return d2_get_norm(norm, out_channels)


def conv3x3(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def upsample_to(x: torch.Tensor, reference: torch.Tensor, mode: str) -> torch.Tensor:
    """Resize ``x`` to ``reference``'s spatial size.

    Size-based (not scale-factor based) so odd input sizes work; for the exact 2**k
    ratios of a padded input it equals the official ``nn.Upsample(scale_factor)``.
    """
    size = reference.shape[-2:]
    if x.shape[-2:] == size:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def add_upsampled_(acc: torch.Tensor, z: torch.Tensor, mode: str) -> torch.Tensor:
    """``acc += upsample_to(z, acc, mode)`` without materialising the upsampled tensor when
    the nearest-neighbour factor is an exact integer (then identical to ``F.interpolate``)."""
    (n, c, h, w), (hz, wz) = acc.shape, z.shape[-2:]
    if mode == "nearest" and h % hz == 0 and w % wz == 0 and h // hz == w // wz:
        s = h // hz
        if acc.is_contiguous(memory_format=torch.channels_last):
            a = acc.permute(0, 2, 3, 1).view(n, hz, s, wz, s, c)
            a.add_(z.permute(0, 2, 3, 1)[:, :, None, :, None, :])
            return acc
        if acc.is_contiguous():
            acc.view(n, c, hz, s, wz, s).add_(z[:, :, :, None, :, None])
            return acc
    return acc.add_(upsample_to(z, acc, mode))


def exporting() -> bool:
    """Export / compilation record the plain module graph (oneDNN fused ops do not export)."""
    return (
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.compiler.is_compiling()
        or torch.onnx.is_in_onnx_export()
    )


def checkpointing(module) -> bool:
    """MODEL.HRNET.ACTIVATION_CHECKPOINT applies now: on, training, and gradients wanted."""
    return module.activation_checkpoint and module.training and torch.is_grad_enabled()


def recompute_context(module):
    """``context_fn`` for torch.utils.checkpoint: the recomputation in backward must not
    update BN running statistics a second time (momentum 0 and the batch counter
    restored), so checkpointing changes neither outputs nor gradients nor buffers."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]

    @contextlib.contextmanager
    def keep_running_stats():
        saved = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in bns]
        for m in bns:
            m.momentum = 0.0
        try:
            yield
        finally:
            for m, momentum, count in saved:
                m.momentum = momentum
                if count is not None:
                    m.num_batches_tracked.copy_(count)

    return lambda: (contextlib.nullcontext(), keep_running_stats())


class ConvNorm(FoldsConvNorms, nn.Sequential):
    """``conv -> norm [-> ReLU]``, children ``0``, ``1`` [, ``2``] as in the official
    HRNet (``fuse_layers``, ``transition*``, ``downsample``): the state dict keys are theirs.

    Args:
        in_channels (int): input channels.
        out_channels (int): output channels.
        kernel_size (int): 1 or 3 (padding keeps the size at stride 1).
        stride (int): stride of the conv.
        norm (str): a ``layers.get_norm`` name (Detectron2's names and BNEval) (FrozenBN, BN, SyncBN, GN, ...).
        relu (bool): end with a ReLU.
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, norm="BN", relu=False):
        layers = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
            get_norm(norm, out_channels),
        ]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)
        self.relu = relu

    def conv_norm_pairs(self):
        return [(self[0], self[1])]

    def forward_fused(self, x, add_to: Optional[torch.Tensor] = None, relu: Optional[bool] = None):
        """The folded conv; ``add_to`` (written in place) is added before the ReLU, and
        ``relu`` overrides the module's own (a ReLU after a sum)."""
        return self.folded()[0](x, relu=self.relu if relu is None else relu, add_to=add_to)


class ConvNormChain(nn.Sequential):
    """A chain of :class:`ConvNorm` (stride-2 steps to a lower resolution), children ``0``, ``1``, ..."""

    def forward_fused(self, x, add_to: Optional[torch.Tensor] = None, relu: Optional[bool] = None):
        last = len(self) - 1
        for k, step in enumerate(self):
            x = step.forward_fused(x, add_to=add_to, relu=relu) if k == last else step.forward_fused(x)
        return x
