"""HRNetV2p pyramid and the body under Detectron2's FPN."""

import pytest
import torch
from conftest import make_cfg
from torch.nn import functional as F

from detectron2.modeling import build_backbone, build_model

SMALL = ("MODEL.HRNET.ARCH", "w18_small_v1")


def pyramid(*opts):
    return build_backbone(make_cfg("Base-RCNN-HRNetV2p.yaml", *SMALL, *opts)).eval()


def test_output_shape_is_p2_to_p6():
    model = pyramid()
    shapes = model.output_shape()
    assert list(shapes) == ["p2", "p3", "p4", "p5", "p6"]
    assert [s.stride for s in shapes.values()] == [4, 8, 16, 32, 64]
    assert {s.channels for s in shapes.values()} == {256}
    assert model.size_divisibility == 32


def test_odd_input_is_padded_by_the_model_and_shapes_follow_strides():
    cfg = make_cfg("COCO-Detection/faster_rcnn_hrnetv2p_w18_1x.yaml", *SMALL)
    model = build_model(cfg).eval()
    images = model.preprocess_image([{"image": torch.rand(3, 200, 249) * 255}])
    assert tuple(images.tensor.shape[-2:]) == (224, 256)
    with torch.no_grad():
        features = model.backbone(images.tensor)
        shapes = model.backbone.output_shape()
        for name, t in features.items():
            s = shapes[name].stride
            assert tuple(t.shape[-2:]) == (224 // s, 256 // s), name
            assert t.shape[1] == shapes[name].channels
        out = model([{"image": torch.rand(3, 200, 249) * 255}])
    assert out[0]["instances"].image_size == (200, 249)


def _manual_levels(model, x, pool):
    feats = model.bottom_up(x)
    xs = [feats[f] for f in model.in_features]
    size = xs[0].shape[-2:]
    cat = torch.cat([xs[0]] + [F.interpolate(t, size=size, mode="bilinear") for t in xs[1:]], 1)
    reduced = model.reduction_conv(cat)
    return [reduced] + [pool(reduced, 2**i, 2**i) for i in range(1, 5)]


@pytest.mark.parametrize("pooling, pool", [("AVG", F.avg_pool2d), ("MAX", F.max_pool2d)])
def test_pooling_types(pooling, pool):
    torch.manual_seed(0)
    model = pyramid("MODEL.HRNET_PYRAMID.POOLING", pooling)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        out = model(x)
        levels = _manual_levels(model, x, pool)
    for i, name in enumerate(["p2", "p3", "p4", "p5", "p6"]):
        torch.testing.assert_close(out[name], model.fpn_convs[i](levels[i]))


def test_avg_and_max_differ():
    torch.manual_seed(0)
    avg = pyramid("MODEL.HRNET_PYRAMID.POOLING", "AVG")
    mx = pyramid("MODEL.HRNET_PYRAMID.POOLING", "MAX")
    mx.load_state_dict(avg.state_dict())
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        a, b = avg(x), mx(x)
    torch.testing.assert_close(a["p2"], b["p2"])
    assert not torch.allclose(a["p4"], b["p4"])


def test_share_conv_uses_one_conv_for_every_level():
    torch.manual_seed(0)
    separate = pyramid()
    shared = pyramid("MODEL.HRNET_PYRAMID.SHARE_CONV", True)
    assert len(shared.fpn_convs) == 1 and len(separate.fpn_convs) == 5
    per_conv = sum(p.numel() for p in separate.fpn_convs[0].parameters())
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(separate) - n(shared) == 4 * per_conv
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        out = shared(x)
        levels = _manual_levels(shared, x, F.avg_pool2d)
    for i, name in enumerate(out):
        torch.testing.assert_close(out[name], shared.fpn_convs[0](levels[i]))


def test_num_levels_and_channels_are_configurable():
    model = pyramid("MODEL.HRNET_PYRAMID.NUM_LEVELS", 6, "MODEL.HRNET_PYRAMID.OUT_CHANNELS", 128)
    shapes = model.output_shape()
    assert list(shapes) == ["p2", "p3", "p4", "p5", "p6", "p7"]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 256, 256))
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == {
        k: (128, 256 // s.stride, 256 // s.stride) for k, s in shapes.items()
    }


def test_conv_stride_2_gives_p3_to_p7():
    """MODEL.HRNET_PYRAMID.CONV_STRIDE 2 (mmdetection's HRFPN stride=2, its HRNet FCOS): every level's 3x3 conv
    halves it once more, p3..p7 at strides 8..128, each the stride-1 level's conv output subsampled."""
    model = pyramid("MODEL.HRNET_PYRAMID.CONV_STRIDE", 2)
    shapes = model.output_shape()
    assert list(shapes) == ["p3", "p4", "p5", "p6", "p7"]
    assert [s.stride for s in shapes.values()] == [8, 16, 32, 64, 128]
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        out = model(x)
        dense = pyramid()
        dense.load_state_dict(model.state_dict())
        for conv in dense.fpn_convs:
            conv.stride = (1, 1)
        reference = dense(x)
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == {
        k: (256, 256 // s.stride, 256 // s.stride) for k, s in shapes.items()
    }
    for i, name in enumerate(shapes):  # a stride-2 conv = the stride-1 conv's output at every other position
        torch.testing.assert_close(out[name], reference[f"p{i + 2}"][..., ::2, ::2], rtol=1e-4, atol=1e-5)


def test_pyramid_on_a_subset_of_branches():
    model = pyramid("MODEL.HRNET_PYRAMID.IN_FEATURES", ["hr3", "hr4", "hr5"])
    shapes = model.output_shape()
    assert list(shapes) == ["p3", "p4", "p5", "p6", "p7"]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 128, 128))
    assert out["p3"].shape[-2:] == (16, 16)


def test_body_under_detectron2_fpn():
    cfg = make_cfg(
        "Base-RCNN-HRNetV2p.yaml",
        *SMALL,
        "MODEL.BACKBONE.NAME",
        "build_hrnet_fpn_backbone",
        "MODEL.FPN.IN_FEATURES",
        ["hr2", "hr3", "hr4", "hr5"],
    )
    model = build_backbone(cfg).eval()
    shapes = model.output_shape()
    assert [(k, v.stride) for k, v in shapes.items()] == [("p2", 4), ("p3", 8), ("p4", 16), ("p5", 32), ("p6", 64)]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 128, 128))
    assert all(out[k].shape[-1] == 128 // v.stride for k, v in shapes.items())
    # the body's keys sit under bottom_up. as for HRNetV2p, so converted weights load into both
    assert "bottom_up.stage4.0.fuse_layers.0.3.0.weight" in model.state_dict()


def test_pyramid_init_leaves_the_body_alone():
    torch.manual_seed(0)
    body = build_backbone(make_cfg("Base-RCNN-HRNetV2p.yaml", *SMALL, "MODEL.BACKBONE.NAME", "build_hrnet_backbone"))
    before = {k: v.clone() for k, v in body.state_dict().items()}
    from hrnet_d2 import HRNetV2p

    HRNetV2p(body, in_features=["hr2", "hr3", "hr4", "hr5"])
    assert all(torch.equal(before[k], v) for k, v in body.state_dict().items())


def test_inputs_smaller_than_the_coarsest_stride():
    model = pyramid("MODEL.HRNET_PYRAMID.NUM_LEVELS", 6)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 64))
    assert out["p7"].shape[-2:] == (1, 1) and out["p6"].shape[-2:] == (1, 1) and out["p2"].shape[-2:] == (8, 16)
