"""Folding ``conv -> norm`` pairs: the inference and training fast paths.

Pieces each module uses on itself: at
inference the norms of the body (FrozenBN, or BN/SyncBN in eval mode) are affine maps,
so each ``conv -> norm`` pair is one conv with a bias.  A module whose children are
such pairs (:class:`ConvNorm`, the residual blocks, the stem) mixes in
:class:`FoldsConvNorms`: ``folded()`` gives a :class:`FoldedConv` per pair, held outside
the module tree (state dict keys and checkpoint loading are untouched), and each module
has a ``forward_fused`` that runs its own graph on them:

* on CPU (fp32, channels_last input) every conv goes through oneDNN's fused kernels
  (``torch.ops.mkldnn._convolution_pointwise``) with pre-packed weights, the ReLU and the
  residual / fusion sums as post-ops, so blocks and fusions make no extra passes over memory;
* elsewhere (CUDA, autocast, NCHW) it is ``F.conv2d`` with a bias plus in-place add/ReLU,
  the weights cast to the autocast dtype and laid out as the input once and kept;
* the fusion adds nearest-upsampled terms through broadcasting views instead of
  materialising the upsampled tensors (:func:`add_upsampled_`).

A pair is folded again whenever one of its tensors changed since it was folded: a new
checkpoint, an optimizer step, an EMA swap (in-place copies) or ``.to()`` (new storage).
Training mode drops the folded copies.

Training (and any forward with gradients) folds too, when every norm is an affine map with
frozen statistics (FrozenBN, BNEval; not BN/SyncBN in training, which normalise with batch
statistics): ``folded()`` then gives a :class:`TrainFoldedConv` per pair, whose weight
``conv.weight * scale`` and bias are computed inside autograd at every call, so the
gradients reach ``conv.weight`` and the norm's trainable ``weight``/``bias`` (BNEval) as
through the plain graph, while the norm's passes over the activations (forward and
backward) vanish into the conv's bias.  Its add/ReLU run on the conv's own output (never on a tensor
autograd saved), and each fusion sum starts as a new tensor.
"""

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import FrozenBatchNorm2d

__all__ = [
    "is_foldable_norm",
    "all_norms_foldable",
    "conv_norm_affine",
    "fold_conv_norm",
    "FoldedConv",
    "TrainFoldedConv",
    "FoldsConvNorms",
]


def is_foldable_norm(norm) -> bool:
    """True when ``norm`` is an affine map right now (FrozenBN; BN/SyncBN in eval mode)."""
    if isinstance(norm, FrozenBatchNorm2d):
        return True
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        # eval-mode BN (and SyncBN, detectron2's NaiveSyncBN) normalises with its running stats
        return not norm.training and norm.track_running_stats and norm.running_mean is not None
    return False


def all_norms_foldable(module) -> bool:
    """True when every norm inside ``module`` is an affine map right now (GN/LN never are)."""
    for m in module.modules():
        if next(m.children(), None) is None and not isinstance(m, (nn.Conv2d, nn.ReLU, nn.Identity)):
            if not is_foldable_norm(m):
                return False
    return True


def conv_norm_affine(conv: nn.Conv2d, norm: nn.Module):
    """(weight, bias) of the single conv equal to ``norm(conv(x))`` while ``norm`` is an
    affine map, computed with whatever autograd records (differentiable in ``conv.weight``,
    ``conv.bias`` and the norm's ``weight``/``bias``; the statistics are constants)."""
    if not is_foldable_norm(norm):
        raise ValueError(f"cannot fold {type(norm).__name__} into a conv (only FrozenBN / eval-mode BN / BNEval)")
    w = conv.weight
    scale = (norm.running_var + norm.eps).rsqrt()
    if norm.weight is not None:
        scale = norm.weight * scale
    shift = -norm.running_mean if conv.bias is None else conv.bias - norm.running_mean
    bias = shift * scale if norm.bias is None else norm.bias + shift * scale
    return w * scale.reshape(-1, 1, 1, 1), bias


@torch.no_grad()
def fold_conv_norm(conv: nn.Conv2d, norm: nn.Module):
    """(weight, bias) of the single conv equal to ``norm(conv(x))`` at inference (constants)."""
    return conv_norm_affine(conv, norm)


def _onednn_ok(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")
        and x.is_contiguous(memory_format=torch.channels_last)
    )


class FoldedConv:
    """One ``conv -> norm`` pair as a biased conv with optional fused add and ReLU (not an
    ``nn.Module``: its tensors never appear in ``state_dict()``)."""

    __slots__ = ("weight", "bias", "stride", "padding", "_packed", "_cast")

    def __init__(self, conv: nn.Conv2d, norm: nn.Module):
        assert conv.groups == 1 and conv.dilation == (1, 1), conv
        w, b = fold_conv_norm(conv, norm)
        self.weight = w.contiguous()
        self.bias = b.contiguous()
        self.stride = list(conv.stride)
        self.padding = list(conv.padding)
        self._packed: Optional[torch.Tensor] = None
        # (dtype, channels_last) -> (weight, bias), made once, not at every call
        self._cast: Dict[Tuple[torch.dtype, bool], Tuple[torch.Tensor, torch.Tensor]] = {}

    def weights_for(self, x: torch.Tensor):
        """(weight, bias) in ``x``'s dtype (autocast's when on) and memory format."""
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        key = (dtype, channels_last)
        if key not in self._cast:
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            self._cast[key] = (self.weight.to(dtype).contiguous(memory_format=fmt), self.bias.to(dtype))
        return self._cast[key]

    def _onednn_weight(self, x):
        if self._packed is None:
            w = self.weights_for(x)[0]
            try:
                self._packed = torch.ops.mkldnn._reorder_convolution_weight(
                    w, self.padding, self.stride, [1, 1], 1, list(x.shape)
                )
            except RuntimeError:  # very old oneDNN: dense weights work too, just slower
                self._packed = w
        return self._packed

    def __call__(self, x, relu=False, add_to=None):
        """``relu(conv(x) + bias [+ add_to])``; the sum is written into ``add_to``."""
        if _onednn_ok(x) and (add_to is None or add_to.dtype == torch.float32):
            args = (self._onednn_weight(x), self.bias, self.padding, self.stride, [1, 1], 1)
            if add_to is None:
                return torch.ops.mkldnn._convolution_pointwise(x, *args, "relu" if relu else "none", [], "")
            if add_to.is_contiguous(memory_format=torch.channels_last):
                return torch.ops.mkldnn._convolution_pointwise_(
                    add_to, x, *args, "add", 1.0, "relu" if relu else None, [], None
                )
        weight, bias = self.weights_for(x)
        y = F.conv2d(x, weight, bias, self.stride, self.padding)
        if add_to is not None:
            y = add_to.add_(y)
        return y.relu_() if relu else y


class TrainFoldedConv:
    """One ``conv -> norm`` pair as one biased conv folded inside autograd at every call
    (training: gradients flow to the conv and to the norm's affine terms; see the module
    docstring).  Same call as :class:`FoldedConv`, but ``add_to`` is never written: the sum
    and the ReLU are done in place on the conv's fresh output, which autograd does not keep."""

    __slots__ = ("conv", "norm")

    def __init__(self, conv: nn.Conv2d, norm: nn.Module):
        assert conv.groups == 1 and conv.dilation == (1, 1), conv
        self.conv = conv
        self.norm = norm

    def __call__(self, x, relu=False, add_to=None):
        """``relu(conv(x) + bias [+ add_to])``, a new tensor."""
        weight, bias = conv_norm_affine(self.conv, self.norm)
        y = F.conv2d(x, weight, bias, self.conv.stride, self.conv.padding)
        if add_to is not None:
            y = y.add_(add_to)
        return y.relu_() if relu else y


def _source_key(conv, norm):
    """Changes whenever one of the pair's tensors is replaced, moved or modified in place
    (``load_state_dict``, optimizer steps, EMA swaps and ``.to()`` bump ``_version`` or ``data_ptr``)."""
    tensors = (conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var)
    return tuple((id(t), t.data_ptr(), t._version) for t in tensors if t is not None)


class FoldsConvNorms:
    """Mixin for an ``nn.Module`` made of ``conv -> norm`` pairs (listed by ``conv_norm_pairs``):
    ``folded()`` gives one :class:`FoldedConv` per pair, kept on the module outside its
    state dict, folded again when a tensor of the pair changed, dropped in training mode;
    with gradients enabled, one :class:`TrainFoldedConv` per pair instead (nothing kept)."""

    def conv_norm_pairs(self) -> List[Tuple[nn.Conv2d, nn.Module]]:
        raise NotImplementedError

    def folded(self) -> List[FoldedConv]:
        pairs = self.conv_norm_pairs()
        if torch.is_grad_enabled():
            return [TrainFoldedConv(conv, norm) for conv, norm in pairs]
        key = tuple(_source_key(conv, norm) for conv, norm in pairs)
        cache = self.__dict__.get("_folded")
        if cache is None or cache[0] != key:
            self.__dict__["_folded"] = None  # free the old copy first
            cache = (key, [FoldedConv(conv, norm) for conv, norm in pairs])
            self.__dict__["_folded"] = cache
        return cache[1]

    def train(self, mode=True):
        if mode:
            self.__dict__.pop("_folded", None)
        return super().train(mode)

    def __getstate__(self):
        # pickling / deepcopy: the folded copy (and its oneDNN-packed weights) is derived data
        state = self.__dict__.copy()
        state.pop("_folded", None)
        return state
