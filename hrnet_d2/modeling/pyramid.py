"""HRNetV2p: the HRNet feature pyramid used by detectors (HRFPN in mmdetection).

All body branches are upsampled to the finest one and concatenated (HRNetV2), a 1x1
conv reduces the concatenation, pooling makes one level per stride, and a 3x3 conv
per level (optionally shared) produces p2..p{k} — the same names and strides as
Detectron2's FPN, so stock RPN / ROI heads / RetinaNet configs consume it unchanged.

Module names ``reduction_conv`` / ``fpn_convs`` mirror mmdetection's HRFPN so its
detection checkpoints map by a plain rename.
"""

import math
from typing import Dict, List

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from ..utils.errors import ArgumentValueError, UserError, feature_names_problem
from .hrnet import build_hrnet_backbone
from .layers import checkpointing, get_norm, recompute_context, upsample_to

__all__ = [
    "HRNetV2p",
    "POOLING_TYPES",
    "AUTOCAST_DTYPES",
    "CONV_STRIDES",
    "build_hrnetv2p_backbone",
    "build_hrnetv2p_with_body_backbone",
    "build_hrnet_fpn_backbone",
]

POOLING_TYPES = ("AVG", "MAX")
# conv_stride values: the levels' 3x3 convs (mmdetection HRFPN ``stride``)
CONV_STRIDES = (1, 2)
# inference_autocast values ("" = fp32)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class HRNetV2p(Backbone):
    """HRNetV2p: the body's branches upsampled to the finest and concatenated, reduced by a
    1x1 conv, pooled into one level per stride, each level through a 3x3 conv (p2, p3, ...)."""

    def __init__(
        self,
        bottom_up: Backbone,
        in_features,
        out_channels=256,
        num_levels=5,
        pooling="AVG",
        share_conv=False,
        norm="",
        upsample_mode="bilinear",
        keep_body_outputs=False,
        activation_checkpoint=False,
        inference_autocast="",
        conv_stride=1,
        inference_compile=False,
    ):
        """
        Args:
            bottom_up (Backbone): the HRNet body (or any backbone with strided outputs).
            in_features (list[str]): body outputs to concatenate; all are resized to the finest of them, whose stride becomes the first level's.
            out_channels (int): channels of the reduction conv and of every level.
            num_levels (int): levels p{k}..: the finest stride, then each pooled 2x further.
            pooling (str): "AVG" or "MAX", the pooling that makes the coarser levels.
            share_conv (bool): one 3x3 conv shared by all levels instead of one per level.
            norm (str): a ``layers.get_norm`` name (Detectron2's names and BNEval) for the pyramid's convs; "" for none
                (then the convs have a bias).
            upsample_mode (str): "nearest" or "bilinear", how inputs are resized to the finest.
            keep_body_outputs (bool): also return the body's outputs (e.g. ``hrv2`` for the
                semantic head of Panoptic FPN), computed once and shared with the pyramid.
            activation_checkpoint (bool): in training, recompute the upsample + concat +
                reduction in backward instead of keeping the stride-4 concatenation (sum of
                all branch widths, the largest activation of the detector).
            inference_autocast (str): "bf16" or "fp16" runs body
                and pyramid under ``torch.autocast`` in eval mode (the outputs are cast back to
                fp32, so the heads run in fp32); "" keeps fp32.  Training is never affected.
            conv_stride (int): stride of every level's 3x3 conv: 1 gives
                p2.. at strides 4, 8, ...; 2 halves every level once more, p3.. at strides 8, 16, ...
                (mmdetection's HRFPN ``stride=2``, used by its HRNet FCOS: p3..p7, strides 8..128).
            inference_compile (bool): in eval mode without gradients, run body + pyramid through
                ``torch.compile`` (inductor with ``freezing``: weights folded into the compiled code), under
                ``inference_autocast`` too.  Compiled at the first such call, and again at each new padded
                input size until dynamo's dynamic-shape graph covers the sizes; the weights are frozen into
                the code, so when a parameter or buffer changes (weights loaded, a training step) torch.compile's
                caches are reset (``torch.compiler.reset()``: every compiled function of the process) and it
                compiles again.  Needs a C++ compiler.  Training, scripting and tracing are not affected.
        """
        super().__init__()
        shapes = bottom_up.output_shape()
        problem = feature_names_problem(in_features, shapes, f"bottom_up ({type(bottom_up).__name__})")
        if problem:
            raise ArgumentValueError("HRNetV2p", "in_features", list(in_features), problem)
        if pooling not in POOLING_TYPES:
            raise ArgumentValueError("HRNetV2p", "pooling", pooling, f"allowed: {list(POOLING_TYPES)}")
        if inference_autocast and inference_autocast not in AUTOCAST_DTYPES:
            raise ArgumentValueError(
                "HRNetV2p", "inference_autocast", inference_autocast, f"allowed: {['', *AUTOCAST_DTYPES]}"
            )
        if conv_stride not in CONV_STRIDES:
            raise ArgumentValueError("HRNetV2p", "conv_stride", conv_stride, f"allowed: {list(CONV_STRIDES)}")
        self.bottom_up = bottom_up
        self.in_features = list(in_features)
        self.upsample_mode = upsample_mode
        self.pooling = pooling
        base_stride = min(shapes[f].stride for f in self.in_features)
        # every input is resized to the finest one (the first at the smallest stride)
        self._finest = [shapes[f].stride for f in self.in_features].index(base_stride)
        in_channels = sum(shapes[f].channels for f in self.in_features)
        use_bias = norm == ""
        self.reduction_conv = Conv2d(in_channels, out_channels, 1, bias=use_bias, norm=get_norm(norm, out_channels))

        def level_conv():
            return Conv2d(
                out_channels,
                out_channels,
                3,
                stride=conv_stride,
                padding=1,
                bias=use_bias,
                norm=get_norm(norm, out_channels),
            )

        self.share_conv = share_conv
        self.fpn_convs = nn.ModuleList([level_conv() for _ in range(1 if share_conv else num_levels)])
        # mmdetection's HRFPN init, for the pyramid's own convs only (not the body below it)
        for m in [*self.reduction_conv.modules(), *self.fpn_convs.modules()]:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

        first_stride = base_stride * conv_stride
        first = int(math.log2(first_stride))
        self.levels = [f"p{first + i}" for i in range(num_levels)]
        self._out_features = list(self.levels)
        self._out_feature_strides = {f: first_stride * 2**i for i, f in enumerate(self._out_features)}
        self._out_feature_channels = {f: out_channels for f in self._out_features}
        self.keep_body_outputs = keep_body_outputs
        if keep_body_outputs:
            self._out_features = list(shapes) + self._out_features
            self._out_feature_strides.update({k: v.stride for k, v in shapes.items()})
            self._out_feature_channels.update({k: v.channels for k, v in shapes.items()})
        self._size_divisibility = bottom_up.size_divisibility
        self.activation_checkpoint = activation_checkpoint
        self.inference_autocast = inference_autocast
        self.inference_compile = inference_compile
        self._compiled = None  # (weights' version, compiled _forward): see inference_compile

    @property
    def size_divisibility(self):
        return self._size_divisibility

    def _pool(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Non-overlapping k x k pooling, floor mode as the reference (and exactly exportable:
        ONNX Runtime averages ceil-mode border windows differently).  A map smaller than the
        window (input smaller than the level's stride) gets one ceil-mode cell instead of an error."""
        ceil_mode = False
        if x.shape[-2] < k or x.shape[-1] < k:  # a plain bool also while tracing
            ceil_mode = True
        if self.pooling == "MAX":
            return F.max_pool2d(x, kernel_size=k, stride=k, ceil_mode=ceil_mode)
        return F.avg_pool2d(x, kernel_size=k, stride=k, ceil_mode=ceil_mode)

    def _reduce(self, xs: List[torch.Tensor]) -> torch.Tensor:
        """HRNetV2 (all inputs at the finest resolution, concatenated), reduced by the 1x1 conv."""
        finest = xs[self._finest]
        return self.reduction_conv(torch.cat([upsample_to(t, finest, self.upsample_mode) for t in xs], 1))

    @torch.jit.unused
    def _reduce_eager(self, xs: List[torch.Tensor]) -> torch.Tensor:
        """``_reduce``, recomputed in backward under MODEL.HRNET.ACTIVATION_CHECKPOINT."""
        if checkpointing(self):
            return checkpoint(self._reduce, xs, use_reentrant=False, context_fn=recompute_context(self.reduction_conv))
        return self._reduce(xs)

    @torch.jit.unused
    def _forward_autocast(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        with torch.autocast(x.device.type, dtype=AUTOCAST_DTYPES[self.inference_autocast]):
            out = self._forward(x)
        return {k: v.float() for k, v in out.items()}

    @torch.jit.unused
    def _weights_version(self):
        """Changes when any parameter or buffer is written in place (loading, an optimizer step) or replaced."""
        return tuple((id(t), t._version) for t in (*self.parameters(), *self.buffers()))

    @torch.jit.unused
    def _compile_now(self) -> bool:
        return (
            self.inference_compile
            and not self.training
            and not torch.is_grad_enabled()
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
        )

    @torch.jit.unused
    def _forward_compiled(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        version = self._weights_version()
        if self._compiled is None or self._compiled[0] != version:
            if self._compiled is not None:  # the frozen weights are stale: drop every cached graph
                torch.compiler.reset()
            self._compiled = (version, torch.compile(self._forward))
        fn = self._compiled[1]
        import torch._inductor.config as inductor_config

        # compilation happens inside the call (first call, new sizes): freezing must be on then, and only then
        try:
            with inductor_config.patch(freezing=True):
                if self.inference_autocast == "":
                    return fn(x)
                with torch.autocast(x.device.type, dtype=AUTOCAST_DTYPES[self.inference_autocast]):
                    out = fn(x)
        except Exception as e:  # e.g. no C++ compiler: one line, not inductor's page
            if isinstance(e, (KeyboardInterrupt, MemoryError)):
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise UserError(
                f"HRNetV2p inference_compile (MODEL.HRNET.INFERENCE_COMPILE): torch.compile failed "
                f"({type(e).__name__}: {first}); turn it off to run eagerly"
            ) from e
        return {k: v.float() for k, v in out.items()}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if not torch.jit.is_scripting():
            if self._compile_now():
                return self._forward_compiled(x)
            if self.inference_autocast != "" and not self.training:
                return self._forward_autocast(x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.bottom_up(x)
        xs = [features[f] for f in self.in_features]
        if torch.jit.is_scripting():
            out = self._reduce(xs)
        else:
            out = self._reduce_eager(xs)
        levels: List[torch.Tensor] = [out]
        for i in range(1, len(self.levels)):
            levels.append(self._pool(out, 1 << i))
        results: Dict[str, torch.Tensor] = {}
        if self.keep_body_outputs:
            for name, feature in features.items():
                results[name] = feature
        if self.share_conv:
            conv = self.fpn_convs[0]
            for name, level in zip(self.levels, levels):
                results[name] = conv(level)
        else:
            for i, conv in enumerate(self.fpn_convs):
                results[self.levels[i]] = conv(levels[i])
        return results


@BACKBONE_REGISTRY.register()
def build_hrnetv2p_backbone(cfg, input_shape: ShapeSpec, keep_body_outputs=False):
    """The HRNet body + the HRNetV2p pyramid (:class:`HRNetV2p`, p2..p6 by default), what
    the detectors use; MODEL.HRNET_PYRAMID.* on top of :func:`build_hrnet_backbone`'s keys.

    Args:
        cfg (CfgNode): a Detectron2 config with :func:`add_hrnet_config`'s keys.
        input_shape (ShapeSpec): the input; HRNet takes 3 channels.
        keep_body_outputs (bool): also return the body's outputs (see
            :func:`build_hrnetv2p_with_body_backbone`).
    """
    p = cfg.MODEL.HRNET_PYRAMID
    return HRNetV2p(
        build_hrnet_backbone(cfg, input_shape),
        in_features=list(p.IN_FEATURES),
        out_channels=p.OUT_CHANNELS,
        num_levels=p.NUM_LEVELS,
        pooling=p.POOLING,
        share_conv=p.SHARE_CONV,
        norm=p.NORM,
        upsample_mode=p.UPSAMPLE_MODE,
        keep_body_outputs=keep_body_outputs,
        activation_checkpoint=cfg.MODEL.HRNET.ACTIVATION_CHECKPOINT,
        inference_autocast=cfg.MODEL.HRNET.INFERENCE_AUTOCAST,
        conv_stride=p.CONV_STRIDE,
        inference_compile=cfg.MODEL.HRNET.INFERENCE_COMPILE,
    )


@BACKBONE_REGISTRY.register()
def build_hrnetv2p_with_body_backbone(cfg, input_shape: ShapeSpec):
    """HRNetV2p (same keys) whose outputs also include the body's, so Panoptic FPN's semantic
    head can read the HRNetV2 representation (``hrv2``) while the R-CNN heads read p2..p6.
    Args as :func:`build_hrnetv2p_backbone`."""
    return build_hrnetv2p_backbone(cfg, input_shape, keep_body_outputs=True)


@BACKBONE_REGISTRY.register()
def build_hrnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """The HRNet body under Detectron2's own FPN (MODEL.FPN.*), for comparison with HRNetV2p.
    Args as :func:`build_hrnet_backbone`."""
    bottom_up = build_hrnet_backbone(cfg, input_shape)
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    # Detectron2's FPN only asserts (its default [] fits no HRNet): its argument checked as HRNetV2p's is
    problem = feature_names_problem(in_features, bottom_up.output_shape(), "bottom_up (HRNet)")
    if problem:
        raise ArgumentValueError("FPN", "in_features", in_features, problem)
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
