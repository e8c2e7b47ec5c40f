"""The builders and the config check: each check runs once per run (train_net.py validates
early, then the Trainer builds), and the shapes validate_config checks the heads against are
the backbone's own ``output_shape()``."""

import pytest
from conftest import CONFIGS, make_cfg

from detectron2.modeling import build_backbone

from hrnet_d2.config import validate as validate_module
from hrnet_d2.config.validate import validate_config
from hrnet_d2.engine import Trainer

SMALL = ("MODEL.HRNET.ARCH", "w18_small_v1")


@pytest.mark.parametrize(
    "name",
    [
        "build_hrnet_backbone",
        "build_hrnetv2p_backbone",
        "build_hrnetv2p_with_body_backbone",
        "build_hrnet_fpn_backbone",
    ],
)
def test_each_check_runs_once_per_run(monkeypatch, name):
    calls = {"body": 0, "pyramid": 0}
    body, pyramid = validate_module._check_body_keys, validate_module._check_pyramid_keys

    def count_body(cfg):
        calls["body"] += 1
        return body(cfg)

    def count_pyramid(cfg):
        calls["pyramid"] += 1
        return pyramid(cfg)

    monkeypatch.setattr(validate_module, "_check_body_keys", count_body)
    monkeypatch.setattr(validate_module, "_check_pyramid_keys", count_pyramid)
    cfg = make_cfg("Base-RCNN-HRNetV2p.yaml", *SMALL, "MODEL.BACKBONE.NAME", name,
                   "MODEL.FPN.IN_FEATURES", ["hr2", "hr3", "hr4", "hr5"])  # fmt: skip
    if name == "build_hrnet_backbone":  # heads that read the body's outputs
        cfg.merge_from_list(["MODEL.META_ARCHITECTURE", "SemanticSegmentor", "MODEL.SEM_SEG_HEAD.IN_FEATURES", ["hr2"]])
    with_pyramid = "hrnetv2p" in name
    validate_config(cfg)  # train_net.py's setup: the keys, then one dry build on the meta device
    assert calls == {"body": 1, "pyramid": int(with_pyramid)}
    build_backbone(cfg)  # the builders only read the config
    Trainer.build_model(cfg)  # validates the same config again: already done
    assert calls == {"body": 1, "pyramid": int(with_pyramid)}
    # negative control: a changed config is checked again
    cfg.MODEL.HRNET.STEM_CHANNELS = 32
    validate_config(cfg)
    assert calls == {"body": 2, "pyramid": 2 * int(with_pyramid)}


@pytest.mark.parametrize(
    "config",
    ["COCO-Detection/faster_rcnn_hrnetv2p_w18_1x.yaml", "shapes/semantic_hrnetv2_w18_small_shapes.yaml",
     "shapes/panoptic_fpn_hrnetv2p_w18_small_shapes.yaml"],
)  # fmt: skip
def test_validated_shapes_are_the_backbones_output_shape(config):
    cfg = make_cfg(config, *SMALL)
    assert validate_config(cfg) == build_backbone(cfg).output_shape()


def test_train_net_checks_the_config_once(monkeypatch, tmp_path):
    """train_net.py checks the config in setup (before any output or data); the Trainer's
    build_model, also on the copy auto_scale_workers scales to 2 processes, does not again."""
    import train_net

    calls = []
    body = validate_module._check_body_keys
    monkeypatch.setattr(validate_module, "_check_body_keys", lambda cfg: calls.append(1) or body(cfg))
    config = str(CONFIGS / "COCO-Detection/faster_rcnn_hrnetv2p_w18_1x.yaml")
    args = train_net.get_parser().parse_args(["--config-file", config, *SMALL, "MODEL.DEVICE", "cpu",
                                              "MODEL.WEIGHTS", "", "OUTPUT_DIR", str(tmp_path)])  # fmt: skip
    cfg = train_net.setup(args)
    assert len(calls) == 1
    scaled = Trainer.auto_scale_workers(cfg, 2)
    assert scaled is not cfg and scaled.SOLVER.IMS_PER_BATCH != cfg.SOLVER.IMS_PER_BATCH
    Trainer.build_model(scaled)
    assert len(calls) == 1
