"""Performance paths keep the numbers: folded/fused inference vs the timm oracle,
activation checkpointing vs plain backprop, bf16 autocast, CPU AMP training, benchmark."""
import json
import sys

import pytest
import timm
import torch
from detectron2.engine import SimpleTrainer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from hrnet_d2 import ARCHITECTURES, HRNet
from hrnet_d2.amp import CPUAMPTrainer, amp_trainer_for

from hrnet_d2.timm_peer import body_state_dict as timm_body_state_dict
from hrnet_d2.timm_peer import calibrated_timm, timm_branches

from conftest import REPO, assert_close_to_scale, make_cfg


def ours_from(timm_model, arch, **kwargs):
    sd = {k: v for k, v in timm_body_state_dict(timm_model).items() if not k.endswith("num_batches_tracked")}
    net = HRNet(ARCHITECTURES[arch], **kwargs)
    net.load_state_dict(sd, strict=kwargs.get("norm") != "FrozenBN")
    return net


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def rel_l2(a, b):
    """The bf16 tolerance measure: ||a - b|| / ||b|| (max-abs errors of bf16 are spiky)."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("arch,norm", [("w18_small_v1", "BN"), ("w18_small_v1", "FrozenBN"), ("w32", "FrozenBN")])
def test_fast_inference_path_matches_timm(arch, norm):
    x = torch.randn(2, 3, 64, 96)
    theirs = calibrated_timm(arch, x)
    ours = ours_from(theirs, arch, norm=norm).eval()
    with torch.no_grad():
        assert ours.folded(x) is not None, "eval + no_grad must take the folded path"
        out = list(ours(x).values())
        ref = timm_branches(theirs, x)
    for a, b in zip(out, ref):
        assert a.shape == b.shape
        assert rel_err(a, b) < 1e-4


def test_folding_never_leaks_into_training_or_state_dict():
    arch = "w18_small_v1"
    x = torch.randn(1, 3, 64, 64)
    theirs = calibrated_timm(arch, x)
    ours = ours_from(theirs, arch, norm="FrozenBN")
    keys = sorted(ours.state_dict())
    ours.eval()
    with torch.no_grad():
        first = ours(x)["hr2"]
    assert sorted(ours.state_dict()) == keys  # nothing folded is registered

    # weights loaded after the first (folded) forward are picked up
    other = calibrated_timm(arch, x * 2)
    for m in other.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.bias.data.add_(0.3)
    ours.load_state_dict({k: v for k, v in timm_body_state_dict(other).items() if "num_batches" not in k})
    with torch.no_grad():
        second = ours(x)["hr2"]
        ref = timm_branches(other, x)[0]
    assert rel_err(second, ref) < 1e-4 and rel_err(second, first) > 1e-2

    # training mode, or eval with gradients wanted, runs the autograd-able reference path
    ours.train()
    assert ours.folded(x) is None
    ours.eval()
    assert ours.folded(x) is None  # grad enabled and parameters require grad
    out = ours(x)["hr2"]
    out.sum().backward()
    assert ours.conv1.weight.grad is not None and ours.conv1.weight.grad.abs().sum() > 0
    assert rel_err(out.detach(), ref) < 1e-4

    # a norm that is not an affine map right now (a BN left in training mode) is never folded
    bn = ours_from(theirs, arch, norm="BN").eval()
    bn.layer1[0].bn2.train()
    with torch.no_grad():
        assert bn.folded(x) is None
        bn.layer1[0].bn2.eval()
        assert bn.folded(x) is not None


@pytest.mark.parametrize("channels_last", [True, False])
def test_layout_and_fuse_switches_agree(channels_last):
    arch = "w18_small_v1"
    x = torch.randn(1, 3, 64, 96)
    theirs = calibrated_timm(arch, x)
    ref = timm_branches(theirs, x)
    for fuse in (True, False):
        ours = ours_from(theirs, arch, norm="FrozenBN", channels_last=channels_last, inference_fuse=fuse).eval()
        with torch.no_grad():
            assert (ours.folded(x) is not None) == fuse
            out = list(ours(x).values())
        assert all(rel_err(a, b) < 1e-4 for a, b in zip(out, ref))
        assert out[0].is_contiguous(memory_format=torch.channels_last) == channels_last


def test_channels_last_at_inference_not_in_cpu_training():
    """MODEL.HRNET.CHANNELS_LAST: NHWC at inference; CPU training stays NCHW (faster there),
    and the parameters keep their layout either way (checkpoints are layout-free)."""
    net = HRNet(ARCHITECTURES["w18_small_v1"], norm="FrozenBN", channels_last=True)
    x = torch.randn(1, 3, 64, 96)
    assert all(p.is_contiguous() for p in net.parameters())
    y = net.train()(x)["hr2"]
    assert y.is_contiguous() and not y.is_contiguous(memory_format=torch.channels_last)
    y.sum().backward()
    assert net.conv1.weight.grad.is_contiguous()
    with torch.no_grad():
        y = net.eval()(x)["hr2"]
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()


def test_fast_path_odd_input_size_and_tracing():
    """Sizes that are not multiples of 32 (inexact upsampling ratios) take the same values;
    tracing (export) records the plain graph."""
    torch.manual_seed(0)
    net = HRNet(ARCHITECTURES["w18_small_v1"], norm="FrozenBN", out_features=["hr2", "hr5", "hrv2"]).eval()
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        fast = net(x)
        net.inference_fuse = False
        ref = net(x)
        net.inference_fuse = True
        traced = torch.jit.trace(net, x, strict=False)
    graph = str(traced.inlined_graph)
    assert "mkldnn" not in graph and "batch_norm" in graph
    for k in ref:
        assert fast[k].shape == ref[k].shape and rel_err(fast[k], ref[k]) < 1e-4, k


def _train_step(net, x):
    """Gradients, the input gradient, BN buffers after one step, and bytes saved for backward."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    net.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(x)
        loss = sum((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() for y in out.values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return grads, x.grad, {k: v.clone() for k, v in net.state_dict().items()}, sum(saved.values())


@pytest.mark.parametrize("norm", ["BN", "FrozenBN"])
def test_activation_checkpoint_same_gradients_less_memory(norm):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 96)
    plain = HRNet(ARCHITECTURES["w18_small_v1"], norm=norm, out_features=["hr2", "hr3", "hr4", "hr5", "hrv2"]).train()
    ckpt = HRNet(
        ARCHITECTURES["w18_small_v1"], norm=norm, out_features=["hr2", "hr3", "hr4", "hr5", "hrv2"],
        activation_checkpoint=True,
    ).train()
    ckpt.load_state_dict(plain.state_dict())
    g1, xg1, s1, mem1 = _train_step(plain, x)
    g2, xg2, s2, mem2 = _train_step(ckpt, x)
    assert g1.keys() == g2.keys() and len(g1) == len(list(plain.parameters()))
    for n in g1:
        assert_close_to_scale(g2[n], g1[n], rtol=1e-4, msg=n)
    assert_close_to_scale(xg2, xg1, rtol=1e-4)
    # BN running statistics (and batch counters) move once per step, not twice
    for k in s1:
        assert_close_to_scale(s2[k], s1[k], rtol=1e-5, msg=k)
    assert mem2 < 0.4 * mem1, (mem1, mem2)


def test_pyramid_activation_checkpoint_same_gradients_less_memory():
    """With HRNetV2p the stride-4 concatenation is recomputed too: same gradients and BN
    statistics (BN pyramid norm), and less kept for backward than checkpointing the body alone."""
    from hrnet_d2.pyramid import HRNetV2p

    def model(body_ckpt, pyramid_ckpt):
        torch.manual_seed(0)
        body = HRNet(ARCHITECTURES["w18_small_v1"], norm="BN", activation_checkpoint=body_ckpt)
        return HRNetV2p(body, ["hr2", "hr3", "hr4", "hr5"], norm="BN", activation_checkpoint=pyramid_ckpt).train()

    x = torch.randn(2, 3, 64, 96)
    g1, xg1, s1, mem_plain = _train_step(model(False, False), x)
    _, _, _, mem_body = _train_step(model(True, False), x)
    g2, xg2, s2, mem_both = _train_step(model(True, True), x)
    assert g1.keys() == g2.keys() and any(n.startswith("reduction_conv") for n in g1)
    for n in g1:
        assert_close_to_scale(g2[n], g1[n], rtol=1e-4, msg=n)
    assert_close_to_scale(xg2, xg1, rtol=1e-4)
    for k in s1:
        assert_close_to_scale(s2[k], s1[k], rtol=1e-5, msg=k)
    assert mem_both < mem_body < mem_plain, (mem_plain, mem_body, mem_both)


def test_bf16_autocast_forward_as_accurate_as_timm():
    """Our bf16 path (folded, fused) is no less accurate than timm's body under the same
    autocast: with random weights both are ~5-10% off fp32 in relative L2."""
    arch = "w18_small_v1"
    x = torch.randn(1, 3, 64, 96)
    theirs = calibrated_timm(arch, x)
    ours = ours_from(theirs, arch, norm="FrozenBN").eval()
    with torch.no_grad():
        ref, timm_ref = ours(x), timm_branches(theirs, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, timm_out = ours(x), timm_branches(theirs, x)
    for k, t_out, t_ref in zip(ref, timm_out, timm_ref):
        assert out[k].dtype == torch.bfloat16
        assert rel_l2(out[k], ref[k]) <= 1.1 * rel_l2(t_out, t_ref) + 1e-3, k
        assert rel_l2(out[k], ref[k]) < 0.15, k
    with torch.no_grad():
        fast = ours.folded(x)  # the folded convs cast their weights once per autocast dtype, then reuse them
    assert all(torch.bfloat16 in c._low and c._low[torch.bfloat16][0].dtype == torch.bfloat16 for c in fast.stem)
    ours.train()  # training forward/backward under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x)
    sum(v.float().sum() for v in y.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)


def _tiny_rcnn_cfg(*opts):
    return make_cfg(
        "COCO-Detection/faster_rcnn_hrnetv2p_w18_1x.yaml",
        "MODEL.HRNET.ARCH", "w18_small_v1", "MODEL.HRNET_PYRAMID.OUT_CHANNELS", 32,
        "MODEL.ROI_BOX_HEAD.FC_DIM", 64, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64, "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 256,
        "MODEL.RPN.POST_NMS_TOPK_TEST", 64, "MODEL.RPN.PRE_NMS_TOPK_TEST", 256,
        "MODEL.ROI_HEADS.NUM_CLASSES", 3, *opts,
    )


def _batch(n=2, h=96, w=128):
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(n):
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 30.0, 120.0, 90.0]]))
        inst.gt_classes = torch.tensor([0, 2])
        batch.append({"image": torch.rand(3, h, w, generator=g) * 255, "height": h, "width": w, "instances": inst})
    return batch


def test_faster_rcnn_trains_with_amp_on_cpu():
    cfg = _tiny_rcnn_cfg("SOLVER.AMP.ENABLED", True, "SOLVER.BASE_LR", 0.01)
    model = build_model(cfg).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    batch = _batch()
    plain = SimpleTrainer(model, [batch, batch], optimizer)  # what DefaultTrainer made
    trainer = amp_trainer_for(cfg, plain)  # swapped: AMP on a CPU model
    assert isinstance(trainer, CPUAMPTrainer) and trainer.model is model and trainer.optimizer is optimizer
    dtypes = []
    model.backbone.register_forward_hook(lambda m, i, o: dtypes.append(o["p2"].dtype))
    before = model.backbone.bottom_up.conv1.weight.detach().clone()
    with EventStorage(0) as storage:
        for it in range(2):
            storage.iter = it
            trainer.iter = it
            trainer.run_step()
        losses = storage.latest()["total_loss"][0]
    assert dtypes == [torch.bfloat16, torch.bfloat16]  # autocast was on
    assert torch.isfinite(torch.tensor(losses))
    assert not torch.equal(before, model.backbone.bottom_up.conv1.weight)
    assert amp_trainer_for(_tiny_rcnn_cfg(), plain) is plain  # AMP off: unchanged


def test_bf16_detector_features_match_fp32():
    """The bf16 inference path: the detector's pyramid features (what RPN and ROI heads see)
    stay within 15% (relative L2) of fp32 with random weights (see the test above)."""
    model = build_model(_tiny_rcnn_cfg()).eval()
    images = model.preprocess_image([{k: v for k, v in d.items() if k != "instances"} for d in _batch(1)])
    with torch.no_grad():
        ref = model.backbone(images.tensor)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.backbone(images.tensor)
            dets = model([{"image": _batch(1)[0]["image"]}])
    errors = {k: rel_l2(out[k], ref[k]) for k in ref}
    assert max(errors.values()) < 0.15, errors
    assert len(dets[0]["instances"]) > 0


def test_benchmark_quick(tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    import benchmark

    payload = benchmark.main(["--quick", "--output-dir", str(tmp_path)])
    data = json.loads((tmp_path / "benchmark.json").read_text())
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["cores"]
    measures = {r["measure"] for r in data["results"]}
    assert any("forward" in m for m in measures) and any("training" in m for m in measures)
    for r in payload["results"]:
        if "MiB" in r["measure"]:  # RSS may not grow at all for so small an input
            assert r["ours_s"] >= 0 and r["timm_s"] >= 0
        else:
            assert r["ours_s"] > 0 and r["timm_s"] > 0 and r["ratio"] == pytest.approx(r["ours_s"] / r["timm_s"])
    for r in data["results"]:
        if "max_rel_diff_fp32" in r:
            assert r["max_rel_diff_fp32"] < 1e-4
    assert "| measure |" in (tmp_path / "benchmark.md").read_text()
