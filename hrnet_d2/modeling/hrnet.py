"""The HRNet body as a Detectron2 ``Backbone``.

Attribute names (conv1, bn1, conv2, bn2, layer1, transition{1,2,3}, stage{2,3,4},
branches, fuse_layers) are the official ones: the official HRNet ImageNet
checkpoints and timm's ``hrnet_*`` state dicts load with no key mapping once the
classification head (incre_modules, downsamp_modules, final_layer, classifier) is
dropped.

Outputs: branch ``i`` (0-based) is named ``hr{i+2}`` and has stride ``4 * 2**i``
(``hr2`` = stride 4, as ``res2`` in Detectron2's ResNet).  ``hr2`` alone is
HRNetV1; ``hrv2`` is the HRNetV2 representation (all branches upsampled to stride 4
and concatenated).

Everything ``forward`` runs is TorchScript-scriptable (``torch.jit.script``, Detectron2's
``scripting_with_instances``); the eager-only speed paths (folded inference, activation
checkpointing) are ``@torch.jit.unused`` and scripting falls back to the plain graph.
"""

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, Backbone

from ..utils.errors import ArgumentValueError, feature_names_problem
from .arch import ARCHITECTURES, StageSpec
from .blocks import BLOCKS
from .fold import FoldsConvNorms, all_norms_foldable
from .layers import (
    ConvNorm,
    ConvNormChain,
    add_upsampled_,
    checkpointing,
    conv3x3,
    exporting,
    get_norm,
    recompute_context,
    upsample_to,
)

__all__ = [
    "HighResolutionModule",
    "HRNet",
    "HRStage",
    "Transition",
    "branch_name",
    "HRV2_NAME",
    "build_hrnet_backbone",
    "stage_specs_from_cfg",
]

HRV2_NAME = "hrv2"  # spelled out in HRNet.forward too (TorchScript takes no str globals)


def branch_name(index: int) -> str:
    return f"hr{index + 2}"


class HighResolutionModule(nn.Module):
    """Parallel branches followed by an all-to-all multi-resolution fusion.

    Args:
        in_channels (Sequence[int]): channels of each input branch (highest resolution first).
        spec (StageSpec): the stage this module belongs to (block type, blocks and
            channels per branch).
        norm (str): a ``layers.get_norm`` name (Detectron2's names and BNEval) for every norm of the module.
        upsample_mode (str): "nearest" or "bilinear", how lower-resolution branches are
            upsampled in the fusion (MODEL.HRNET.FUSE_UPSAMPLE_MODE).
    """

    def __init__(self, in_channels: Sequence[int], spec: StageSpec, norm, upsample_mode):
        super().__init__()
        block = BLOCKS[spec.block]
        self.upsample_mode = upsample_mode
        branches = []
        out_channels = []
        for cin, n, c in zip(in_channels, spec.num_blocks, spec.num_channels):
            layers = [block(cin, c, norm=norm)]
            layers += [block(c * block.expansion, c, norm=norm) for _ in range(1, n)]
            branches.append(nn.Sequential(*layers))
            out_channels.append(c * block.expansion)
        self.branches = nn.ModuleList(branches)
        self.out_channels = out_channels
        self.fuse_layers = self._make_fuse_layers(out_channels, norm) if len(branches) > 1 else None

    @staticmethod
    def _make_fuse_layers(channels, norm):
        """fuse_layers[i][j] maps branch j to branch i: 1x1 conv + norm when j > i
        (upsampled in forward), a chain of strided 3x3 conv + norm (ReLU between)
        when j < i, and nothing when i == j."""
        fuse_layers = nn.ModuleList()
        for i, ci in enumerate(channels):
            row = nn.ModuleList()
            for j, cj in enumerate(channels):
                if j > i:
                    row.append(ConvNorm(cj, ci, 1, norm=norm))
                elif j == i:
                    row.append(nn.Identity())
                else:
                    steps = i - j
                    row.append(
                        ConvNormChain(
                            *[
                                ConvNorm(cj, ci if k == steps - 1 else cj, 3, 2, norm, relu=k < steps - 1)
                                for k in range(steps)
                            ]
                        )
                    )
            fuse_layers.append(row)
        return fuse_layers

    def forward(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        ys: List[torch.Tensor] = []
        for i, branch in enumerate(self.branches):
            ys.append(branch(xs[i]))
        if self.fuse_layers is None:
            return ys
        else:
            return self._fuse(ys)

    def _fuse(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        out: List[torch.Tensor] = []
        for i, row in enumerate(self.fuse_layers):
            y: Optional[torch.Tensor] = None
            owned = False  # the first term may alias a branch output still needed by other rows
            for j, layer in enumerate(row):
                if j == i:
                    z = xs[j]
                elif j > i:
                    z = upsample_to(layer(xs[j]), xs[i], self.upsample_mode)
                else:
                    z = layer(xs[j])
                if y is None:
                    y = z
                    owned = j != i
                elif owned:
                    y = y.add_(z)
                else:
                    y = y + z
                    owned = True
            assert y is not None
            out.append(F.relu_(y))
        return out

    def forward_fused(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        """``forward`` on folded weights; at inference the sums are accumulated in place
        (upsampled terms through broadcasting views), with gradients (training) a row's first
        sum is a new tensor (autograd keeps the branch outputs: they are inputs of convs)."""
        out = []
        for branch, x in zip(self.branches, xs):
            for block in branch:
                x = block.forward_fused(x)
            out.append(x)
        xs = out
        if self.fuse_layers is None:
            return xs
        n = len(xs)
        # all 1x1 terms first: afterwards every branch output is only read by rows
        # below it, so rows processed bottom-up may accumulate into their own branch
        lateral = {(i, j): self.fuse_layers[i][j].forward_fused(xs[j]) for i in range(n) for j in range(i + 1, n)}
        owns_inputs = not torch.is_grad_enabled()
        for i in reversed(range(n)):
            acc = xs[i]
            owned = owns_inputs
            for j in range(i + 1, n):
                z = lateral.pop((i, j))
                if owns_inputs:
                    add_upsampled_(acc, z, self.upsample_mode)
                else:  # upsampled as in forward: its backward is cheaper than a broadcast sum's
                    z = upsample_to(z, acc, self.upsample_mode)
                    acc = acc.add_(z) if owned else acc + z
                    owned = True
            if i == 0:
                acc = acc.relu_() if owned else acc.relu()
            for j in range(i):  # the last term's conv also applies the ReLU of the sum
                acc = self.fuse_layers[i][j].forward_fused(xs[j], add_to=acc, relu=j == i - 1)
            xs[i] = acc
        return xs


class Transition(nn.ModuleList):
    """transition{k}: entry ``i`` makes branch ``i`` of the next stage (``nn.Identity`` when
    an existing branch keeps its width; new branches start from the lowest-resolution one)."""

    def forward(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        n = len(xs)
        out: List[torch.Tensor] = []
        for i, layer in enumerate(self):
            out.append(layer(xs[i] if i < n else xs[n - 1]))
        return out

    def forward_fused(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        n = len(xs)
        return [
            layer(xs[i]) if isinstance(layer, nn.Identity) else layer.forward_fused(xs[i] if i < n else xs[n - 1])
            for i, layer in enumerate(self)
        ]


class HRStage(nn.Sequential):
    """stage{k}: a chain of :class:`HighResolutionModule` (a Sequential over lists of branches)."""

    def forward(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        for module in self:
            xs = module(xs)
        return xs

    def forward_fused(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        for module in self:
            xs = module.forward_fused(xs)
        return xs


class HRNet(FoldsConvNorms, Backbone):
    """HRNet body: a stride-4 stem, then 4 stages that add one lower-resolution branch each.

    Args:
        stages (Sequence[StageSpec]): the four stages, e.g. ``ARCHITECTURES["w32"]``.
        norm (str): a ``layers.get_norm`` name (Detectron2's names and BNEval) for every norm of the body (FrozenBN,
            BN, SyncBN, GN, ...; MODEL.HRNET.NORM).
        out_features (list[str] or None): outputs to return, from ``hr2``..``hr5``
            (branches at strides 4..32) and ``hrv2`` (their HRNetV2 concatenation at
            stride 4); None: all branches.
        freeze_at (int): freeze the stem (1), + stage 1 (2), ... + stage 4 (5); 0 freezes
            nothing (MODEL.BACKBONE.FREEZE_AT; see :meth:`freeze`).
        upsample_mode (str): "nearest" or "bilinear", upsampling inside the fusions.
        hrv2_upsample_mode (str): "nearest" or "bilinear", upsampling that builds ``hrv2``.
        stem_channels (int): width of the first stem conv.
        activation_checkpoint (bool): recompute the stem + stage 1 and each
            HighResolutionModule in backward (training with gradients only).
        inference_fuse (bool): in eval mode without gradients, run the folded fast path
            (:meth:`uses_fused_path`); results equal the plain graph up to fp32 rounding.
        training_fuse (bool): with gradients and every norm's statistics frozen (FrozenBN,
            BNEval), fold each norm into its conv inside autograd (:meth:`uses_training_fold`);
            outputs and gradients equal the plain graph's up to fp32 rounding.
        channels_last (bool): NHWC at inference and in GPU training.
    """

    def __init__(
        self,
        stages: Sequence[StageSpec],
        *,
        norm="FrozenBN",
        out_features=None,
        freeze_at=0,
        upsample_mode="nearest",
        hrv2_upsample_mode="bilinear",
        stem_channels=64,
        activation_checkpoint=False,
        inference_fuse=True,
        training_fuse=True,
        channels_last=True,
    ):
        super().__init__()
        if len(stages) != 4:
            raise ValueError(f"HRNet has 4 stages (strides 4/8/16/32), got {len(stages)} stage specs")
        self.activation_checkpoint = activation_checkpoint
        self.inference_fuse = inference_fuse
        self.training_fuse = training_fuse
        self.channels_last = channels_last
        self.hrv2_upsample_mode = hrv2_upsample_mode
        # stem: two stride-2 3x3 convs
        self.conv1 = conv3x3(3, stem_channels, stride=2)
        self.bn1 = get_norm(norm, stem_channels)
        self.conv2 = conv3x3(stem_channels, 64, stride=2)
        self.bn2 = get_norm(norm, 64)

        # stage 1: a plain residual layer on the single stride-4 branch
        s1 = stages[0]
        block = BLOCKS[s1.block]
        c = s1.num_channels[0]
        self.layer1 = nn.Sequential(
            block(64, c, norm=norm),
            *[block(c * block.expansion, c, norm=norm) for _ in range(1, s1.num_blocks[0])],
        )
        channels = [c * block.expansion]

        for k, spec in enumerate(stages[1:], start=1):
            target = [ch * BLOCKS[spec.block].expansion for ch in spec.num_channels]
            self.add_module(f"transition{k}", self._make_transition(channels, target, norm))
            modules = []
            for _ in range(spec.num_modules):
                modules.append(HighResolutionModule(target, spec, norm, upsample_mode))
                target = modules[-1].out_channels
            self.add_module(f"stage{k + 1}", HRStage(*modules))
            channels = target
        self.num_stages = len(stages)

        self._out_feature_strides = {branch_name(i): 4 * 2**i for i in range(len(channels))}
        self._out_feature_channels = {branch_name(i): ch for i, ch in enumerate(channels)}
        self._out_feature_strides[HRV2_NAME] = 4
        self._out_feature_channels[HRV2_NAME] = sum(channels)
        if out_features is None:
            out_features = [branch_name(i) for i in range(len(channels))]
        problem = feature_names_problem(out_features, self._out_feature_channels, "the HRNet body")
        if problem:
            raise ArgumentValueError("HRNet", "out_features", list(out_features), problem)
        self._out_features = list(out_features)
        self._branch_names = [branch_name(i) for i in range(len(channels))]
        self._hrv2 = HRV2_NAME in self._out_features
        self._out_feature_strides = {k: self._out_feature_strides[k] for k in self._out_features}
        self._out_feature_channels = {k: self._out_feature_channels[k] for k in self._out_features}
        self.freeze(freeze_at)

    @staticmethod
    def _make_transition(pre_channels, cur_channels, norm):
        """Existing branches get a 3x3 conv only if their width changes; each new
        branch is made from the lowest-resolution one by stride-2 3x3 convs."""
        layers = Transition()
        for i, c in enumerate(cur_channels):
            if i < len(pre_channels):
                cp = pre_channels[i]
                layers.append(ConvNorm(cp, c, 3, 1, norm, relu=True) if cp != c else nn.Identity())
            else:
                steps = i + 1 - len(pre_channels)
                cp = pre_channels[-1]
                layers.append(
                    ConvNormChain(
                        *[ConvNorm(cp, c if k == steps - 1 else cp, 3, 2, norm, relu=True) for k in range(steps)]
                    )
                )
        return layers

    @property
    def size_divisibility(self) -> int:
        return 32

    def stage_modules(self):
        """Modules of each stage as FREEZE_AT counts them: 1 = stem, 2 = stage 1
        (layer1), k = transition{k-2} + stage{k-1} for k = 3..5."""
        yield 1, [self.conv1, self.bn1, self.conv2, self.bn2]
        yield 2, [self.layer1]
        for k in range(2, self.num_stages + 1):
            yield k + 1, [getattr(self, f"transition{k - 1}"), getattr(self, f"stage{k}")]

    def freeze(self, freeze_at=0):
        """Stop gradients of the first ``freeze_at`` stages and turn their norms into
        FrozenBatchNorm2d, so running statistics stop moving too."""
        for k, modules in self.stage_modules():
            if k > freeze_at:
                break
            for m in modules:
                for p in m.parameters():
                    p.requires_grad = False
            for name in [n for n, m in self.named_children() if any(m is x for x in modules)]:
                setattr(self, name, FrozenBatchNorm2d.convert_frozen_batchnorm(getattr(self, name)))
        return self

    def forward_branches(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The reference (training) path; ``_forward_fused`` is the inference path."""
        xs = [self._stem_and_layer1(x)]
        xs = self.stage2(self.transition1(xs))
        xs = self.stage3(self.transition2(xs))
        return self.stage4(self.transition3(xs))

    @torch.jit.unused
    def _forward_checkpointed(self, x: torch.Tensor, fold: bool = False) -> List[torch.Tensor]:
        """forward_branches, recomputing the stem + stage 1 and each HighResolutionModule in
        backward (MODEL.HRNET.ACTIVATION_CHECKPOINT, only while training with grad); ``fold``:
        each piece runs (and is recomputed) on weights folded in autograd."""
        stem = self._stem_and_layer1_fused if fold else self._stem_and_layer1
        xs = [checkpoint(stem, x, use_reentrant=False, context_fn=recompute_context(self))]
        for k in range(1, self.num_stages):
            transition = getattr(self, f"transition{k}")
            xs = transition.forward_fused(xs) if fold else transition(xs)
            for module in getattr(self, f"stage{k + 1}"):
                run = module.forward_fused if fold else module
                xs = checkpoint(run, xs, use_reentrant=False, context_fn=recompute_context(module))
        return xs

    @torch.jit.unused
    def _forward_eager(self, x: torch.Tensor) -> List[torch.Tensor]:
        if self.uses_fused_path(x):
            with torch.no_grad():  # nothing needs a gradient: the folded copies are kept
                return self._forward_fused(x)
        fold = self.uses_training_fold()
        if checkpointing(self):
            return self._forward_checkpointed(x, fold)
        if fold:
            return self._forward_fused(x)
        return self.forward_branches(x)

    def _stem_and_layer1(self, x):
        x = F.relu_(self.bn1(self.conv1(x)))
        x = F.relu_(self.bn2(self.conv2(x)))
        return self.layer1(x)

    @torch.jit.unused
    def _stem_and_layer1_fused(self, x):
        conv1, conv2 = self.folded()
        x = conv2(conv1(x, relu=True), relu=True)
        for block in self.layer1:
            x = block.forward_fused(x)
        return x

    def conv_norm_pairs(self):
        """The stem's pairs (see ``FoldsConvNorms``); every other module folds its own."""
        return [(self.conv1, self.bn1), (self.conv2, self.bn2)]

    def uses_fused_path(self, x: Optional[torch.Tensor] = None) -> bool:
        """Whether ``forward`` runs the inference fast path now (norms folded into the convs,
        add/ReLU fused): eval mode, every norm an affine map, MODEL.HRNET.INFERENCE_FUSE on,
        no gradient needed, and not exporting."""
        if self.training or not self.inference_fuse or exporting():
            return False
        if torch.is_grad_enabled() and (
            (x is not None and x.requires_grad) or any(p.requires_grad for p in self.parameters())
        ):
            return False
        return all_norms_foldable(self)

    def uses_training_fold(self) -> bool:
        """Whether ``forward`` with gradients folds the norms into the convs inside autograd
        (fold.TrainFoldedConv): gradients enabled, MODEL.HRNET.TRAINING_FUSE on, every norm
        an affine map (FrozenBN, BNEval, eval-mode BN; never BN/SyncBN in training), and not
        exporting."""
        if not self.training_fuse or not torch.is_grad_enabled() or exporting():
            return False
        return all_norms_foldable(self)

    @torch.jit.unused
    def _forward_fused(self, x: torch.Tensor) -> List[torch.Tensor]:
        """``forward_branches`` on folded weights: each module runs its own ``forward_fused``
        (inference: constant folded copies; with gradients: folded inside autograd)."""
        xs = [self._stem_and_layer1_fused(x)]
        for k in range(1, self.num_stages):
            xs = getattr(self, f"transition{k}").forward_fused(xs)
            xs = getattr(self, f"stage{k + 1}").forward_fused(xs)
        return xs

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"HRNet takes (N, C, H, W) input, got shape {x.shape}")
        if self.channels_last and (x.is_cuda or not self.training):
            x = x.contiguous(memory_format=torch.channels_last)
        if torch.jit.is_scripting():
            xs = self.forward_branches(x)
        else:
            xs = self._forward_eager(x)
        outputs: Dict[str, torch.Tensor] = {}
        for name, y in zip(self._branch_names, xs):
            if name in self._out_features:
                outputs[name] = y
        if self._hrv2:
            outputs["hrv2"] = torch.cat([xs[0]] + [upsample_to(y, xs[0], self.hrv2_upsample_mode) for y in xs[1:]], 1)
        return outputs

    def output_shape(self):
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }


def stage_specs_from_cfg(cfg):
    """The four StageSpecs of MODEL.HRNET: the architecture table's ``ARCH``, or the explicit
    STAGE1..4 keys when ``ARCH`` is "" (checked by :func:`hrnet_d2.config.validate.validate_config`)."""
    h = cfg.MODEL.HRNET
    if h.ARCH:
        return ARCHITECTURES[h.ARCH]
    stages = [getattr(h, f"STAGE{k}") for k in range(1, 5)]
    return tuple(
        StageSpec(s.NUM_MODULES, s.NUM_BRANCHES, s.BLOCK, tuple(s.NUM_BLOCKS), tuple(s.NUM_CHANNELS), s.FUSE_METHOD)
        for s in stages
    )


@BACKBONE_REGISTRY.register()
def build_hrnet_backbone(cfg, input_shape: ShapeSpec):
    """The HRNet body (:class:`HRNet`) from MODEL.HRNET.* and MODEL.BACKBONE.FREEZE_AT.

    Args:
        cfg (CfgNode): a Detectron2 config with :func:`add_hrnet_config`'s keys.
        input_shape (ShapeSpec): the input; HRNet takes 3 channels.
    """
    h = cfg.MODEL.HRNET
    return HRNet(
        stage_specs_from_cfg(cfg),
        norm=h.NORM,
        out_features=list(h.OUT_FEATURES),
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        upsample_mode=h.FUSE_UPSAMPLE_MODE,
        hrv2_upsample_mode=h.HRV2_UPSAMPLE_MODE,
        stem_channels=h.STEM_CHANNELS,
        activation_checkpoint=h.ACTIVATION_CHECKPOINT,
        inference_fuse=h.INFERENCE_FUSE,
        training_fuse=h.TRAINING_FUSE,
        channels_last=h.CHANNELS_LAST,
    )
