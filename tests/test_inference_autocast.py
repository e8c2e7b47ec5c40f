"""MODEL.HRNET.INFERENCE_AUTOCAST: the one switch that runs the HRNetV2p backbone in bf16 (or
fp16) at inference, wherever the model is used (DefaultPredictor, Trainer.test, demo.py)."""

import pytest
import torch
from conftest import tiny_rcnn_cfg

from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from hrnet_d2.config.validate import validate_config
from hrnet_d2.modeling.inference_autocast import autocast_heads


def _cfg(*opts):
    return tiny_rcnn_cfg("INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 128, *opts)


def _rel_l2(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _pair(dtype):
    torch.manual_seed(0)
    ref = build_model(_cfg()).eval()
    low = build_model(_cfg("MODEL.HRNET.INFERENCE_AUTOCAST", dtype)).eval()
    low.load_state_dict(ref.state_dict())
    return ref, low


def test_bf16_inference_switch_runs_the_backbone_in_bf16_and_hands_fp32_to_the_heads(one_torch_thread):
    ref, low = _pair("bf16")
    x = torch.randn(1, 3, 96, 128) * 50
    seen = []
    low.backbone.bottom_up.register_forward_hook(lambda m, i, o: seen.append(o["hr2"].dtype))
    with torch.no_grad():
        a, b = ref.backbone(x), low.backbone(x)
    assert seen == [torch.bfloat16], "the body must run under bf16 autocast"
    assert all(v.dtype == torch.float32 for v in b.values()), "the heads get fp32 features"
    errors = {k: _rel_l2(b[k], a[k]) for k in a}
    # bf16 has 8 mantissa bits: a few % relative L2 through a random-weight body (see
    # test_performance.test_bf16_autocast_forward_as_accurate_as_timm for the timm bound)
    assert 0 < max(errors.values()) < 0.15, errors


def test_inference_switch_leaves_training_in_fp32(one_torch_thread):
    ref, low = _pair("bf16")
    x = torch.randn(1, 3, 96, 128) * 50
    ref.train()
    low.train()
    a, b = ref.backbone(x), low.backbone(x)
    for k in a:
        assert b[k].dtype == torch.float32
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)


def test_inference_switch_works_through_default_predictor(one_torch_thread):
    cfg = _cfg("MODEL.HRNET.INFERENCE_AUTOCAST", "bf16")
    predictor = DefaultPredictor(cfg)
    seen = []
    predictor.model.backbone.bottom_up.register_forward_hook(lambda m, i, o: seen.append(o["hr2"].dtype))
    image = (torch.rand(96, 128, 3) * 255).to(torch.uint8).numpy()
    out = predictor(image)
    assert seen == [torch.bfloat16]
    assert out["instances"].pred_boxes.tensor.dtype == torch.float32


def test_inference_switch_value_is_checked():
    with pytest.raises(
        ValueError, match=r"MODEL.HRNET.INFERENCE_AUTOCAST = 'int8' is invalid: allowed: \['', 'bf16', 'fp16'\]"
    ):
        validate_config(_cfg("MODEL.HRNET.INFERENCE_AUTOCAST", "int8"))


# --- the heads under the switch (hrnet_d2/modeling/inference_autocast.py) ------------------------------------


def _mask_pair(dtype="bf16"):
    """A tiny Mask R-CNN (fp32) and its twin (same weights) with backbone and heads under ``dtype``."""
    torch.manual_seed(0)
    opts = ("MODEL.MASK_ON", True, "MODEL.ROI_MASK_HEAD.CONV_DIM", 32)
    ref = build_model(_cfg(*opts)).eval()
    low = build_model(_cfg(*opts, "MODEL.HRNET.INFERENCE_AUTOCAST", dtype)).eval()
    low.load_state_dict(ref.state_dict())
    assert autocast_heads(low, dtype) == [
        "proposal_generator.rpn_head.conv",
        "roi_heads.box_head.0",
        "roi_heads.mask_head.0.mask_fcn1",
        "roi_heads.mask_head.0.mask_fcn2",
        "roi_heads.mask_head.0.mask_fcn3",
        "roi_heads.mask_head.0.mask_fcn4",
        "roi_heads.mask_head.0.deconv",
    ]
    return ref, low


def _head_outputs(model, g):
    """RPN head, box head + predictor and mask head (layers) on the same fp32 inputs."""
    feats = [torch.randn(1, 32, s, s, generator=g) for s in (24, 12, 6, 3, 2)]
    pooled = torch.randn(20, 32, 7, 7, generator=g)
    mask_pooled = torch.randn(5, 32, 14, 14, generator=g)
    with torch.no_grad():
        logits, deltas = model.proposal_generator.rpn_head(feats)
        scores, box_deltas = model.roi_heads.box_predictor(model.roi_heads.box_head(pooled))
        masks = model.roi_heads.mask_head.layers(mask_pooled)
    return {
        "rpn_logits": logits,
        "rpn_deltas": deltas,
        "scores": [scores],
        "box_deltas": [box_deltas],
        "masks": [masks],
    }


def test_heads_conv_and_fc_layers_run_in_bf16_and_hand_back_fp32(one_torch_thread):
    ref, low = _mask_pair("bf16")
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = (output.dtype, torch.is_autocast_enabled("cpu"))

        return hook

    low.roi_heads.box_head.fc1.register_forward_hook(record("box fc1"))

    def record_input(name):
        def hook(module, inputs):
            seen[name] = inputs[0].dtype

        return hook

    low.roi_heads.mask_head.mask_fcn2.register_forward_pre_hook(record_input("mask in"))
    low.roi_heads.mask_head.deconv.register_forward_pre_hook(record_input("deconv in"))
    for name in ("anchor_deltas", "objectness_logits"):
        getattr(low.proposal_generator.rpn_head, name).register_forward_hook(record(name))
    low.roi_heads.box_predictor.bbox_pred.register_forward_hook(record("bbox_pred"))
    low.roi_heads.mask_head.predictor.register_forward_hook(record("mask predictor"))
    out, expected = (
        _head_outputs(low, torch.Generator().manual_seed(0)),
        _head_outputs(ref, torch.Generator().manual_seed(0)),
    )
    assert seen["box fc1"] == (torch.bfloat16, True), "the box head's FCs run in bf16"
    # the 1x1 RPN convs (objectness, deltas), the box predictor and the mask predictor stay fp32
    for name in ("anchor_deltas", "objectness_logits", "bbox_pred", "mask predictor"):
        assert seen[name] == (torch.float32, False), name
    # the mask convs hand fp32 to each other (autocast casts again inside)
    assert seen["mask in"] == torch.float32 and seen["deconv in"] == torch.float32
    for key, tensors in out.items():
        for a, b in zip(tensors, expected[key]):
            assert a.dtype == torch.float32
            err = _rel_l2(a, b)
            # bf16: 8 significant bits, a few tenths of a % per layer; fp32 would give ~1e-7
            assert 1e-5 < err < 0.03, (key, err)


def test_heads_switch_off_is_the_plain_path_and_training_is_untouched(one_torch_thread):
    ref, low = _mask_pair("bf16")
    autocast_heads(low, "")  # off again: the plain fp32 path, bit for bit
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a, b = _head_outputs(low, g1), _head_outputs(ref, g2)
    for key in a:
        for x, y in zip(a[key], b[key]):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    autocast_heads(low, "bf16")
    low.train()
    ref.train()
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a, b = _head_outputs(low, g1), _head_outputs(ref, g2)
    for key in a:
        for x, y in zip(a[key], b[key]):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_heads_under_bf16_keep_the_detections(one_torch_thread):
    """The whole tiny Mask R-CNN: detections under bf16 (backbone + heads) against fp32, given
    detections whose scores are spread (calibrate_detections): boxes stay fp32-decoded."""
    from hrnet_d2.engine.profiling import calibrate_detections

    ref, low = _mask_pair("bf16")
    g = torch.Generator().manual_seed(0)
    inputs = [{"image": torch.rand(3, 96, 128, generator=g) * 255, "height": 96, "width": 128}]
    calibrate_detections(ref, inputs, min_detections=10)
    low.load_state_dict(ref.state_dict())
    with torch.no_grad():
        a = ref(inputs)[0]["instances"]
        b = low(inputs)[0]["instances"]
    assert len(a) >= 10
    assert b.pred_boxes.tensor.dtype == torch.float32 and b.pred_masks.dtype == torch.bool
    from detectron2.structures import pairwise_iou

    iou = pairwise_iou(a.pred_boxes, b.pred_boxes)
    same = a.pred_classes[:, None] == b.pred_classes[None]
    matched = ((iou >= 0.9) & same).any(1).float().mean().item()
    assert matched >= 0.8, matched


def test_trainer_build_model_applies_the_heads_switch():
    from hrnet_d2.engine import Trainer

    model = Trainer.build_model(_cfg("MODEL.HRNET.INFERENCE_AUTOCAST", "bf16"))
    assert hasattr(model.proposal_generator.rpn_head.conv, "_hrnet_autocast_handles")
    plain = Trainer.build_model(_cfg())
    assert not hasattr(plain.proposal_generator.rpn_head.conv, "_hrnet_autocast_handles")
