"""The GPU paths: folded inference, autocast (fp16 / bf16), activation checkpointing and
Detectron2's AMPTrainer (SOLVER.AMP.ENABLED) on CUDA.  Skipped where no GPU is visible
(CI has none); run with ``pytest tests/test_cuda.py`` on a machine that has one."""

import pytest
import torch
from conftest import assert_close_to_scale
from test_performance import _batch, _tiny_rcnn_cfg, rel_err, rel_l2
from timm_peer import body_state_dict, calibrated_timm, timm_branches

from detectron2.engine import AMPTrainer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from hrnet_d2 import ARCHITECTURES, HRNet
from hrnet_d2.modeling.pyramid import HRNetV2p

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 convs would blur the fp32 comparisons below; autocast tests are unaffected."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _ours_and_timm(arch, x, norm="FrozenBN", **kwargs):
    theirs = calibrated_timm(arch, x)
    ours = HRNet(ARCHITECTURES[arch], norm=norm, **kwargs)
    ours.load_state_dict(body_state_dict(theirs, keep_num_batches_tracked=False), strict=False)
    return ours.cuda(), theirs.cuda()


@pytest.mark.parametrize("arch", ["w18_small_v1", "w32"])
def test_folded_inference_matches_timm_on_cuda(arch):
    x = torch.randn(2, 3, 128, 192)
    ours, theirs = _ours_and_timm(arch, x)
    ours.eval()
    x = x.cuda()
    with torch.no_grad():
        assert ours.uses_fused_path(x)
        out = list(ours(x).values())
        ref = timm_branches(theirs, x)
    assert all(a.device.type == "cuda" for a in out)
    for a, b in zip(out, ref):
        assert a.shape == b.shape and rel_err(a, b) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_matches_timm_under_autocast_on_cuda(dtype):
    """Autocast moves our outputs from fp32 no further than it moves timm's.  (A randomly
    initialised W32 is chaotic: 0.4% input noise changes its fp32 outputs by ~15%, so the
    distance to fp32 alone is no yardstick; the oracle's own distance is.)"""
    x = torch.randn(1, 3, 256, 320)
    ours, theirs = _ours_and_timm("w32", x)
    ours.eval()
    theirs.eval()
    x = x.cuda()
    with torch.no_grad():
        ref_ours, ref_timm = list(ours(x).values()), timm_branches(theirs, x)
        with torch.autocast("cuda", dtype=dtype):
            amp_ours, amp_timm = list(ours(x).values()), timm_branches(theirs, x)
        pyramid = HRNetV2p(ours, ["hr2", "hr3", "hr4", "hr5"]).cuda().eval()
        with torch.autocast("cuda", dtype=dtype):
            levels = pyramid(x)
    assert all(y.dtype == dtype for y in amp_ours) and all(v.dtype == dtype for v in levels.values())
    for a, r, ta, tr in zip(amp_ours, ref_ours, amp_timm, ref_timm):
        assert rel_l2(a, r) <= 1.25 * rel_l2(ta, tr) + 1e-3, (rel_l2(a, r), rel_l2(ta, tr))


def test_activation_checkpoint_gradients_on_cuda():
    x = torch.randn(2, 3, 96, 128)
    plain, _ = _ours_and_timm("w18_small_v1", x, norm="BN", channels_last=True)
    ckpt, _ = _ours_and_timm("w18_small_v1", x, norm="BN", channels_last=True, activation_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x = x.cuda()
    for net in (plain, ckpt):
        net.train()
        sum((y.float() ** 2).mean() for y in net(x).values()).backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert_close_to_scale(q.grad, p.grad, rtol=1e-4, msg=name)
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers()):
        assert_close_to_scale(b, a, rtol=1e-5, msg=name)


def test_amp_trainer_trains_on_cuda():
    """SOLVER.AMP.ENABLED on CUDA is Detectron2's own AMPTrainer (fp16 + GradScaler)."""
    cfg = _tiny_rcnn_cfg("SOLVER.AMP.ENABLED", True, "MODEL.DEVICE", "cuda")
    model = build_model(cfg).train()
    assert next(model.parameters()).device.type == "cuda"
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    batch = _batch()
    trainer = AMPTrainer(model, [batch] * 4, optimizer)
    dtypes = []
    model.backbone.register_forward_hook(lambda m, i, o: dtypes.append(o["p2"].dtype))
    before = model.backbone.bottom_up.stage2[0].branches[0][0].conv1.weight.detach().clone()
    losses = []
    with EventStorage(0) as storage:
        for it in range(4):
            storage.iter = trainer.iter = it
            trainer.run_step()
            losses.append(storage.latest()["total_loss"][0])
    assert dtypes == [torch.float16] * 4
    assert all(torch.isfinite(torch.tensor(v)) for v in losses), losses
    after = model.backbone.bottom_up.stage2[0].branches[0][0].conv1.weight
    assert after.dtype == torch.float32 and not torch.equal(before, after)  # master weights stay fp32
