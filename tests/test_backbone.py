"""The HRNet body: official structure (timm oracle), honest output_shape, FREEZE_AT."""

import pytest
import timm
import torch
from conftest import make_cfg
from timm_peer import CLASSIFICATION_ONLY, TIMM_NAMES, timm_branches
from timm_peer import body_state_dict as timm_body_state_dict

from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_backbone

from hrnet_d2 import ARCHITECTURES, HRNet
from hrnet_d2.modeling.hrnet import branch_name


def test_table_covers_all_published_widths():
    assert set(ARCHITECTURES) == set(TIMM_NAMES)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_structure_matches_timm_and_output_shape_is_honest(arch):
    torch.manual_seed(0)
    ours = HRNet(ARCHITECTURES[arch], norm="BN", out_features=["hr2", "hr3", "hr4", "hr5", "hrv2"])
    theirs = timm.create_model(TIMM_NAMES[arch], pretrained=False)
    ref = timm_body_state_dict(theirs)
    mine = ours.state_dict()
    # same keys and shapes => same parameter count and weight-compatible with official checkpoints
    assert sorted(mine) == sorted(ref)
    assert all(mine[k].shape == ref[k].shape for k in ref)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_timm = sum(p.numel() for n, p in theirs.named_parameters() if n.split(".")[0] not in CLASSIFICATION_ONLY)
    assert n_ours == n_timm

    ours.eval()
    with torch.no_grad():
        out = ours(torch.randn(1, 3, 64, 96))
    shapes = ours.output_shape()
    assert list(out) == list(shapes) == ["hr2", "hr3", "hr4", "hr5", "hrv2"]
    for name, t in out.items():
        assert t.shape[1] == shapes[name].channels
        assert (t.shape[2], t.shape[3]) == (64 // shapes[name].stride, 96 // shapes[name].stride)
    assert [shapes[f"hr{i}"].stride for i in range(2, 6)] == [4, 8, 16, 32]
    assert shapes["hrv2"].channels == sum(shapes[f"hr{i}"].channels for i in range(2, 6))


@pytest.mark.parametrize("arch", ["w18_small_v1", "w18_small_v2", "w32"])
def test_numerical_parity_with_timm(arch):
    torch.manual_seed(0)
    theirs = timm.create_model(TIMM_NAMES[arch], pretrained=False).eval()
    # non-trivial BN statistics so that a wrong norm placement would show
    for m in theirs.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    ours = HRNet(ARCHITECTURES[arch], norm="BN").eval()
    result = ours.load_state_dict(timm_body_state_dict(theirs), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        expected = timm_branches(theirs, x)
        got = ours(x)
    assert len(got) == len(expected) == 4
    for i, e in enumerate(expected):
        # features reach ~100 here (random BN stats): fp32 rounding of the channels_last /
        # folded convs is ~1e-6 of that, so the absolute tolerance scales with the output
        torch.testing.assert_close(got[branch_name(i)], e, rtol=1e-4, atol=1e-5 * e.abs().max().item())


def test_frozen_bn_body_loads_timm_weights_and_matches():
    """The detection default norm (FrozenBN) gives the same features as eval-mode BN."""
    torch.manual_seed(0)
    theirs = timm.create_model("hrnet_w18_small", pretrained=False).eval()
    ours = HRNet(ARCHITECTURES["w18_small_v1"], norm="FrozenBN").eval()
    sd = {k: v for k, v in timm_body_state_dict(theirs).items() if not k.endswith("num_batches_tracked")}
    result = ours.load_state_dict(sd, strict=True)
    assert not result.missing_keys
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        for i, e in enumerate(timm_branches(theirs, x)):
            torch.testing.assert_close(ours(x)[branch_name(i)], e, rtol=1e-4, atol=1e-5 * e.abs().max().item())


def test_hrv2_is_the_concatenation_of_upsampled_branches():
    torch.manual_seed(0)
    model = HRNet(ARCHITECTURES["w18_small_v1"], norm="BN", out_features=["hr2", "hr3", "hr4", "hr5", "hrv2"]).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    manual = torch.cat(
        [out["hr2"]]
        + [torch.nn.functional.interpolate(out[f"hr{i}"], size=(16, 16), mode="bilinear") for i in (3, 4, 5)],
        1,
    )
    torch.testing.assert_close(out["hrv2"], manual)


def test_hrnetv1_is_the_stride4_branch_only():
    model = build_backbone(
        make_cfg(
            None,
            "MODEL.BACKBONE.NAME",
            "build_hrnet_backbone",
            "MODEL.HRNET.ARCH",
            "w18_small_v1",
            "MODEL.HRNET.OUT_FEATURES",
            ["hr2"],
        )
    )
    assert {k: (v.channels, v.stride) for k, v in model.output_shape().items()} == {"hr2": (16, 4)}
    assert list(model(torch.randn(1, 3, 64, 64))) == ["hr2"]
    assert model.size_divisibility == 32


def test_fusion_upsample_mode_is_configurable():
    torch.manual_seed(0)
    nearest = HRNet(ARCHITECTURES["w18_small_v1"], norm="BN", upsample_mode="nearest").eval()
    bilinear = HRNet(ARCHITECTURES["w18_small_v1"], norm="BN", upsample_mode="bilinear").eval()
    bilinear.load_state_dict(nearest.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = nearest(x)["hr2"], bilinear(x)["hr2"]
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_odd_input_sizes_run_on_the_bare_body():
    model = HRNet(ARCHITECTURES["w18_small_v1"], norm="BN").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 200, 249))
    assert out["hr2"].shape[-2:] == (50, 63) and out["hr5"].shape[-2:] == (7, 8)


# FREEZE_AT: 1 = stem, 2 = + layer1, 3 = + transition1/stage2, 4 = + transition2/stage3, 5 = + transition3/stage4
FREEZE_PREFIXES = {
    0: (),
    1: ("conv1.", "bn1.", "conv2.", "bn2."),
    2: ("conv1.", "bn1.", "conv2.", "bn2.", "layer1."),
    3: ("conv1.", "bn1.", "conv2.", "bn2.", "layer1.", "transition1.", "stage2."),
    4: ("conv1.", "bn1.", "conv2.", "bn2.", "layer1.", "transition1.", "stage2.", "transition2.", "stage3."),
    5: ("",),
}


@pytest.mark.parametrize("freeze_at", sorted(FREEZE_PREFIXES))
def test_freeze_at_freezes_exactly_the_documented_stages(freeze_at):
    cfg = make_cfg(
        None,
        "MODEL.BACKBONE.NAME",
        "build_hrnet_backbone",
        "MODEL.HRNET.ARCH",
        "w18_small_v1",
        "MODEL.HRNET.NORM",
        "BN",
        "MODEL.BACKBONE.FREEZE_AT",
        freeze_at,
    )
    model = build_backbone(cfg)
    prefixes = FREEZE_PREFIXES[freeze_at]

    def frozen(name):
        return any(name.startswith(p) for p in prefixes) if prefixes else False

    for name, p in model.named_parameters():
        assert p.requires_grad == (not frozen(name)), name
    norms = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d))}
    for name, m in norms.items():
        assert isinstance(m, FrozenBatchNorm2d) == frozen(name + "."), name

    # train mode: frozen statistics do not move, the others do; frozen params get no gradient
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    out = model(torch.randn(2, 3, 64, 64))
    loss = sum(v.float().pow(2).mean() for v in out.values())
    assert loss.requires_grad == (freeze_at < 5)
    if loss.requires_grad:
        loss.backward()
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]) == frozen(k), k
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (not frozen(name)), name
