"""MODEL.WEIGHTS mistakes that Detectron2 only logs: foreign HRNet layouts are converted on
the fly, checkpoints that do not fit or fill the backbone stop (AtomicCheckpointer(cfg=...))."""

import logging

import pytest
import torch
from conftest import make_cfg

from detectron2.modeling import build_model

from hrnet_d2.checkpoint import AtomicCheckpointer, CheckpointError
from hrnet_d2.utils.errors import UserError

FASTER = "COCO-Detection/faster_rcnn_hrnetv2p_w18_1x.yaml"
SMALL = ("MODEL.HRNET.ARCH", "w18_small_v1")


@pytest.fixture(scope="module")
def official_pth(timm_small, tmp_path_factory):
    """The official HRNet-Image-Classification / timm layout: a plain state dict."""
    path = tmp_path_factory.mktemp("ckpt") / "hrnet_w18_small_model_v1.pth"
    torch.save(timm_small.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(1)
    cfg = make_cfg(FASTER, *SMALL)
    return cfg, build_model(cfg)


def _load(cfg, path, model=None):
    model = model if model is not None else build_model(cfg)
    AtomicCheckpointer(model, cfg=cfg).load(str(path))
    return model


def test_official_checkpoint_as_weights_is_converted(timm_small, official_pth, caplog):
    cfg = make_cfg(FASTER, *SMALL)
    with caplog.at_level(logging.INFO):
        model = _load(cfg, official_pth)
    assert "converted on the fly" in caplog.text and "w18_small_v1" in caplog.text
    sd = timm_small.state_dict()
    body = model.backbone.bottom_up
    assert torch.equal(body.conv1.weight, sd["conv1.weight"])
    assert torch.equal(body.stage4[0].branches[3][0].conv2.weight, sd["stage4.0.branches.3.0.conv2.weight"])
    # BN statistics too (timm_small's are not the init's zeros and ones, so equality means they were loaded)
    ours = body.state_dict()
    for name in ("layer1.0.bn1", "stage3.0.fuse_layers.0.1.1", "stage4.0.branches.3.0.bn2"):
        for stat, init in (("running_var", 1.0), ("running_mean", 0.0)):
            key = f"{name}.{stat}"
            assert not torch.equal(sd[key], torch.full_like(sd[key], init)), key
            assert torch.equal(ours[key], sd[key]), key
    # negative control: without the config (plain Detectron2 behaviour) the body stays random
    plain = build_model(cfg)
    AtomicCheckpointer(plain).load(str(official_pth))
    assert not torch.equal(plain.backbone.bottom_up.conv1.weight, sd["conv1.weight"])


def test_mmdetection_checkpoint_as_weights_is_converted(timm_small, tmp_path, caplog):
    cfg = make_cfg(FASTER, *SMALL)
    sd = {
        f"backbone.{k}": v
        for k, v in timm_small.state_dict().items()
        if not k.startswith(("incre", "downsamp", "final", "classifier"))
    }
    sd["neck.reduction_conv.conv.weight"] = torch.randn(256, 240, 1, 1)
    sd["neck.reduction_conv.conv.bias"] = torch.randn(256)
    for i in range(5):
        sd[f"neck.fpn_convs.{i}.conv.weight"] = torch.randn(256, 256, 3, 3)
        sd[f"neck.fpn_convs.{i}.conv.bias"] = torch.randn(256)
    # backbone + neck only (whole detectors: tests/test_mmdet_oracle.py converts them with their config)
    path = tmp_path / "mmdet.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": sd}, path)
    with caplog.at_level(logging.INFO):
        model = _load(cfg, path)
    assert "mmdetection" in caplog.text and "converted on the fly" in caplog.text
    assert torch.equal(model.backbone.bottom_up.conv2.weight, sd["backbone.conv2.weight"])
    assert torch.equal(model.backbone.reduction_conv.weight, sd["neck.reduction_conv.conv.weight"])
    assert torch.equal(model.backbone.fpn_convs[4].bias, sd["neck.fpn_convs.4.conv.bias"])


def test_official_checkpoint_of_another_width_stops(official_pth):
    cfg = make_cfg(FASTER)  # w18
    with pytest.raises(CheckpointError) as e:
        _load(cfg, official_pth)
    msg = str(e.value)
    assert isinstance(e.value, UserError)
    assert str(official_pth) in msg
    assert "found HRNet w18_small_v1" in msg and "expected w18 " in msg and "MODEL.HRNET.ARCH = 'w18'" in msg


def test_detectron2_checkpoint_of_another_width_stops(small_model, tmp_path):
    _, model = small_model
    path = tmp_path / "w18_small.pth"
    torch.save({"model": model.state_dict()}, path)
    with pytest.raises(
        CheckpointError, match=r"found HRNet w18_small_v1 .*expected w18_small_v2 .*MODEL.HRNET.ARCH = 'w18_small_v2'"
    ):
        _load(make_cfg(FASTER, "MODEL.HRNET.ARCH", "w18_small_v2"), path)


def test_other_pyramid_layout_stops(small_model, tmp_path):
    _, model = small_model
    path = tmp_path / "w18_small.pth"
    torch.save({"model": model.state_dict()}, path)
    with pytest.raises(
        CheckpointError, match=r"backbone.reduction_conv.weight: found \(256, 240, 1, 1\), expected \(128, 240, 1, 1\)"
    ):
        _load(make_cfg(FASTER, *SMALL, "MODEL.HRNET_PYRAMID.OUT_CHANNELS", "128"), path)
    # one pyramid level less in the checkpoint than in the config: p2..p6 vs p2..p7
    cfg = make_cfg(FASTER, *SMALL, "MODEL.HRNET_PYRAMID.NUM_LEVELS", "6")
    with pytest.raises(CheckpointError, match=r"pyramid tensors of the model are not in it, e.g. backbone.fpn_convs.5"):
        _load(cfg, path)


def test_partial_body_stops_unless_allowed(small_model, tmp_path, caplog):
    cfg, model = small_model
    sd = {k: v for k, v in model.state_dict().items() if ".stage4." not in k}
    path = tmp_path / "partial.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError) as e:
        _load(cfg, path)
    msg = str(e.value)
    assert "backbone.bottom_up.stage4." in msg and "would keep their random init" in msg
    assert "MODEL.HRNET.ALLOW_PARTIAL_WEIGHTS True" in msg
    allowed = make_cfg(FASTER, *SMALL, "MODEL.HRNET.ALLOW_PARTIAL_WEIGHTS", "True")
    with caplog.at_level(logging.WARNING):
        loaded = _load(allowed, path)
    assert "ALLOW_PARTIAL_WEIGHTS True" in caplog.text
    got = loaded.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items() if k.startswith("backbone."))


def test_checkpoint_without_the_body_stops(tmp_path):
    """E.g. a ResNet detector's weights: nothing of the HRNet body loads."""
    import torchvision

    cfg = make_cfg(FASTER, *SMALL)
    sd = {f"backbone.bottom_up.{k}": v for k, v in torchvision.models.resnet18().state_dict().items()}
    path = tmp_path / "resnet.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(
        CheckpointError,
        match=r"other shapes.*not in the model.*it fills \d+ of the 355 HRNet body tensors.*\d+ would keep their random init",
    ):
        _load(cfg, path)


def test_own_checkpoints_and_other_heads_load_unchanged(small_model, tmp_path):
    cfg, model = small_model
    path = tmp_path / "own.pth"
    torch.save({"model": model.state_dict(), "iteration": 3}, path)
    loaded = _load(cfg, path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # fine-tuning to another class count: the heads do not fit, which is normal
    other = make_cfg(FASTER, *SMALL, "MODEL.ROI_HEADS.NUM_CLASSES", "3")
    tuned = _load(other, path)
    assert torch.equal(tuned.backbone.reduction_conv.weight, model.backbone.reduction_conv.weight)


def test_inference_needs_the_whole_model(small_model, tmp_path, official_pth):
    """Evaluation / demo / export (complete=True): heads missing or of another class count stop."""
    cfg, model = small_model
    path = tmp_path / "own.pth"
    torch.save({"model": model.state_dict()}, path)
    AtomicCheckpointer(build_model(cfg), cfg=cfg, complete=True).load(str(path))  # a trained model: fine
    other = make_cfg(FASTER, *SMALL, "MODEL.ROI_HEADS.NUM_CLASSES", "3")
    with pytest.raises(CheckpointError, match=r"does not hold the whole model.*roi_heads.box_predictor.cls_score.weight: "
                                              r"found \(81, 1024\), expected \(4, 1024\)"):  # fmt: skip
        AtomicCheckpointer(build_model(other), cfg=other, complete=True).load(str(path))
    with pytest.raises(
        CheckpointError, match=r"26 tensors of the model are not in it, e.g. backbone.reduction_conv.weight"
    ):
        AtomicCheckpointer(build_model(cfg), cfg=cfg, complete=True).load(str(official_pth))  # ImageNet weights


def test_lazy_config_models_get_the_same_checks(timm_small, official_pth, tmp_path):
    """LazyConfig (lazy_train_net.py, demo.py): the HRNet is found in the model itself."""
    from detectron2.config import LazyConfig, instantiate

    from hrnet_d2 import get_config_file

    cfg = LazyConfig.load(get_config_file("lazy/mask_rcnn_hrnetv2p_w18_small_shapes.py"))
    model = instantiate(cfg.model)
    AtomicCheckpointer(model, cfg=cfg).load(str(official_pth))
    assert torch.equal(model.backbone.bottom_up.conv1.weight, timm_small.state_dict()["conv1.weight"])
    other = LazyConfig.apply_overrides(cfg, ["model.backbone.bottom_up.stages.arch=w18_small_v2"])
    with pytest.raises(
        CheckpointError, match=r"train.init_checkpoint .*found HRNet w18_small_v1 .*expected w18_small_v2"
    ):
        AtomicCheckpointer(instantiate(other.model), cfg=other).load(str(official_pth))
    path = tmp_path / "partial.pth"
    torch.save({"model": {k: v for k, v in model.state_dict().items() if ".stage4." not in k}}, path)
    with pytest.raises(CheckpointError, match=r"would keep their random init.*train.allow_partial_weights=True"):
        AtomicCheckpointer(model, cfg=cfg).load(str(path))
    allowed = LazyConfig.apply_overrides(cfg, ["train.allow_partial_weights=True"])
    AtomicCheckpointer(model, cfg=allowed).load(str(path))
