"""Inference-time fast path of the HRNet body: norms folded into convs, fused add/ReLU.

At inference the norms of the body (FrozenBN, or BN/SyncBN in eval mode) are affine
maps, so each ``conv -> norm`` pair is one conv with a bias.  :class:`FoldedHRNet`
holds such folded copies of the weights *outside* the module tree (state dict keys
and checkpoint loading are untouched) and runs the same graph as ``HRNet.forward``:

* on CPU (fp32) every conv goes through oneDNN's fused kernels
  (``torch.ops.mkldnn._convolution_pointwise``) with pre-packed weights, the ReLU
  and the residual / fusion sums as post-ops, so blocks and fusions make no extra
  passes over memory;
* elsewhere (CUDA, autocast) it is ``F.conv2d`` with a bias plus in-place add/ReLU, the
  weights cast to the autocast dtype once and kept (autocast would cast them at every call);
* the fusion sums in place into the branch outputs and adds nearest-upsampled terms
  through broadcasting views instead of materialising the upsampled tensors.

``HRNet`` builds it lazily at the first eval forward without gradients and rebuilds
it whenever any parameter or buffer changed (new weights loaded, an optimizer step,
``.to()``), see :func:`state_key`.
"""
import itertools
from typing import List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import FrozenBatchNorm2d

__all__ = ["FoldedHRNet", "can_fold", "fold_conv_norm", "state_key", "add_upsampled_"]


def _is_foldable_norm(norm) -> bool:
    if isinstance(norm, (FrozenBatchNorm2d, nn.Identity)):
        return True
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        # eval-mode BN (and SyncBN, detectron2's NaiveSyncBN) normalises with its running stats
        return not norm.training and norm.track_running_stats and norm.running_mean is not None
    return False


def can_fold(net) -> bool:
    """True when every norm of ``net`` is an affine map right now (GN/LN never are)."""
    for m in net.modules():
        if next(m.children(), None) is None and not isinstance(m, (nn.Conv2d, nn.ReLU, nn.Identity)):
            if not _is_foldable_norm(m):
                return False
    return True


def state_key(net):
    """Changes whenever a parameter/buffer is replaced, moved or modified in place
    (``load_state_dict``, optimizer steps and ``.to()`` all bump ``_version`` or ``data_ptr``)."""
    return tuple((id(t), t.data_ptr(), t._version) for t in itertools.chain(net.parameters(), net.buffers()))


@torch.no_grad()
def fold_conv_norm(conv: nn.Conv2d, norm: Optional[nn.Module]):
    """(weight, bias) of the single conv equal to ``norm(conv(x))`` at inference."""
    w = conv.weight
    b = conv.bias if conv.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    if norm is None or isinstance(norm, nn.Identity):
        return w.detach().clone(), b.detach().clone()
    if not _is_foldable_norm(norm):
        raise ValueError(f"cannot fold {type(norm).__name__} into a conv (only FrozenBN / eval-mode BN)")
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    bias = norm.bias + (b - norm.running_mean) * scale
    return w * scale.reshape(-1, 1, 1, 1), bias


def _onednn_ok(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")
    )


class FoldedConv:
    """One ``conv -> norm`` pair as a biased conv with optional fused add and ReLU."""

    __slots__ = ("weight", "bias", "stride", "padding", "channels_last", "_packed", "_low")

    def __init__(self, conv, norm=None, channels_last=True):
        assert conv.groups == 1 and conv.dilation == (1, 1), conv
        w, b = fold_conv_norm(conv, norm)
        self.weight = w.contiguous(memory_format=torch.channels_last) if channels_last else w.contiguous()
        self.bias = b.contiguous()
        self.stride = list(conv.stride)
        self.padding = list(conv.padding)
        self.channels_last = channels_last
        self._packed = None
        self._low = {}  # autocast dtype -> (weight, bias) cast once, not at every call

    def _onednn_weight(self, x):
        if self._packed is None:
            try:
                self._packed = torch.ops.mkldnn._reorder_convolution_weight(
                    self.weight, self.padding, self.stride, [1, 1], 1, list(x.shape)
                )
            except RuntimeError:  # very old oneDNN: dense weights work too, just slower
                self._packed = self.weight
        return self._packed

    def __call__(self, x, relu=False, add_to=None):
        """``relu(conv(x) + bias [+ add_to])``; the sum is written into ``add_to``."""
        if self.channels_last and _onednn_ok(x) and (add_to is None or add_to.dtype == torch.float32):
            x = x.contiguous(memory_format=torch.channels_last)
            w = self._onednn_weight(x)
            args = (w, self.bias, self.padding, self.stride, [1, 1], 1)
            if add_to is None:
                return torch.ops.mkldnn._convolution_pointwise(x, *args, "relu" if relu else "none", [], "")
            if add_to.is_contiguous(memory_format=torch.channels_last):
                return torch.ops.mkldnn._convolution_pointwise_(
                    add_to, x, *args, "add", 1.0, "relu" if relu else None, [], None
                )
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            if dtype not in self._low:
                self._low[dtype] = (weight.to(dtype), bias.to(dtype))
            weight, bias = self._low[dtype]
        y = F.conv2d(x, weight, bias, self.stride, self.padding)
        if add_to is not None:
            y = add_to.add_(y)
        return y.relu_() if relu else y


def add_upsampled_(acc: torch.Tensor, z: torch.Tensor, mode: str) -> torch.Tensor:
    """``acc += upsample(z)`` without materialising the upsampled tensor when the
    nearest-neighbour factor is an exact integer (then identical to ``F.interpolate``)."""
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
    from .hrnet import upsample_to

    return acc.add_(upsample_to(z, acc, mode))


def _fold_seq(seq, channels_last):
    """A Sequential of [conv, norm, (ReLU)] triples -> list of (FoldedConv, relu)."""
    if isinstance(seq, nn.Identity):
        return None
    out = []
    for step in seq:
        if isinstance(step, nn.Sequential) and isinstance(step[0], nn.Conv2d):
            out.append((FoldedConv(step[0], step[1], channels_last), len(step) > 2))
    if not out and isinstance(seq[0], nn.Conv2d):
        out.append((FoldedConv(seq[0], seq[1], channels_last), len(seq) > 2))
    return out


def _run_seq(steps, x, add_to=None, last_relu=None):
    for k, (conv, relu) in enumerate(steps):
        last = k == len(steps) - 1
        x = conv(x, relu=relu if not last or last_relu is None else last_relu, add_to=add_to if last else None)
    return x


def _fold_block(block, channels_last):
    names = [n for n in ("conv1", "conv2", "conv3") if hasattr(block, n)]
    convs = [FoldedConv(getattr(block, n), getattr(block, "bn" + n[-1]), channels_last) for n in names]
    down = block.downsample
    down = None if down is None else FoldedConv(down[0], down[1], channels_last)
    return convs, down


def _run_block(folded, x):
    convs, down = folded
    # the block input is dead after the block, so the residual sum may overwrite it
    shortcut = x if down is None else down(x)
    h = x
    for conv in convs[:-1]:
        h = conv(h, relu=True)
    return convs[-1](h, relu=True, add_to=shortcut)


class _FoldedModule:
    def __init__(self, module, channels_last):
        self.branches = [[_fold_block(b, channels_last) for b in branch] for branch in module.branches]
        self.upsample_mode = module.upsample_mode
        self.fuse = None
        if module.fuse_layers is not None:
            self.fuse = []
            for i, row in enumerate(module.fuse_layers):
                folded_row = []
                for j, layer in enumerate(row):
                    if j == i:
                        folded_row.append(None)
                    elif j > i:
                        folded_row.append(FoldedConv(layer[0], layer[1], channels_last))
                    else:
                        folded_row.append(_fold_seq(layer, channels_last))
                self.fuse.append(folded_row)

    def __call__(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        out = []
        for branch, x in zip(self.branches, xs):
            for block in branch:
                x = _run_block(block, x)
            out.append(x)
        xs = out
        if self.fuse is None:
            return xs
        n = len(xs)
        # all 1x1 terms first: afterwards every branch output is only read by rows
        # below it, so rows processed bottom-up may accumulate into their own branch
        lateral = {(i, j): self.fuse[i][j](xs[j]) for i in range(n) for j in range(i + 1, n)}
        for i in reversed(range(n)):
            acc = xs[i]
            for j in range(i + 1, n):
                add_upsampled_(acc, lateral.pop((i, j)), self.upsample_mode)
            if i == 0:
                acc.relu_()
            for j in range(i):
                acc = _run_seq(self.fuse[i][j], xs[j], add_to=acc, last_relu=j == i - 1)
            xs[i] = acc
        return xs


class FoldedHRNet:
    """Frozen, folded copy of an :class:`HRNet` body for inference (not an nn.Module:
    its tensors never appear in ``state_dict()``)."""

    def __init__(self, net, channels_last=True):
        cl = channels_last
        self.channels_last = cl
        self.stem = [FoldedConv(net.conv1, net.bn1, cl), FoldedConv(net.conv2, net.bn2, cl)]
        self.layer1 = [_fold_block(b, cl) for b in net.layer1]
        self.transitions = []
        self.stages = []
        for k in range(1, net.num_stages):
            self.transitions.append([_fold_seq(t, cl) for t in getattr(net, f"transition{k}")])
            self.stages.append([_FoldedModule(m, cl) for m in getattr(net, f"stage{k + 1}")])

    def __call__(self, x) -> List[torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem[1](self.stem[0](x, relu=True), relu=True)
        for block in self.layer1:
            x = _run_block(block, x)
        xs = [x]
        for transition, stage in zip(self.transitions, self.stages):
            xs = [
                xs[i] if t is None else _run_seq(t, xs[i] if i < len(xs) else xs[-1])
                for i, t in enumerate(transition)
            ]
            for module in stage:
                xs = module(xs)
        return xs
