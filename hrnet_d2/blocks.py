"""Residual blocks of HRNet.

Module names (conv1/bn1/.../downsample.0/downsample.1) are those of the official
HRNet ImageNet checkpoints, so the weights load without any key mapping.  The norm
comes from Detectron2's ``get_norm`` so FrozenBN/BN/SyncBN/GN all work.
"""
from torch import nn
from torch.nn import functional as F

from detectron2.layers import get_norm

__all__ = ["BasicBlock", "Bottleneck", "BLOCKS", "conv3x3"]


def conv3x3(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _downsample(in_channels, out_channels, stride, norm):
    """Projection shortcut, or ``None`` when the identity already fits."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        get_norm(norm, out_channels),
    )


class BasicBlock(nn.Module):
    expansion = 1

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


class Bottleneck(nn.Module):
    expansion = 4

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
