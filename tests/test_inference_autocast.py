"""MODEL.HRNET.INFERENCE_AUTOCAST: the one switch that runs the HRNetV2p backbone in bf16 (or
fp16) at inference, wherever the model is used (DefaultPredictor, Trainer.test, demo.py)."""

import pytest
import torch
from conftest import tiny_rcnn_cfg

from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from hrnet_d2.config.validate import validate_config


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
