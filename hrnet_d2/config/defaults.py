"""Config keys of hrnet_d2 (``add_hrnet_config``) and where the shipped YAMLs live."""

from pathlib import Path

from detectron2.config import CfgNode as CN

from ..utils.errors import ConfigError

__all__ = [
    "add_hrnet_config",
    "add_fcos_config",
    "get_config_file",
    "get_hrnet_cfg",
    "CONFIG_DIR",
]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def add_hrnet_config(cfg):
    """Add the MODEL.HRNET, MODEL.HRNET_PYRAMID, MODEL.HTC, MODEL.CLASS_NAME_TRANSFER, INPUT.RESIZE_BACKEND,
    DATALOADER.DROP_INVALID_BOXES and DIST keys to a Detectron2 config."""
    _C = cfg
    _C.MODEL.HRNET = CN()
    # A name from hrnet_d2.modeling.arch.ARCHITECTURES (w18_small_v1, w18_small_v2, w18, w30,
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
    # FrozenBN, BN, SyncBN, GN, ... (anything detectron2.layers.get_norm accepts), or BNEval:
    # BN with frozen statistics and trainable weight/bias (the published detectors' norm,
    # mmdetection norm_eval=True; the COCO configs use it, with SOLVER.WEIGHT_DECAY_NORM).
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
    # the convs and add/ReLU fused (hrnet_d2/modeling/fold.py); training and state_dict are unaffected.
    _C.MODEL.HRNET.INFERENCE_FUSE = True
    # Training fast path: when every norm has frozen statistics (FrozenBN, BNEval), each norm is
    # folded into its conv inside autograd at every step (gradients reach the conv and the
    # trained affine terms as in the plain graph); BN/SyncBN in training never take it.
    _C.MODEL.HRNET.TRAINING_FUSE = True
    # Run the body in channels_last (NHWC) memory format at inference (CPU and GPU) and in GPU
    # training (tensor cores).  CPU training stays NCHW: there NHWC backward convs are slower
    # (README "Performance").
    _C.MODEL.HRNET.CHANNELS_LAST = True
    # Inference precision of the HRNetV2p backbone (body + pyramid): "" = fp32; "bf16" (CPUs with
    # native bf16: amx_bf16 / avx512_bf16 in lscpu's flags; GPUs) or "fp16" (GPUs) run them under
    # torch.autocast in eval mode, the pyramid's outputs cast back to fp32 for the heads.
    # Training is unaffected (use SOLVER.AMP.ENABLED there).  On CPUs without native bf16 it is
    # emulated and slower than fp32.  The R-CNN heads' convs and FCs follow it where the model is
    # built by hrnet_d2 (train_net.py, demo.py, tools: hrnet_d2/modeling/inference_autocast.py); anchors,
    # box decoding, ROIAlign, NMS and mask pasting stay fp32.
    _C.MODEL.HRNET.INFERENCE_AUTOCAST = ""
    # Inference of the HRNetV2p backbone through torch.compile (inductor, freezing), in fp32 or under
    # INFERENCE_AUTOCAST: compiled at the first inference, again per new padded input size until dynamo's
    # dynamic-shape graph covers them, and after the weights change (docs/performance_detector.md: when it pays)
    _C.MODEL.HRNET.INFERENCE_COMPILE = False

    # Images per forward pass in evaluation (train_net.py --eval-only and the periodic test):
    # the test loader batches them (Detectron2's default is 1; its config has no such key).
    _C.TEST.IMS_PER_BATCH = 1

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
    # Stride of the levels' 3x3 convs: 1 = p2.. at strides 4, 8, ...; 2 = p3.. at strides 8, 16, ...
    # (mmdetection's HRFPN stride=2, used by its HRNet FCOS: NUM_LEVELS 5 gives p3..p7, strides 8..128).
    _C.MODEL.HRNET_PYRAMID.CONV_STRIDE = 1

    # Hybrid Task Cascade (MODEL.ROI_HEADS.NAME "HybridTaskCascadeROIHeads", hrnet_d2/modeling/htc.py); the cascade's
    # stages and stage loss weights are MODEL.ROI_BOX_CASCADE_HEAD's.  Defaults: mmdetection's htc_r50_fpn_1x_coco / HRNet HTC configs.
    _C.MODEL.HTC = CN()
    _C.MODEL.HTC.INTERLEAVED = True  # stage k's mask head trained on stage k's regressed boxes
    # training: every stage (and every interleaved mask step) assigns and samples its RoIs afresh, as mmdetection
    # (MaxIoUAssigner + RandomSampler: ROI_HEADS.BATCH_SIZE_PER_IMAGE, POSITIVE_FRACTION, the ground truth appended
    # exactly, regressed ground-truth boxes dropped); False: Detectron2's cascade (later stages relabel all boxes)
    _C.MODEL.HTC.RESAMPLE_STAGES = True
    _C.MODEL.HTC.MASK_INFO_FLOW = True  # mask head k receives mask head k-1's features (conv_res)
    # Test-time masks: "last" = the last stage's probabilities (mmdetection 3.x); "mean" = all stages'
    # probabilities averaged (mmdetection 1.x/2.x, the HTC paper)
    _C.MODEL.HTC.MASK_TEST_STAGES = "last"
    _C.MODEL.HTC.SEMANTIC_ON = True  # mmdetection FusedSemanticHead + semantic_roi_extractor
    _C.MODEL.HTC.SEMANTIC = CN()
    _C.MODEL.HTC.SEMANTIC.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]  # num_ins=5
    _C.MODEL.HTC.SEMANTIC.FUSION_FEATURE = "p3"  # fusion_level=1 (stride 8)
    _C.MODEL.HTC.SEMANTIC.NUM_CONVS = 4
    _C.MODEL.HTC.SEMANTIC.CONV_DIM = 256
    _C.MODEL.HTC.SEMANTIC.NUM_CLASSES = 183  # COCO-stuff things + stuff (+ "other")
    _C.MODEL.HTC.SEMANTIC.FUSION = ["bbox", "mask"]  # RoI features the pooled embedding is added to
    # semantic_roi_extractor: RoIAlign(output_size=14, sampling_ratio=0), aligned=True, at the fusion stride
    _C.MODEL.HTC.SEMANTIC.POOLER_TYPE = "ROIAlignV2"
    _C.MODEL.HTC.SEMANTIC.POOLER_RESOLUTION = 14
    _C.MODEL.HTC.SEMANTIC.POOLER_SAMPLING_RATIO = 0
    # loss_seg: CrossEntropyLoss(ignore_index=255, loss_weight=0.2), label maps passed by MODEL.META_ARCHITECTURE
    # "HybridTaskCascade" (a dataset's sem_seg_file_name, e.g. COCO-stuff's stuffthingmaps)
    _C.MODEL.HTC.SEMANTIC.LOSS_WEIGHT = 0.2
    _C.MODEL.HTC.SEMANTIC.IGNORE_VALUE = 255

    # MODEL.WEIGHTS must fit and fill the whole HRNet body (hrnet_d2/checkpoint/detection_checkpoint.py):
    # a checkpoint that leaves body tensors at their random init (a partial file, another backbone's
    # weights) or whose backbone has other shapes stops loading, naming what is missing or differs.
    # The same for the whole detector when fine-tuning from a detector checkpoint: a layer that does
    # not depend on the class count (RPN head, box head, a cascade stage, the mask head) left at its
    # random init stops; the class-specific layers (classifier, box regression, mask predictor) of
    # another class count are re-initialised, named in one log line.  True loads what fits and logs
    # the rest as a warning (when that is intended).  Backbone-only checkpoints (ImageNet weights:
    # no heads, maybe no pyramid) are normal: they never stop.
    _C.MODEL.HRNET.ALLOW_PARTIAL_WEIGHTS = False
    # MMDetCascadeROIHeads (hrnet_d2/modeling/mmdet_heads.py): the weight of each cascade stage's box
    # and mask losses in training (mmdetection's stage_loss_weights); [] = 1 for every stage.
    _C.MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS = []
    # Fine-tuning a detector on other classes: a class of the training data with the name of a class
    # the checkpoint was trained on (names saved with our checkpoints; COCO's for hrnet_d2://coco/...)
    # starts from that class's rows of the classifier, box regression and mask predictor; the others
    # start fresh.  One log line lists them.  False: all class-specific rows start fresh.
    _C.MODEL.CLASS_NAME_TRANSFER = True

    # Training annotations whose box has a non-positive width/height or lies entirely
    # outside its image are an error (DataError naming the json and annotation id);
    # True drops them with a warning that counts them (Detectron2 drops them silently).
    _C.DATALOADER.DROP_INVALID_BOXES = False
    add_fcos_config(cfg)


def add_fcos_config(cfg):
    """Add the MODEL.FCOS keys of ``MODEL.META_ARCHITECTURE: "FCOSDetector"`` (hrnet_d2/fcos.py): Detectron2's
    FCOS from YAML.  The defaults are Detectron2's FCOS (its LazyConfig ``fcos.py``); configs/Base-FCOS-HRNetV2p-mmdet.yaml
    sets mmdetection's conventions, each key saying its mmdetection name."""
    _C = cfg
    _C.MODEL.FCOS = CN()
    _C.MODEL.FCOS.NUM_CLASSES = 80
    _C.MODEL.FCOS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # Head: NUM_CONVS 3x3 convs (+ NORM + ReLU) in each of the classification and regression towers.
    _C.MODEL.FCOS.NUM_CONVS = 4
    _C.MODEL.FCOS.NORM = "GN"  # a detectron2.layers.get_norm name, "" for none
    # Bias in the towers' convs (Detectron2: always; mmdetection conv_bias="auto": none when NORM is set).
    _C.MODEL.FCOS.CONV_BIAS = True
    _C.MODEL.FCOS.PRIOR_PROB = 0.01
    # Centerness predicted from the regression tower (Detectron2; mmdetection centerness_on_reg=True) or
    # from the classification tower (False: mmdetection's default, its HRNet FCOS).
    _C.MODEL.FCOS.CENTERNESS_ON_REG = True
    # One learnable scalar per level multiplying the regression output (mmdetection's Scale; Detectron2: none).
    _C.MODEL.FCOS.LEVEL_SCALES = False
    # What the regression output is: "linear" = distances in units of the level's stride (Detectron2);
    # "exp" = exp(output) pixels (mmdetection norm_on_bbox=False, its HRNet FCOS); "relu" = max(output, 0)
    # strides (mmdetection norm_on_bbox=True).
    _C.MODEL.FCOS.REG_ACTIVATION = "linear"
    # Locations at (i + ANCHOR_OFFSET) * stride: 0.0 (Detectron2), 0.5 (mmdetection's MlvlPointGenerator).
    _C.MODEL.FCOS.ANCHOR_OFFSET = 0.0
    # Training: a location is positive only within this many strides of a box's centre (Detectron2: 1.5, always;
    # mmdetection center_sampling=True, center_sample_radius); 0.0 = no centre sampling (mmdetection's default).
    _C.MODEL.FCOS.CENTER_SAMPLING_RADIUS = 1.5
    _C.MODEL.FCOS.FOCAL_LOSS_ALPHA = 0.25
    _C.MODEL.FCOS.FOCAL_LOSS_GAMMA = 2.0
    # Inference.  "detectron2": score = sqrt(sigmoid(cls) * sigmoid(centerness)), thresholded and ranked;
    # "mmdetection": sigmoid(cls) thresholded and ranked (top TOPK_CANDIDATES_TEST per level), score =
    # sigmoid(cls) * sigmoid(centerness), boxes clipped to the image and empty ones dropped before NMS.
    _C.MODEL.FCOS.TEST_CONVENTION = "detectron2"
    _C.MODEL.FCOS.SCORE_THRESH_TEST = 0.2  # mmdetection score_thr
    _C.MODEL.FCOS.TOPK_CANDIDATES_TEST = 1000  # per level; mmdetection nms_pre
    _C.MODEL.FCOS.NMS_THRESH_TEST = 0.6  # mmdetection nms.iou_threshold (class-wise NMS in both)
    # detections per image: TEST.DETECTIONS_PER_IMAGE (mmdetection max_per_img)

    # Several processes (docs/distributed.md): how long a collective (gradient all-reduce,
    # barrier, metrics gather) waits for the other processes before the job ends with one line
    # naming the rank that was lost; finding that rank takes at most as long again.  Must exceed
    # the longest time one process works alone (rank 0 saving a checkpoint, generating data).
    # Detectron2's launch uses 30 minutes.
    _C.DIST = CN()
    _C.DIST.TIMEOUT_SECONDS = 1800


def get_config_file(name: str) -> str:
    """Absolute path of a config shipped with hrnet_d2, e.g. ``"faster_rcnn_hrnetv2p_w32.yaml"``."""
    path = CONFIG_DIR / name
    if not path.is_file():
        available = sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*") if p.is_file())
        raise FileNotFoundError(f"{name!r} is not a config shipped with hrnet_d2; available: {available}")
    return str(path)


def get_hrnet_cfg(config_file=None, opts=(), allow_unsafe_yaml=None):
    """Detectron2's default config + our keys, merged from a YAML file and ``KEY VALUE`` overrides.

    The file (and its ``_BASE_`` files) is read with ``yaml.safe_load``: a python tag raises
    ``hrnet_d2.utils.safe_load.UnsafeFileError`` naming file and tag.  ``allow_unsafe_yaml=True``
    (default: the ``HRNET_D2_ALLOW_UNSAFE_YAML`` environment variable) restores Detectron2's
    ``yaml.unsafe_load`` fallback, for files you trust.
    """
    from detectron2.config import get_cfg

    from ..utils.safe_load import merge_yaml_file

    cfg = get_cfg()
    add_hrnet_config(cfg)
    if config_file:
        merge_yaml_file(cfg, config_file, allow_unsafe=allow_unsafe_yaml)
    try:
        cfg.merge_from_list(list(opts))
    except (AssertionError, ValueError, KeyError) as e:  # yacs: unknown key, wrong type, odd list: one line
        raise ConfigError(f"config override {' '.join(map(str, opts))!r}: {str(e).strip().splitlines()[0]}") from e
    return cfg
