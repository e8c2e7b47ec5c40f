"""hrnet_d2.checkpoint.convert: official/timm/mmdetection checkpoints -> MODEL.WEIGHTS, and the refusals;
hrnet_d2.checkpoint.pretrained: a missing converted file stops training with the command that makes it."""

import copy
import os

import pytest
import torch
from conftest import REPO, assert_close_to_scale, make_cfg, max_rel_err, run_train_net
from safetensors.torch import save_file
from timm_peer import timm_branches

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from hrnet_d2.checkpoint.convert import ConversionError, convert_file, load_state_dict
from hrnet_d2.checkpoint.pretrained import PretrainedWeightsMissing, check_pretrained_weights, converted_weights_path
from hrnet_d2.convert import main

FASTER = "COCO-Detection/faster_rcnn_hrnetv2p_w18_1x.yaml"
SMALL = ("MODEL.HRNET.ARCH", "w18_small_v1")


@pytest.fixture(scope="module")
def official_pth(timm_small, tmp_path_factory):
    """The official HRNet-Image-Classification layout: a plain state dict in a .pth."""
    path = tmp_path_factory.mktemp("ckpt") / "hrnet_w18_small_model_v1.pth"
    torch.save(timm_small.state_dict(), path)
    return path


class _RecordingCheckpointer(DetectionCheckpointer):
    def _load_model(self, checkpoint):
        self.report = super()._load_model(checkpoint)
        return self.report


def _load_report(model, path):
    """What Detectron2's checkpointer reports when loading ``path`` (missing/unexpected keys)."""
    checkpointer = _RecordingCheckpointer(model)
    checkpointer.load(str(path))
    return checkpointer.report


@pytest.mark.e2e
def test_official_checkpoint_round_trip_into_faster_rcnn(timm_small, official_pth, tmp_path, capsys):
    out = tmp_path / "pretrained" / "w18_small_d2.pth"
    # the console script / python -m entry point, in-process (a subprocess only adds import time)
    rc = main([str(official_pth), str(out), "--config-file", str(REPO / "configs" / FASTER), "--opts", *SMALL])
    stdout = capsys.readouterr().out
    assert rc == 0
    assert "w18_small_v1" in stdout
    assert "Dropped" in stdout and "incre_modules" in stdout and "classifier" in stdout
    assert "Unexpected (not HRNet, left out) 0 tensors" in stdout

    cfg = make_cfg(FASTER, *SMALL, "MODEL.WEIGHTS", str(out))
    model = build_model(cfg).eval()
    report = _load_report(model, cfg.MODEL.WEIGHTS)
    assert not [k for k in report.missing_keys if k.startswith("backbone.bottom_up.")]
    assert not report.unexpected_keys and not report.incorrect_shapes
    # an ImageNet checkpoint has no pyramid or heads: those stay randomly initialised
    assert any(k.startswith("backbone.reduction_conv") for k in report.missing_keys)

    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        got = [model.backbone.bottom_up(x)[f"hr{i + 2}"] for i in range(4)]  # the folded inference path
        expected = timm_branches(timm_small, x)
        exact = timm_branches(copy.deepcopy(timm_small).double(), x.double())  # float64: the true values
        # negative control: timm with one BatchNorm's variance off by 0.1% (a near-miss conversion)
        near_miss = copy.deepcopy(timm_small)
        near_miss.stage4[0].branches[0][0].bn2.running_var.mul_(1.001)
        missed = timm_branches(near_miss, x)
    for g, e, t, m in zip(got, expected, exact, missed):
        # Tolerances follow the machine: our float32 error (vs float64) stays within a few times
        # timm's own float32 error on this CPU (both follow its rounding: AVX2, AVX-512, AMX) ...
        ours, timms = max_rel_err(g, t), max_rel_err(e, t)
        assert ours <= 8 * timms + 1e-7, (ours, timms)
        # ... and within 1e-5 of the features' scale of timm's float32 result
        assert_close_to_scale(g, e, rtol=1e-5)
    assert max_rel_err(got[0], missed[0]) > 10 * 1e-5  # the bound would catch a near miss


def test_timm_safetensors_gives_the_same_checkpoint(timm_small, official_pth, tmp_path):
    st = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in timm_small.state_dict().items()}, str(st))
    a = convert_file(str(official_pth), str(tmp_path / "a.pth"))
    b = convert_file(str(st), str(tmp_path / "b.pth"), arch="w18_small_v1")
    assert a.arch == b.arch == "w18_small_v1"
    assert a.state_dict.keys() == b.state_dict.keys()
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k
    # bare-body target: keys are backbone.<official key>
    c = convert_file(str(st), str(tmp_path / "c.pth"), backbone="build_hrnet_backbone")
    assert all(k.startswith("backbone.") and ".bottom_up." not in k for k in c.state_dict)


@pytest.mark.parametrize("layout", ["mmdet_v2", "hrnet_object_detection_v0"])
def test_mmdetection_backbone_and_neck(timm_small, tmp_path, layout):
    torch.manual_seed(1)
    cfg = make_cfg(FASTER, *SMALL)
    model = build_model(cfg).eval()
    sd = {
        f"backbone.{k}": v
        for k, v in timm_small.state_dict().items()
        if k.split(".")[0] not in ("incre_modules", "downsamp_modules", "final_layer", "classifier")
    }
    red = model.backbone.reduction_conv.weight
    neck = {}
    if layout == "mmdet_v2":  # ConvModule everywhere
        neck["neck.reduction_conv.conv.weight"] = torch.randn_like(red)
        neck["neck.reduction_conv.conv.bias"] = torch.randn(red.shape[0])
        for i in range(5):
            neck[f"neck.fpn_convs.{i}.conv.weight"] = torch.randn(256, 256, 3, 3)
            neck[f"neck.fpn_convs.{i}.conv.bias"] = torch.randn(256)
    else:  # HRNet-Object-Detection (mmdetection v0.x): Sequential reduction, plain fpn_conv list
        neck["neck.reduction_conv.0.weight"] = torch.randn_like(red)
        neck["neck.reduction_conv.0.bias"] = torch.randn(red.shape[0])
        for i in range(5):
            neck[f"neck.fpn_conv.{i}.weight"] = torch.randn(256, 256, 3, 3)
            neck[f"neck.fpn_conv.{i}.bias"] = torch.randn(256)
    sd.update(neck)  # detector heads: tests/test_mmdet_oracle.py
    src = tmp_path / "mmdet.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": sd}, src)

    out = tmp_path / "d2.pth"
    conv = convert_file(str(src), str(out), config_file=str(REPO / "configs" / FASTER), opts=SMALL)
    assert not conv.unexpected and conv.detector is None
    report = _load_report(model, out)
    assert not [k for k in report.missing_keys if k.startswith("backbone.")]
    assert not report.unexpected_keys and not report.incorrect_shapes
    reduction_key = next(k for k in neck if k.startswith("neck.reduction_conv") and k.endswith("weight"))
    assert torch.equal(model.backbone.reduction_conv.weight, neck[reduction_key])
    fpn4 = "neck.fpn_convs.4.conv.bias" if layout == "mmdet_v2" else "neck.fpn_conv.4.bias"
    assert torch.equal(model.backbone.fpn_convs[4].bias, neck[fpn4])


def test_refuses_a_checkpoint_that_is_not_hrnet(tmp_path):
    import torchvision

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ConversionError, match=r"resnet18\.pth: not an HRNet checkpoint"):
        convert_file(str(path), str(tmp_path / "out.pth"))
    assert not (tmp_path / "out.pth").exists()
    assert main([str(path), str(tmp_path / "out.pth")]) == 2


def test_refuses_a_width_the_config_does_not_expect(official_pth, tmp_path):
    with pytest.raises(ConversionError) as e:
        convert_file(str(official_pth), str(tmp_path / "out.pth"), config_file=str(REPO / "configs" / FASTER))
    msg = str(e.value)
    assert "found HRNet w18_small_v1" in msg and "expected w18 " in msg and "MODEL.HRNET.ARCH = 'w18'" in msg
    with pytest.raises(ConversionError, match="found HRNet w18_small_v1.*expected w48.*--arch w48"):
        convert_file(str(official_pth), str(tmp_path / "out.pth"), arch="w48")


def test_refuses_truncated_and_corrupt_files(official_pth, timm_small, tmp_path):
    data = official_pth.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="truncated or corrupt"):
        load_state_dict(str(truncated))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 100)
    with pytest.raises(ConversionError, match="truncated or corrupt"):
        load_state_dict(str(garbage))
    st = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in timm_small.state_dict().items()}, str(st))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(st.read_bytes()[:-1000])
    with pytest.raises(ConversionError, match="safetensors.*truncated or corrupt"):
        load_state_dict(str(cut))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ConversionError, match="empty"):
        load_state_dict(str(empty))


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_pickled_code_does_not_run(tmp_path):
    marker = str(tmp_path / "code-ran")
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(ConversionError, match="refusing to load"):
        load_state_dict(str(path))
    assert not os.path.exists(marker)


def test_missing_weights_check(tmp_path):
    cfg = make_cfg(FASTER)
    for harmless in ("", "detectron2://ImageNetPretrained/MSRA/R-50.pkl", "https://example.com/x.pth"):
        cfg.MODEL.WEIGHTS = harmless
        check_pretrained_weights(cfg)
    cfg.MODEL.WEIGHTS = str(tmp_path / converted_weights_path("w18"))
    with pytest.raises(PretrainedWeightsMissing) as e:
        check_pretrained_weights(cfg, config_file="my.yaml")
    assert e.value.exit_code == 2
    assert (
        f"python -m hrnet_d2.convert hrnetv2_w18_imagenet_pretrained.pth {cfg.MODEL.WEIGHTS} --config-file my.yaml"
        in str(e.value)
    )
    # resuming from a checkpoint in OUTPUT_DIR does not need the pretrained file
    cfg.OUTPUT_DIR = str(tmp_path)
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")
    check_pretrained_weights(cfg, resume=True)


def test_every_coco_config_names_its_converted_weights():
    for path in sorted((REPO / "configs").glob("COCO-*/*.yaml")):
        cfg = make_cfg(str(path.relative_to(REPO / "configs")))
        cfg.merge_from_file(str(path))  # make_cfg blanks MODEL.WEIGHTS; read the file's value
        if path.stem.endswith("_mmdet"):  # whole converted detectors (README "Converting mmdetection detectors")
            assert cfg.MODEL.WEIGHTS == "", path
        elif path.parent.name in ("COCO-Detection", "COCO-InstanceSegmentation"):
            assert cfg.MODEL.WEIGHTS == converted_weights_path(cfg.MODEL.HRNET.ARCH), path


@pytest.mark.e2e
def test_train_net_stops_at_once_when_pretrained_file_is_missing(tmp_path):
    proc = run_train_net(
        ["--config-file", REPO / "configs" / FASTER, "OUTPUT_DIR", tmp_path / "out", "MODEL.DEVICE", "cpu"],
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "pretrained/hrnetv2_w18_imagenet_d2.pth" in proc.stderr
    assert "python -m hrnet_d2.convert hrnetv2_w18_imagenet_pretrained.pth" in proc.stderr
    assert not (tmp_path / "out" / "model_final.pth").exists()


def _to_mmdet_layout(model):
    """A Detectron2 Faster R-CNN state dict (HRNetV2p backbone) in mmdetection 2.x/3.x names."""
    heads = {"proposal_generator.rpn_head.conv.": "rpn_head.rpn_conv.",
             "proposal_generator.rpn_head.objectness_logits.": "rpn_head.rpn_cls.",
             "proposal_generator.rpn_head.anchor_deltas.": "rpn_head.rpn_reg.",
             "roi_heads.box_head.fc1.": "roi_head.bbox_head.shared_fcs.0.",
             "roi_heads.box_head.fc2.": "roi_head.bbox_head.shared_fcs.1.",
             "roi_heads.box_predictor.cls_score.": "roi_head.bbox_head.fc_cls.",
             "roi_heads.box_predictor.bbox_pred.": "roi_head.bbox_head.fc_reg."}  # fmt: skip
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("backbone.bottom_up."):
            out["backbone." + k[len("backbone.bottom_up.") :]] = v
        elif k.startswith(("backbone.reduction_conv.", "backbone.fpn_convs.")):
            name, _, param = k[len("backbone.") :].rpartition(".")
            out[f"neck.{name}.conv.{param}"] = v
        else:
            d2 = next(p for p in heads if k.startswith(p))
            out[heads[d2] + k[len(d2) :]] = v
    return out


def test_mmdetection_detector_into_the_with_body_backbone(tmp_path, monkeypatch):
    """build_hrnetv2p_with_body_backbone has the HRNetV2p pyramid: the HRFPN neck and the heads of an
    mmdetection checkpoint are kept, and the conversion fills the whole model."""
    from hrnet_d2.checkpoint.convert import convert_state_dict
    from hrnet_d2.modeling import build as backbones

    name = "build_hrnetv2p_with_body_backbone"
    torch.manual_seed(2)
    model = build_model(make_cfg(FASTER, *SMALL, "MODEL.BACKBONE.NAME", name)).eval()
    mmdet = _to_mmdet_layout(model)
    assert any(k.startswith("neck.") for k in mmdet) and any(k.startswith("roi_head.") for k in mmdet)

    def fills(conv):
        report = model.load_state_dict(conv.state_dict, strict=False)
        return [k for k in report.missing_keys if not k.endswith("num_batches_tracked")]

    conv = convert_state_dict(mmdet, backbone=name)
    assert not conv.unexpected and not [k for k, _ in conv.dropped if not k.endswith("num_batches_tracked")]
    assert fills(conv) == []
    for k, v in model.state_dict().items():
        if k in conv.state_dict:
            assert torch.equal(conv.state_dict[k], v), k
    # negative control: the old rule (only build_hrnetv2p_backbone has a pyramid) drops neck and heads
    monkeypatch.setitem(backbones.BACKBONES, name, backbones.BACKBONES[name]._replace(hrnetv2p=False))
    old = convert_state_dict(mmdet, backbone=name)
    assert any(k.startswith("neck.") for k, _ in old.dropped)
    assert any(k.startswith("backbone.reduction_conv") for k in fills(old))
    assert any(k.startswith("roi_heads.") for k in fills(old))


def test_backbone_table_names_every_registered_builder():
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone import BACKBONE_REGISTRY

    import hrnet_d2
    from hrnet_d2.modeling.build import BACKBONES, backbone_name

    for name in BACKBONES:
        assert BACKBONE_REGISTRY.get(name) is getattr(hrnet_d2, name)
        cfg = make_cfg(
            FASTER, *SMALL, "MODEL.BACKBONE.NAME", name, "MODEL.FPN.IN_FEATURES", ["hr2", "hr3", "hr4", "hr5"]
        )
        with torch.device("meta"):
            backbone = BACKBONE_REGISTRY.get(name)(cfg, ShapeSpec(channels=3))
        assert backbone_name(backbone) == name
    registered = {n for n, _ in BACKBONE_REGISTRY if getattr(hrnet_d2, n, None) is BACKBONE_REGISTRY.get(n)}
    assert registered == set(BACKBONES)
