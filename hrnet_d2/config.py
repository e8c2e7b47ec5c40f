"""Config keys of hrnet_d2 (``add_hrnet_config``) and where the shipped YAMLs live."""
from pathlib import Path

from detectron2.config import CfgNode as CN

__all__ = ["add_hrnet_config", "get_config_file", "get_hrnet_cfg", "CONFIG_DIR"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def add_hrnet_config(cfg):
    """Add the MODEL.HRNET, MODEL.HRNET_PYRAMID and INPUT.RESIZE_BACKEND keys to a Detectron2 config."""
    _C = cfg
    _C.MODEL.HRNET = CN()
    # A name from hrnet_d2.arch.ARCHITECTURES (w18_small_v1, w18_small_v2, w18, w30,
    # w32, w40, w44, w48, w64), or "" to use the explicit MODEL.HRNET.STAGE{1..4} specs.
    _C.MODEL.HRNET.ARCH = "w32"
    for k in range(1, 5):
        stage = CN()
        stage.NUM_MODULES = 0
        stage.NUM_BRANCHES = 0
        stage.BLOCK = ""  # BASIC or BOTTLENECK
        stage.NUM_BLOCKS = []
        stage.NUM_CHANNELS = []
        stage.FUSE_METHOD = "SUM"
        setattr(_C.MODEL.HRNET, f"STAGE{k}", stage)
    _C.MODEL.HRNET.STEM_CHANNELS = 64
    # FrozenBN, BN, SyncBN, GN, ... (anything detectron2.layers.get_norm accepts)
    _C.MODEL.HRNET.NORM = "FrozenBN"
    # hr2..hr5 are the branches at stride 4..32 (hr2 alone = HRNetV1);
    # hrv2 is the HRNetV2 concatenation at stride 4.
    _C.MODEL.HRNET.OUT_FEATURES = ["hr2", "hr3", "hr4", "hr5"]
    # Upsampling inside the fusion; "nearest" is what the ImageNet weights were trained with.
    _C.MODEL.HRNET.FUSE_UPSAMPLE_MODE = "nearest"
    # Upsampling used to build the HRNetV2 representation (hrv2 output).
    _C.MODEL.HRNET.HRV2_UPSAMPLE_MODE = "bilinear"
    # Recompute the stage activations in backward (torch.utils.checkpoint) to save memory; with
    # HRNetV2p also its upsample + concat + reduction (the stride-4 concatenation).
    _C.MODEL.HRNET.ACTIVATION_CHECKPOINT = False
    # Inference fast path: in eval mode without gradients, FrozenBN/eval-BN are folded into
    # the convs and add/ReLU fused (hrnet_d2/fold.py); training and state_dict are unaffected.
    _C.MODEL.HRNET.INFERENCE_FUSE = True
    # Run the body in channels_last (NHWC) memory format at inference (CPU and GPU) and in GPU
    # training (tensor cores).  CPU training stays NCHW: there NHWC backward convs are slower
    # (W32 body + HRNetV2p, 384x640 fwd+bwd on 2 AVX2 cores: 5.71 s NHWC vs 4.16 s NCHW).
    _C.MODEL.HRNET.CHANNELS_LAST = True

    # Image resize (train and test): "PIL" = Detectron2's ResizeShortestEdge; "cv2" = mmdetection's
    # Resize (cv2.INTER_LINEAR, mmcv's size rounding), for models converted from mmdetection.
    _C.INPUT.RESIZE_BACKEND = "PIL"

    # HRNetV2p pyramid (build_hrnetv2p_backbone)
    _C.MODEL.HRNET_PYRAMID = CN()
    _C.MODEL.HRNET_PYRAMID.IN_FEATURES = ["hr2", "hr3", "hr4", "hr5"]
    _C.MODEL.HRNET_PYRAMID.OUT_CHANNELS = 256
    # Levels p2, p3, ... at strides 4, 8, ...; 5 gives p2..p6 (the reference recipe).
    _C.MODEL.HRNET_PYRAMID.NUM_LEVELS = 5
    _C.MODEL.HRNET_PYRAMID.POOLING = "AVG"  # AVG or MAX
    _C.MODEL.HRNET_PYRAMID.SHARE_CONV = False
    _C.MODEL.HRNET_PYRAMID.NORM = ""
    _C.MODEL.HRNET_PYRAMID.UPSAMPLE_MODE = "bilinear"


def get_config_file(name: str) -> str:
    """Absolute path of a config shipped with hrnet_d2, e.g. ``"faster_rcnn_hrnetv2p_w32.yaml"``."""
    path = CONFIG_DIR / name
    if not path.is_file():
        available = sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*") if p.is_file())
        raise FileNotFoundError(f"{name!r} is not a config shipped with hrnet_d2; available: {available}")
    return str(path)


def get_hrnet_cfg(config_file=None, opts=()):
    """Detectron2's default config + our keys, merged from a YAML file and ``KEY VALUE`` overrides."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_hrnet_config(cfg)
    if config_file:
        cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(opts))
    return cfg
