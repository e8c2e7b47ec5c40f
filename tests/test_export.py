"""tools/export_model.py: TorchScript (tracing) and ONNX exports of the backbone+pyramid
and of whole Faster / Mask R-CNNs give PyTorch's outputs (onnxruntime on CPU)."""

import export_model
import pytest
import torch
from conftest import CONFIGS, assert_close_to_scale

from hrnet_d2 import get_hrnet_cfg

CONFIG = str(CONFIGS / "shapes/Base-HRNetV2p-shapes.yaml")  # Faster R-CNN, w18_small_v1
OPTS = ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128", "DATASETS.TEST", "('shapes_tiny_val',)"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def export(tmp_path, fmt, what, config=CONFIG):
    torch.manual_seed(0)
    path, diff = export_model.main(
        ["--config-file", config, "--format", fmt, "--what", what, "--output", str(tmp_path), "--opts", *OPTS]
    )
    return path, diff


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_backbone_export_matches_pytorch(tmp_path, fmt):
    path, diff = export(tmp_path, fmt, "backbone")
    assert diff < 5e-5  # max |exported - PyTorch| / max |PyTorch| per output
    # another batch size and image size than the traced one
    cfg = get_hrnet_cfg(CONFIG, OPTS)
    torch.manual_seed(0)
    model = export_model.load_model(cfg)
    module = export_model.BackboneOutputs(model.backbone).eval()
    x = torch.randn(2, 3, 64, 160)
    exported = export_model.run_exported(path, fmt, (x,))
    with torch.no_grad():
        reference = module(x)
    assert [e.shape for e in exported] == [tuple(r.shape) for r in reference]
    assert [e.shape[-1] for e in exported] == [40, 20, 10, 5, 2]  # p2..p6 of a 160-wide input (pooled, floor)
    for e, r in zip(exported, reference):
        assert_close_to_scale(e, r.numpy(), rtol=5e-5)


MASK_RCNN = str(CONFIGS / "shapes/mask_rcnn_hrnetv2p_w18_small_shapes.yaml")


@pytest.mark.parametrize(
    "config,fmt",
    [(CONFIG, "torchscript"), (CONFIG, "onnx"), (MASK_RCNN, "onnx")],
    ids=["faster-ts", "faster-onnx", "mask-onnx"],
)
def test_rcnn_export_matches_pytorch(tmp_path, config, fmt):
    path, diff = export(tmp_path, fmt, "model", config)
    assert diff < 1e-4
    cfg = get_hrnet_cfg(config, OPTS)
    torch.manual_seed(0)
    model = export_model.load_model(cfg)
    image = export_model.sample_image(cfg)
    adapter, inputs = export_model.traceable(model, "model", image)
    outputs = export_model.run_exported(path, fmt, inputs)
    # the flattened outputs are Instances fields: unflatten them as a user would
    with torch.no_grad():
        adapter(*inputs)  # sets outputs_schema
    instances = adapter.outputs_schema([torch.as_tensor(o) for o in outputs])[0]["instances"]
    with torch.no_grad():
        reference = export_model.raw_inference(model, [{"image": image}])[0]["instances"]
    assert len(instances) == len(reference) > 0
    assert_close_to_scale(instances.pred_boxes.tensor, reference.pred_boxes.tensor, rtol=5e-5)
    assert_close_to_scale(instances.scores, reference.scores, rtol=1e-4)
    assert torch.equal(instances.pred_classes, reference.pred_classes)
    if reference.has("pred_masks"):  # 28x28 ROI mask probabilities
        assert instances.pred_masks.shape[-2:] == (28, 28)
        assert_close_to_scale(instances.pred_masks, reference.pred_masks, rtol=1e-4)
    if fmt == "torchscript":
        assert (tmp_path / "model_ts_IR.txt").is_file()


def test_backbone_scripting_matches_pytorch(tmp_path):
    torch.manual_seed(0)
    path, diff = export_model.main(
        [
            "--config-file",
            CONFIG,
            "--export-method",
            "scripting",
            "--what",
            "backbone",
            "--output",
            str(tmp_path),
            "--opts",
            *OPTS,
        ]
    )
    assert diff < 1e-5
    scripted = torch.jit.load(path)
    cfg = get_hrnet_cfg(CONFIG, OPTS)
    torch.manual_seed(0)
    backbone = export_model.load_model(cfg).backbone
    x = torch.randn(2, 3, 70, 150)  # scripting keeps shapes dynamic: any batch / size (here not /32)
    with torch.no_grad():
        got, ref = scripted(x), backbone(x)
    assert list(got) == list(ref) == ["p2", "p3", "p4", "p5", "p6"]
    for k in ref:
        assert_close_to_scale(got[k], ref[k], rtol=5e-5, msg=k)


@pytest.mark.parametrize(
    "opts",
    [
        ["MODEL.HRNET_PYRAMID.POOLING", "MAX", "MODEL.HRNET_PYRAMID.SHARE_CONV", True],
        [
            "MODEL.BACKBONE.NAME",
            "build_hrnet_backbone",
            "MODEL.HRNET.OUT_FEATURES",
            ["hr2", "hr4", "hrv2"],
            "MODEL.HRNET.NORM",
            "BN",
            "MODEL.BACKBONE.FREEZE_AT",
            2,
        ],
        ["MODEL.BACKBONE.NAME", "build_hrnet_fpn_backbone", "MODEL.FPN.IN_FEATURES", ["hr2", "hr3", "hr4", "hr5"]],
        [
            "MODEL.BACKBONE.NAME",
            "build_hrnetv2p_with_body_backbone",
            "MODEL.HRNET.OUT_FEATURES",
            ["hr2", "hr3", "hr4", "hr5", "hrv2"],
        ],
    ],
    ids=["v2p-max-shared", "body-v1-v2", "fpn", "v2p-with-body"],
)
def test_every_backbone_variant_is_scriptable(opts):
    from detectron2.modeling import build_backbone

    cfg = get_hrnet_cfg(CONFIG, OPTS + opts)
    torch.manual_seed(0)
    backbone = build_backbone(cfg).eval()
    scripted = torch.jit.script(backbone)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        got, ref = scripted(x), backbone(x)
    assert list(got) == list(ref) and len(ref) > 0
    for k in ref:
        assert_close_to_scale(got[k], ref[k], rtol=5e-5, msg=k)


@pytest.mark.parametrize("config", [CONFIG, MASK_RCNN], ids=["faster", "mask"])
def test_rcnn_scripting_matches_pytorch(tmp_path, config):
    """Detectron2's scripting_with_instances on a whole HRNetV2p R-CNN."""
    torch.manual_seed(0)
    path, diff = export_model.main(
        ["--config-file", config, "--export-method", "scripting", "--output", str(tmp_path), "--opts", *OPTS]
    )
    assert diff < 1e-4
    cfg = get_hrnet_cfg(config, OPTS)
    torch.manual_seed(0)
    model = export_model.load_model(cfg)
    image = export_model.sample_image(cfg)
    scripted = torch.jit.load(path)
    with torch.no_grad():
        got = scripted.inference([{"image": image}], do_postprocess=False)[0]
        ref = model.inference([{"image": image}], do_postprocess=False)[0]
    assert len(got.pred_boxes.tensor) == len(ref) > 0
    assert_close_to_scale(got.pred_boxes.tensor, ref.pred_boxes.tensor, rtol=5e-5)
    assert torch.equal(got.pred_classes, ref.pred_classes)
    if ref.has("pred_masks"):
        assert_close_to_scale(got.pred_masks, ref.pred_masks, rtol=1e-4)
