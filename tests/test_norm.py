"""MODEL.HRNET.NORM "BNEval": the published models' norm (mmdetection ``norm_eval=True`` with
trainable affine terms): statistics frozen in training, weight/bias trained and
weight-decayed, folded at inference; the default of the COCO configs."""

import pytest
import torch
from conftest import CONFIGS, make_cfg

from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_backbone, build_model
from detectron2.solver import build_optimizer

from hrnet_d2 import ARCHITECTURES, HRNet
from hrnet_d2.modeling.layers import EvalBatchNorm2d

ARCH = ARCHITECTURES["w18_small_v1"]


def _net(norm):
    torch.manual_seed(0)
    net = HRNet(ARCH, norm=norm, out_features=["hr2", "hr3", "hr4", "hr5"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial statistics and affine terms
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return net


def _norm_stats(net):
    return {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}


def test_statistics_do_not_move_and_affine_terms_learn():
    net = _net("BNEval").train()
    norms = [m for m in net.modules() if isinstance(m, EvalBatchNorm2d)]
    assert norms and not any(m.training for m in norms) and net.training
    before = _norm_stats(net)
    x = torch.randn(2, 3, 64, 96)
    out = net(x)
    sum(v.square().mean() for v in out.values()).backward()
    after = _norm_stats(net)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.weight.requires_grad and m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in norms)
    assert all(m.bias.grad is not None and m.bias.grad.abs().sum() > 0 for m in norms)

    # oracle: in training it computes what FrozenBN computes with the same values;
    # negative control: plain BN in training (batch statistics) does not
    frozen = FrozenBatchNorm2d.convert_frozen_batchnorm(_net("BN")).train()
    plain = _net("BN").train()
    with torch.no_grad():
        ours, ref, bn = net(x), frozen(x), plain(x)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-4, atol=1e-5 * ref[k].abs().max().item())
    assert max(((bn[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref) > 1e-2


def test_folds_at_inference_and_keeps_bn_keys():
    net = _net("BNEval").eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert net.uses_fused_path(x)
        fast = net(x)
        net.inference_fuse = False
        ref = net(x)
    for k in ref:
        torch.testing.assert_close(fast[k], ref[k], rtol=1e-4, atol=1e-5 * ref[k].abs().max().item())
    # the state dict is BatchNorm's: official / timm BN checkpoints load strictly
    assert sorted(net.state_dict()) == sorted(_net("BN").state_dict())
    net.load_state_dict(_net("BN").state_dict(), strict=True)


def test_weight_decay_applies_to_the_affine_terms():
    cfg = make_cfg("COCO-Detection/faster_rcnn_hrnetv2p_w18_1x.yaml", "MODEL.HRNET.ARCH", "w18_small_v1")
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    norms = [m for m in model.backbone.bottom_up.modules() if isinstance(m, EvalBatchNorm2d)]
    assert norms
    assert {decay[id(m.weight)] for m in norms} == {decay[id(m.bias)] for m in norms} == {cfg.SOLVER.WEIGHT_DECAY}
    # one SGD step on zero gradients shrinks them by lr * weight decay
    weight = norms[0].weight.detach().clone()
    model.zero_grad(set_to_none=False)
    optimizer.step()
    factor = 1 - cfg.SOLVER.BASE_LR * cfg.SOLVER.WEIGHT_DECAY
    torch.testing.assert_close(norms[0].weight.detach(), weight * factor)


@pytest.mark.parametrize("config", sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.glob("COCO-*/*.yaml")))
def test_coco_configs_use_the_published_norm(config):
    cfg = make_cfg(config)
    assert cfg.MODEL.HRNET.NORM == "BNEval"
    assert cfg.SOLVER.WEIGHT_DECAY_NORM == cfg.SOLVER.WEIGHT_DECAY == 1e-4


@pytest.mark.parametrize(
    "config", ["quickstart/mask_rcnn_hrnetv2p_w18_small_shapes.yaml", "shapes/Base-HRNetV2p-shapes.yaml"]
)
def test_from_scratch_configs_keep_trainable_bn(config):
    cfg = make_cfg(config)
    assert cfg.MODEL.HRNET.NORM == "BN" and cfg.SOLVER.WEIGHT_DECAY_NORM == 0.0
    body = build_backbone(cfg).bottom_up
    assert not any(isinstance(m, EvalBatchNorm2d) for m in body.modules())


def test_converted_frozen_bn_weights_load_into_bneval(tmp_path):
    """hrnet_d2.convert writes FrozenBN-style body weights (no num_batches_tracked): the COCO
    configs' BNEval body takes them through Detectron2's checkpointer with nothing missing."""
    from detectron2.checkpoint import DetectionCheckpointer

    source = _net("FrozenBN")
    path = tmp_path / "body_d2.pth"
    torch.save({"model": {f"backbone.bottom_up.{k}": v for k, v in source.state_dict().items()}}, path)
    cfg = make_cfg("COCO-Detection/faster_rcnn_hrnetv2p_w18_1x.yaml", "MODEL.HRNET.ARCH", "w18_small_v1")
    model = build_model(cfg)
    checkpointer = DetectionCheckpointer(model)
    incompatible = checkpointer._load_model(torch.load(path))  # what load() does after reading the file
    body = model.backbone.bottom_up
    assert incompatible.missing_keys  # the heads are not in the file ...
    assert not [k for k in incompatible.missing_keys if k.startswith("backbone.bottom_up.")]  # ... the body all is
    for k, v in source.state_dict().items():
        assert torch.equal(body.state_dict()[k], v), k
