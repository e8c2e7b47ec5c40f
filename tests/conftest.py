import os
import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


REQUIRE_ORACLE = "HRNET_D2_REQUIRE_ORACLE"  # set by .ci/run: a missing oracle fails the run instead of skipping


def oracle_missing(reason):
    """Skip (module-level) for lack of a test oracle, or fail where ``$HRNET_D2_REQUIRE_ORACLE`` is set (CI)."""
    if os.environ.get(REQUIRE_ORACLE, "") not in ("", "0"):
        pytest.fail(f"{reason} ({REQUIRE_ORACLE} is set: this run requires the oracle)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def make_cfg(config_file=None, *opts):
    """A frozen-free Detectron2 config with our keys, merged from ``config_file`` (relative to configs/)."""
    from detectron2.config import get_cfg

    import hrnet_d2

    cfg = get_cfg()
    hrnet_d2.add_hrnet_config(cfg)
    if config_file is not None:
        cfg.merge_from_file(str(CONFIGS / config_file))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.merge_from_list(list(opts))
    return cfg


# a tiny Faster R-CNN on HRNetV2p-W18-small-v1 (32-channel pyramid, small heads, 3 classes)
TINY_RCNN_OPTS = (
    "MODEL.HRNET.ARCH", "w18_small_v1", "MODEL.HRNET_PYRAMID.OUT_CHANNELS", 32, "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64,
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 256, "MODEL.RPN.POST_NMS_TOPK_TEST", 64, "MODEL.RPN.PRE_NMS_TOPK_TEST", 256,
    "MODEL.ROI_HEADS.NUM_CLASSES", 3,
)  # fmt: skip


def tiny_rcnn_cfg(*opts):
    """The config of a tiny Faster R-CNN (see TINY_RCNN_OPTS), with ``opts`` merged last."""
    return make_cfg("COCO-Detection/faster_rcnn_hrnetv2p_w18_1x.yaml", *TINY_RCNN_OPTS, *opts)


@pytest.fixture(scope="module")
def timm_small():
    """timm hrnet_w18_small (= our w18_small_v1) with random weights and non-trivial BN statistics:
    an official / timm-layout ImageNet checkpoint for conversion and loading tests."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("hrnet_w18_small", pretrained=False).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


def _torch_threads(n):
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_torch_thread():
    """Run a test with one torch thread (small models: faster, and no oversubscription)."""
    yield from _torch_threads(1)


@pytest.fixture
def two_torch_threads():
    """Run a test with two torch threads (what the multi-threaded inference paths need to split work)."""
    yield from _torch_threads(2)


@pytest.fixture
def cfg_factory():
    return make_cfg


# torch's TCPStore when the port Detectron2's `--dist-url auto` picked (bound, then released) was taken
PORT_TAKEN = re.compile(r"EADDRINUSE|[Aa]ddress already in use")


def retry_if_port_taken(run, attempts=3):
    """``run()`` (a CompletedProcess) again, up to ``attempts`` times, while it failed only because
    another process took the free port ``--dist-url auto`` had picked and released."""
    for _ in range(attempts - 1):
        proc = run()
        if proc.returncode == 0 or not PORT_TAKEN.search(f"{proc.stdout}{proc.stderr}"):
            return proc
    return run()


def run_train_net(args, cwd=None, env=None, timeout=900):
    """Run train_net.py in a subprocess (as users do) and return the CompletedProcess
    (run again if ``--dist-url auto``'s port was taken meanwhile)."""
    import subprocess

    full_env = dict(os.environ, **(env or {}))
    return retry_if_port_taken(
        lambda: subprocess.run(
            [sys.executable, str(REPO / "train_net.py"), *map(str, args)],
            cwd=cwd or REPO,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    )


def max_rel_err(actual, expected):
    """max |actual - expected| / max |expected|, in float64 (0 for empty tensors)."""
    a, b = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    if b.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp_min(torch.finfo(torch.float32).tiny)).item()


def assert_close_to_scale(actual, expected, rtol, msg=""):
    """Same shape and max |actual - expected| <= rtol * max |expected|.

    The tolerance follows the tensors' scale, not an absolute number: float32 rounding
    differs between CPUs (AVX2, AVX-512, AMX accumulate in other orders), in proportion
    to the magnitudes involved.
    """
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = max_rel_err(actual, expected)
    assert err <= rtol, f"{msg} max|a-b|/max|b| = {err:.3g} > {rtol:g}"
