"""Bad configuration: one ValueError, raised before anything is built or read, that
names the key, the bad value and what is allowed."""

import pytest
from conftest import CONFIGS, make_cfg

from hrnet_d2 import ARCHITECTURES
from hrnet_d2.config.validate import validate_config
from hrnet_d2.engine import Trainer

QUICKSTART = "quickstart/mask_rcnn_hrnetv2p_w18_small_shapes.yaml"
RETINANET = "shapes/retinanet_hrnetv2p_w18_small_shapes.yaml"
SEMANTIC = "shapes/semantic_hrnetv2_w18_small_shapes.yaml"
HTC = "shapes/htc_hrnetv2p_w18_small_shapes.yaml"
FCOS = "shapes/fcos_hrnetv2p_w18_small_shapes.yaml"
YAML_CONFIGS = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml") if not p.name.startswith("Base-"))


def explicit_stages(arch="w18_small_v1"):
    """MODEL.HRNET.STAGE1..4 spelled out (ARCH '') as in the architecture table."""
    opts = ["MODEL.HRNET.ARCH", ""]
    for k, s in enumerate(ARCHITECTURES[arch], start=1):
        p = f"MODEL.HRNET.STAGE{k}."
        opts += [p + "NUM_MODULES", str(s.num_modules), p + "NUM_BRANCHES", str(s.num_branches), p + "BLOCK", s.block,
                 p + "NUM_BLOCKS", str(list(s.num_blocks)), p + "NUM_CHANNELS", str(list(s.num_channels)),
                 p + "FUSE_METHOD", s.fuse_method]  # fmt: skip
    return opts


# (id, base config, overrides, key named, bad value as it appears in the message)
CASES = [
    ("unknown width name", QUICKSTART, ["MODEL.HRNET.ARCH", "w19"], "MODEL.HRNET.ARCH", "'w19'"),
    ("ARCH and explicit stages", QUICKSTART, ["MODEL.HRNET.STAGE2.NUM_BRANCHES", "2"], "MODEL.HRNET.ARCH", "'w18_small_v1'"),
    ("stage list length: NUM_CHANNELS", QUICKSTART, explicit_stages() + ["MODEL.HRNET.STAGE3.NUM_CHANNELS", "[16, 32]"],
     "MODEL.HRNET.STAGE3.NUM_CHANNELS", "[16, 32]"),
    ("stage list length: NUM_BLOCKS", QUICKSTART, explicit_stages() + ["MODEL.HRNET.STAGE4.NUM_BLOCKS", "[2, 2, 2, 2, 2]"],
     "MODEL.HRNET.STAGE4.NUM_BLOCKS", "[2, 2, 2, 2, 2]"),
    ("NUM_BRANCHES below the previous stage", QUICKSTART,
     explicit_stages() + ["MODEL.HRNET.STAGE4.NUM_BRANCHES", "2", "MODEL.HRNET.STAGE4.NUM_BLOCKS", "[2, 2]",
                          "MODEL.HRNET.STAGE4.NUM_CHANNELS", "[16, 32]"], "MODEL.HRNET.STAGE4.NUM_BRANCHES", "2"),
    ("stage 1 with 2 branches", QUICKSTART, explicit_stages() + ["MODEL.HRNET.STAGE1.NUM_BRANCHES", "2"],
     "MODEL.HRNET.STAGE1.NUM_BRANCHES", "(2, 1)"),
    ("NUM_MODULES 0", QUICKSTART, explicit_stages() + ["MODEL.HRNET.STAGE3.NUM_MODULES", "0"],
     "MODEL.HRNET.STAGE3.NUM_MODULES", "0"),
    ("unknown BLOCK", QUICKSTART, explicit_stages() + ["MODEL.HRNET.STAGE2.BLOCK", "RESNEXT"],
     "MODEL.HRNET.STAGE2.BLOCK", "'RESNEXT'"),
    ("unknown FUSE_METHOD", QUICKSTART, explicit_stages() + ["MODEL.HRNET.STAGE4.FUSE_METHOD", "CONCAT"],
     "MODEL.HRNET.STAGE4.FUSE_METHOD", "'CONCAT'"),
    ("negative channel count", QUICKSTART, explicit_stages() + ["MODEL.HRNET.STAGE2.NUM_CHANNELS", "[16, -32]"],
     "MODEL.HRNET.STAGE2.NUM_CHANNELS", "-32"),
    ("zero stem channels", QUICKSTART, ["MODEL.HRNET.STEM_CHANNELS", "0"], "MODEL.HRNET.STEM_CHANNELS", "0"),
    ("unknown norm", QUICKSTART, ["MODEL.HRNET.NORM", "BatchNorm"], "MODEL.HRNET.NORM", "'BatchNorm'"),
    ("no norm in the body", QUICKSTART, ["MODEL.HRNET.NORM", ""], "MODEL.HRNET.NORM", "''"),
    ("unknown pyramid norm", QUICKSTART, ["MODEL.HRNET_PYRAMID.NORM", "IN"], "MODEL.HRNET_PYRAMID.NORM", "'IN'"),
    ("GN on widths not divisible by 32", QUICKSTART, ["MODEL.HRNET.NORM", "GN"], "MODEL.HRNET.NORM", "16 channels"),
    ("GN on pyramid channels not divisible by 32", QUICKSTART, ["MODEL.HRNET_PYRAMID.NORM", "GN",
     "MODEL.HRNET_PYRAMID.OUT_CHANNELS", "100"], "MODEL.HRNET_PYRAMID.NORM", "100 channels"),
    ("unknown upsample mode", QUICKSTART, ["MODEL.HRNET.FUSE_UPSAMPLE_MODE", "bicubic"],
     "MODEL.HRNET.FUSE_UPSAMPLE_MODE", "'bicubic'"),
    ("unknown body output", QUICKSTART, ["MODEL.HRNET.OUT_FEATURES", "['hr2', 'hr6']"], "MODEL.HRNET.OUT_FEATURES", "'hr6'"),
    ("unknown pooling type", QUICKSTART, ["MODEL.HRNET_PYRAMID.POOLING", "MEDIAN"], "MODEL.HRNET_PYRAMID.POOLING", "'MEDIAN'"),
    ("non-positive pyramid channels", QUICKSTART, ["MODEL.HRNET_PYRAMID.OUT_CHANNELS", "0"],
     "MODEL.HRNET_PYRAMID.OUT_CHANNELS", "0"),
    ("zero pyramid levels", QUICKSTART, ["MODEL.HRNET_PYRAMID.NUM_LEVELS", "0"], "MODEL.HRNET_PYRAMID.NUM_LEVELS", "0"),
    ("pyramid input the body does not produce", QUICKSTART,
     ["MODEL.HRNET.OUT_FEATURES", "['hr2', 'hr3', 'hr4']"], "MODEL.HRNET_PYRAMID.IN_FEATURES", "'hr5'"),
    ("FREEZE_AT too large", QUICKSTART, ["MODEL.BACKBONE.FREEZE_AT", "6"], "MODEL.BACKBONE.FREEZE_AT", "6"),
    ("FREEZE_AT negative", QUICKSTART, ["MODEL.BACKBONE.FREEZE_AT", "-1"], "MODEL.BACKBONE.FREEZE_AT", "-1"),
    ("anchor sizes vs RPN levels", QUICKSTART, ["MODEL.ANCHOR_GENERATOR.SIZES", "[[16], [32], [64], [128]]"],
     "MODEL.ANCHOR_GENERATOR.SIZES", "[[16], [32], [64], [128]]"),
    ("anchor aspect ratios vs RPN levels", QUICKSTART, ["MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", "[[1.0], [0.5, 2.0]]"],
     "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", "[[1.0], [0.5, 2.0]]"),
    ("negative anchor size", QUICKSTART, ["MODEL.ANCHOR_GENERATOR.SIZES", "[[16], [32], [-64], [128], [256]]"],
     "MODEL.ANCHOR_GENERATOR.SIZES", "-64"),
    ("RPN level beyond the pyramid", QUICKSTART, ["MODEL.HRNET_PYRAMID.NUM_LEVELS", "4"], "MODEL.RPN.IN_FEATURES", "'p6'"),
    ("Detectron2's default ROI features", QUICKSTART, ["MODEL.ROI_HEADS.IN_FEATURES", "['res4']"],
     "MODEL.ROI_HEADS.IN_FEATURES", "'res4'"),
    ("ROI levels not consecutive", QUICKSTART, ["MODEL.ROI_HEADS.IN_FEATURES", "['p2', 'p4']"],
     "MODEL.ROI_HEADS.IN_FEATURES", "['p2', 'p4']"),
    ("RetinaNet level beyond the pyramid", RETINANET, ["MODEL.HRNET_PYRAMID.NUM_LEVELS", "5"],
     "MODEL.RETINANET.IN_FEATURES", "'p7'"),
    ("RetinaNet anchors vs levels", RETINANET, ["MODEL.RETINANET.IN_FEATURES", "['p3', 'p4', 'p5']"],
     "MODEL.ANCHOR_GENERATOR.SIZES", "[[16, 20.1587"),
    ("semantic head reads a pyramid level", SEMANTIC, ["MODEL.SEM_SEG_HEAD.IN_FEATURES", "['p2']"],
     "MODEL.SEM_SEG_HEAD.IN_FEATURES", "'p2'"),
    ("D2 FPN input the body does not produce", QUICKSTART,
     ["MODEL.BACKBONE.NAME", "build_hrnet_fpn_backbone", "MODEL.FPN.IN_FEATURES", "['hr2', 'hr3', 'res4']"],
     "MODEL.FPN.IN_FEATURES", "'res4'"),
    ("D2 FPN without inputs", QUICKSTART, ["MODEL.BACKBONE.NAME", "build_hrnet_fpn_backbone"], "MODEL.FPN.IN_FEATURES", "[]"),
    ("zero PIXEL_STD", QUICKSTART, ["MODEL.PIXEL_STD", "[58.4, 0.0, 57.4]"], "MODEL.PIXEL_STD", "[58.4, 0.0, 57.4]"),
    ("one-channel PIXEL_MEAN", QUICKSTART, ["MODEL.PIXEL_MEAN", "[120.0]", "MODEL.PIXEL_STD", "[58.0]"],
     "MODEL.PIXEL_MEAN", "[120.0]"),
    ("grayscale INPUT.FORMAT", QUICKSTART, ["INPUT.FORMAT", "L"], "INPUT.FORMAT", "'L'"),
    ("HTC: unknown mask ensemble", HTC, ["MODEL.HTC.MASK_TEST_STAGES", "average"], "MODEL.HTC.MASK_TEST_STAGES",
     "'average'"),
    ("HTC: loss weights for 2 of 3 stages", HTC, ["MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS", "(1.0, 0.5)"],
     "MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS", "[1.0, 0.5]"),
    ("HTC: semantic level not produced", HTC, ["MODEL.HTC.SEMANTIC.IN_FEATURES", "['p2', 'p7']"],
     "MODEL.HTC.SEMANTIC.IN_FEATURES", "'p7'"),
    ("HTC: fusion level not an input", HTC, ["MODEL.HTC.SEMANTIC.FUSION_FEATURE", "p6",
     "MODEL.HTC.SEMANTIC.IN_FEATURES", "['p2', 'p3']"], "MODEL.HTC.SEMANTIC.FUSION_FEATURE", "'p6'"),
    ("HTC: embedding narrower than the RoI features", HTC, ["MODEL.HTC.SEMANTIC.CONV_DIM", "32"],
     "MODEL.HTC.SEMANTIC.CONV_DIM", "32"),
    ("HTC: unknown fusion target", HTC, ["MODEL.HTC.SEMANTIC.FUSION", "['bbox', 'keypoint']"],
     "MODEL.HTC.SEMANTIC.FUSION", "'keypoint'"),
    ("FCOS level the pyramid does not produce", FCOS, ["MODEL.FCOS.IN_FEATURES", "['p2', 'p3']"],
     "MODEL.FCOS.IN_FEATURES", "'p2'"),
    ("FCOS regression activation", FCOS, ["MODEL.FCOS.REG_ACTIVATION", "softplus"], "MODEL.FCOS.REG_ACTIVATION", "'softplus'"),
    ("FCOS levels of unequal channels", FCOS, ["MODEL.BACKBONE.NAME", "build_hrnet_backbone", "MODEL.HRNET.OUT_FEATURES",
     "['hr2', 'hr3']", "MODEL.FCOS.IN_FEATURES", "['hr2', 'hr3']"], "MODEL.FCOS.IN_FEATURES", "['hr2', 'hr3']"),
    ("FCOS test convention", FCOS, ["MODEL.FCOS.TEST_CONVENTION", "mmdet"], "MODEL.FCOS.TEST_CONVENTION", "'mmdet'"),
    ("FCOS anchor offset", FCOS, ["MODEL.FCOS.ANCHOR_OFFSET", "1.5"], "MODEL.FCOS.ANCHOR_OFFSET", "1.5"),
    ("pyramid conv stride", FCOS, ["MODEL.HRNET_PYRAMID.CONV_STRIDE", "3"], "MODEL.HRNET_PYRAMID.CONV_STRIDE", "3"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_config_names_key_and_value(case):
    _, config, opts, key, value = case
    cfg = make_cfg(config, *opts)
    with pytest.raises(ValueError) as e:
        Trainer.build_model(cfg)
    message = str(e.value)
    assert key in message, message
    assert value in message, message
    assert "\n" not in message  # one clear line


def test_explicit_stages_equal_the_architecture_table():
    """The helper above builds a valid model: the cases fail because of their one change."""
    from detectron2.modeling import build_backbone

    a = build_backbone(make_cfg(QUICKSTART))
    b = build_backbone(make_cfg(QUICKSTART, *explicit_stages()))
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]


@pytest.mark.parametrize("config", YAML_CONFIGS)
def test_every_shipped_config_is_valid(config):
    shapes = validate_config(make_cfg(config))
    assert shapes


def test_config_is_checked_before_any_data_is_read(monkeypatch):
    from detectron2.data import DatasetCatalog

    def no_data(name):
        raise AssertionError(f"dataset {name} was read before the config was validated")

    monkeypatch.setattr(DatasetCatalog, "get", no_data)
    cfg = make_cfg(QUICKSTART, "MODEL.ANCHOR_GENERATOR.SIZES", "[[16], [32]]", "OUTPUT_DIR", "/nonexistent")
    with pytest.raises(ValueError, match="MODEL.ANCHOR_GENERATOR.SIZES"):
        Trainer(cfg)


def test_modules_name_their_own_arguments_and_validation_names_the_key():
    """HRNet / HRNetV2p speak in their arguments (as Detectron2's ResNet / FPN); the validation step
    reports the YAML key, and for a LazyConfig the path, that gave the argument."""
    from detectron2.config import LazyConfig, instantiate

    from hrnet_d2 import HRNet, HRNetV2p, get_config_file
    from hrnet_d2.config.validate import lazy_argument_errors
    from hrnet_d2.utils.errors import ConfigValueError

    with pytest.raises(ValueError, match=r"^HRNet: out_features = \['hr2', 'hr6'\] is invalid: 'hr6'") as e:
        HRNet(ARCHITECTURES["w18_small_v1"], out_features=["hr2", "hr6"])
    assert "MODEL." not in str(e.value) and not isinstance(e.value, ConfigValueError)
    body = HRNet(ARCHITECTURES["w18_small_v1"])
    with pytest.raises(ValueError, match=r"^HRNetV2p: inference_autocast = 'int8'") as e:
        HRNetV2p(body, ["hr2", "hr3"], inference_autocast="int8")
    assert "MODEL." not in str(e.value)

    cfg = LazyConfig.load(get_config_file("lazy/faster_rcnn_hrnetv2p_w32_1x.py"))
    cfg = LazyConfig.apply_overrides(cfg, ["model.backbone.bottom_up.stages.arch=w18_small_v1",
                                           "model.backbone.bottom_up.out_features=[hr2,hr6]"])  # fmt: skip
    with pytest.raises(ConfigValueError) as e, lazy_argument_errors(cfg.model):
        instantiate(cfg.model)
    assert str(e.value).startswith("model.backbone.bottom_up.out_features = ['hr2', 'hr6'] is invalid: 'hr6'")
    cfg = LazyConfig.apply_overrides(cfg, ["model.backbone.bottom_up.out_features=[hr2,hr3,hr4,hr5]",
                                           "model.backbone.pooling=MEDIAN"])  # fmt: skip
    with pytest.raises(ConfigValueError, match=r"^model\.backbone\.pooling = 'MEDIAN' is invalid"):
        with lazy_argument_errors(cfg.model):
            instantiate(cfg.model)
    cfg = LazyConfig.apply_overrides(cfg, ["model.backbone.pooling=AVG", "model.backbone.bottom_up.stages.arch=w99"])
    with pytest.raises(
        ConfigValueError, match=r"^model\.backbone\.bottom_up\.stages\.arch = 'w99' is invalid: allowed"
    ):
        with lazy_argument_errors(cfg.model):
            instantiate(cfg.model)
