"""The builders: each config check runs once per build, and the shapes validate_config
checks the heads against are the backbone's own ``output_shape()``."""

import pytest
from conftest import make_cfg

from detectron2.modeling import build_backbone

from hrnet_d2.config.validate import validate_config
from hrnet_d2.modeling import build as build_module

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
def test_each_check_runs_once_per_build(monkeypatch, name):
    calls = {"body": 0, "pyramid": 0}
    body, pyramid = build_module._check_body_keys, build_module._check_pyramid_keys

    def count_body(cfg):
        calls["body"] += 1
        return body(cfg)

    def count_pyramid(cfg):
        calls["pyramid"] += 1
        return pyramid(cfg)

    monkeypatch.setattr(build_module, "_check_body_keys", count_body)
    monkeypatch.setattr(build_module, "_check_pyramid_keys", count_pyramid)
    cfg = make_cfg("Base-RCNN-HRNetV2p.yaml", *SMALL, "MODEL.BACKBONE.NAME", name,
                   "MODEL.FPN.IN_FEATURES", ["hr2", "hr3", "hr4", "hr5"])  # fmt: skip
    if name == "build_hrnet_backbone":  # heads that read the body's outputs
        cfg.merge_from_list(["MODEL.META_ARCHITECTURE", "SemanticSegmentor", "MODEL.SEM_SEG_HEAD.IN_FEATURES", ["hr2"]])
    build_backbone(cfg)
    with_pyramid = "hrnetv2p" in name
    assert calls == {"body": 1, "pyramid": int(with_pyramid)}
    validate_config(cfg)  # one dry build on the meta device, no second pass
    assert calls == {"body": 2, "pyramid": 2 * int(with_pyramid)}


@pytest.mark.parametrize(
    "config",
    ["COCO-Detection/faster_rcnn_hrnetv2p_w18_1x.yaml", "shapes/semantic_hrnetv2_w18_small_shapes.yaml",
     "shapes/panoptic_fpn_hrnetv2p_w18_small_shapes.yaml"],
)  # fmt: skip
def test_validated_shapes_are_the_backbones_output_shape(config):
    cfg = make_cfg(config, *SMALL)
    assert validate_config(cfg) == build_backbone(cfg).output_shape()
