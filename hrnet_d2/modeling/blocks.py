"""Residual blocks of HRNet.

Module names (conv1/bn1/.../downsample.0/downsample.1) are those of the official
HRNet ImageNet checkpoints, so the weights load without any key mapping.  The norm
comes from ``layers.get_norm`` (Detectron2's plus BNEval) so FrozenBN/BN/SyncBN/GN/BNEval all work.
"""

from torch import nn
from torch.nn import functional as F

from .fold import FoldsConvNorms
from .layers import ConvNorm, conv3x3, get_norm

__all__ = ["BasicBlock", "Bottleneck", "BLOCKS"]


def _downsample(in_channels, out_channels, stride, norm):
    """Projection shortcut, or ``None`` when the identity already fits."""
    if stride == 1 and in_channels == out_channels:
        return None
    return ConvNorm(in_channels, out_channels, 1, stride=stride, norm=norm)


class _ResidualBlock(FoldsConvNorms, nn.Module):
    """``conv{k} -> bn{k}`` pairs with ReLUs, the last one's ReLU after the shortcut sum."""

    num_convs = 0

    def conv_norm_pairs(self):
        return [(getattr(self, f"conv{k}"), getattr(self, f"bn{k}")) for k in range(1, self.num_convs + 1)]

    def forward_fused(self, x):
        """Inference on folded weights; the block input is dead afterwards, so the residual
        sum may overwrite it."""
        convs = self.folded()
        shortcut = x if self.downsample is None else self.downsample.forward_fused(x)
        h = x
        for conv in convs[:-1]:
            h = conv(h, relu=True)
        return convs[-1](h, relu=True, add_to=shortcut)


class BasicBlock(_ResidualBlock):
    """Two 3x3 convs (ResNet's basic block).

    Args:
        in_channels (int): input channels.
        channels (int): width of the block (= output channels, ``expansion`` 1).
        stride (int): stride of the first conv (and of the projection shortcut).
        norm (str): a ``layers.get_norm`` name (Detectron2's names and BNEval).
    """

    expansion = 1
    num_convs = 2

    def __init__(self, in_channels, channels, stride=1, norm="BN"):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn1 = get_norm(norm, channels)
        self.conv2 = conv3x3(channels, out_channels)
        self.bn2 = get_norm(norm, out_channels)
        self.downsample = _downsample(in_channels, out_channels, stride, norm)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu_(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu_(out.add_(shortcut))


class Bottleneck(_ResidualBlock):
    """1x1 -> 3x3 -> 1x1 convs (ResNet's bottleneck, stride on the 3x3).

    Args:
        in_channels (int): input channels.
        channels (int): width of the 3x3 conv; the output has ``4 * channels``.
        stride (int): stride of the 3x3 conv (and of the projection shortcut).
        norm (str): a ``layers.get_norm`` name (Detectron2's names and BNEval).
    """

    expansion = 4
    num_convs = 3

    def __init__(self, in_channels, channels, stride=1, norm="BN"):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = get_norm(norm, channels)
        self.conv2 = conv3x3(channels, channels, stride)
        self.bn2 = get_norm(norm, channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = get_norm(norm, out_channels)
        self.downsample = _downsample(in_channels, out_channels, stride, norm)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu_(self.bn1(self.conv1(x)))
        out = F.relu_(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu_(out.add_(shortcut))


BLOCKS = {"BASIC": BasicBlock, "BOTTLENECK": Bottleneck}
