"""ParallelROIAlign: the regions of one ROIAlign call on several CPU threads, the plain kernel's outputs bit for bit."""

import pytest
import torch
from conftest import tiny_rcnn_cfg

from detectron2.layers import ROIAlign
from detectron2.modeling import build_model
from detectron2.modeling.poolers import ROIPooler

from hrnet_d2.engine.trainer import Trainer
from hrnet_d2.modeling import roi_align as parallel
from hrnet_d2.modeling.roi_align import ParallelROIAlign, parallel_roi_align


def _rois(n, images, size, seed=0):
    """``n`` regions over ``images`` images of ``size`` (h, w), sizes from 2 px to most of the image."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h])
    wh = torch.rand(n, 2, generator=g) ** 3 * torch.tensor([w, h]) + 2
    idx = torch.randint(0, images, (n, 1), generator=g).float()
    return torch.cat([idx, xy, xy + wh], 1)


@pytest.mark.parametrize("sampling_ratio, aligned", [(0, True), (2, True), (0, False)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_parallel_roi_align_is_the_plain_kernel_bit_for_bit(sampling_ratio, aligned, channels_last, two_torch_threads):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 50, 84)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rois = _rois(300, 2, (200, 336))
    plain = ROIAlign((7, 7), 1 / 4, sampling_ratio, aligned)
    fast = ParallelROIAlign.from_roi_align(plain)
    calls = []
    real = parallel._executor
    parallel._executor = lambda n: calls.append(n) or real(n)
    try:
        with torch.no_grad():
            out, ref = fast(x, rois), plain(x, rois)
    finally:
        parallel._executor = real
    assert calls == [2], "two threads: the regions run in two chunks"
    assert out.shape == (300, 16, 7, 7)
    assert torch.equal(out, ref)


def test_chunks_split_the_work_and_their_order_matters(two_torch_threads):
    """Negative control: the equality above fails when the chunks come back in the wrong order; the
    chunks have about equal sampling work, not equal counts (large regions cost more)."""
    torch.manual_seed(0)
    x = torch.randn(1, 8, 50, 84)
    rois = _rois(200, 1, (200, 336))
    rois[:100, 3:] = rois[:100, 1:3] + 4  # the first half small, the second half large
    rois[100:, 3:] = rois[100:, 1:3] + 150
    bounds = parallel._chunk_bounds(rois, 2, (7, 7), 1 / 4, 0)
    assert bounds[0][0] == 0 and bounds[-1][1] == 200 and len(bounds) == 2
    assert bounds[0][1] > 100, bounds  # the small regions and a few large ones in the first chunk
    plain = ROIAlign((7, 7), 1 / 4, 0, True)
    ref = plain(x, rois)
    swapped = torch.cat([plain(x, rois[a:b]) for a, b in reversed(bounds)])
    assert not torch.equal(swapped, ref)


def test_training_and_one_thread_take_the_plain_path(one_torch_thread):
    x = torch.randn(1, 8, 32, 32, requires_grad=True)
    rois = _rois(100, 1, (128, 128))
    fast = ParallelROIAlign((7, 7), 1 / 4, 0)
    calls = []
    real = parallel._executor
    parallel._executor = lambda n: calls.append(n) or real(n)
    try:
        fast(x, rois).sum().backward()  # one thread here, and a gradient: plain either way
        torch.set_num_threads(2)
        fast(x, rois).sum().backward()
        assert calls == [], "the gradient path must be the plain kernel's"
        with torch.no_grad():
            fast(x, rois)
        assert calls == [2]
    finally:
        parallel._executor = real
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_parallel_roi_align_in_a_detector_gives_the_same_detections(two_torch_threads):
    cfg = tiny_rcnn_cfg(
        "INPUT.MIN_SIZE_TEST", 160, "INPUT.MAX_SIZE_TEST", 256, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = torch.rand(3, 160, 256) * 255
    with torch.no_grad():
        ref = model([{"image": image}])[0]["instances"]
    poolers = [m for m in model.modules() if isinstance(m, ROIPooler)]
    assert parallel_roi_align(model) == ["roi_heads.box_pooler"]
    assert all(type(p) is ParallelROIAlign for m in poolers for p in m.level_poolers)
    calls = []
    real = parallel._executor
    parallel._executor = lambda n: calls.append(n) or real(n)
    try:
        with torch.no_grad():
            out = model([{"image": image}])[0]["instances"]
    finally:
        parallel._executor = real
    assert calls, "some pyramid level must have had enough regions for the threads"
    assert len(ref) > 0
    assert torch.equal(out.pred_boxes.tensor, ref.pred_boxes.tensor)
    assert torch.equal(out.scores, ref.scores)
    assert parallel_roi_align(model, enabled=False) == ["roi_heads.box_pooler"]
    assert all(type(p) is ROIAlign for m in poolers for p in m.level_poolers)


def test_trainer_builds_detectors_with_parallel_roi_align():
    model = Trainer.build_model(tiny_rcnn_cfg())
    levels = model.roi_heads.box_pooler.level_poolers
    assert len(levels) > 0 and all(type(p) is ParallelROIAlign for p in levels)
    assert not any("roi_align" in k for k in model.state_dict()), "no new parameters or buffers"
