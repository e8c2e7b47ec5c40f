"""MODEL.HRNET.INFERENCE_COMPILE: body + pyramid through torch.compile (inductor, freezing) at inference,
within float tolerance of the eager path, compiled again when the weights change."""

import pytest
import torch

from hrnet_d2 import ARCHITECTURES, HRNet
from hrnet_d2.modeling.pyramid import HRNetV2p


def _pair(seed=0):
    torch.manual_seed(seed)
    eager = HRNetV2p(
        HRNet(ARCHITECTURES["w18_small_v1"], norm="FrozenBN"), ["hr2", "hr3", "hr4", "hr5"], out_channels=32
    )
    compiled = HRNetV2p(
        HRNet(ARCHITECTURES["w18_small_v1"], norm="FrozenBN"),
        ["hr2", "hr3", "hr4", "hr5"],
        out_channels=32,
        inference_compile=True,
    )
    compiled.load_state_dict(eager.state_dict())
    return eager.eval(), compiled.eval()


def _rel(a, b):
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in b)


def test_compiled_inference_matches_eager_and_follows_weight_changes():
    eager, compiled = _pair()
    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        ref, out = eager(x), compiled(x)
        assert compiled._compiled is not None, "the compiled path must have run"
        assert _rel(out, ref) < 1e-4
        stale = compiled._compiled[1]
        for m in (eager, compiled):  # a weight written in place, as loading a checkpoint or an optimizer step does
            m.bottom_up.conv1.weight.mul_(1.5)  # the stem conv, whose norm freezing folds into it
        ref2 = eager(x)
        assert _rel(ref2, ref) > 1e-2, "the change must matter"
        # negative control: the graph compiled before the change still has the old weights frozen in
        assert _rel(stale(x), ref) < 1e-4
        out2 = compiled(x)  # the model notices the change and compiles again
        assert _rel(out2, ref2) < 1e-4


def test_training_and_gradients_do_not_compile():
    _, compiled = _pair()
    x = torch.randn(1, 3, 64, 64)
    compiled(x)  # eval mode, gradients on: the eager path
    compiled.train()
    compiled(x)
    assert compiled._compiled is None


def test_a_failing_compile_is_one_line(monkeypatch):
    """No C++ compiler (or any inductor failure): one line naming the switch, not inductor's page."""
    from hrnet_d2.utils.errors import UserError

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("C++ compile error\ng++: not found\n(many more lines)")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    _, compiled = _pair()
    with torch.no_grad(), pytest.raises(UserError) as info:
        compiled(torch.randn(1, 3, 64, 64))
    message = str(info.value)
    assert "\n" not in message and "MODEL.HRNET.INFERENCE_COMPILE" in message and "g++" not in message
