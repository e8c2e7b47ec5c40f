"""Interrupted training loses nothing: atomic checkpoints, SIGKILL + --resume, clear
errors for unreadable checkpoints, and NaN losses that stop training with the iteration."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import REPO, make_cfg, max_rel_err, run_train_net
from torch import nn

from hrnet_d2.checkpoint import AtomicCheckpointer, CheckpointError

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
CONFIG = REPO / "configs/quickstart/mask_rcnn_hrnetv2p_w18_small_shapes.yaml"
MAX_ITER = 26
PERIOD = 3
TINY = [
    "DATASETS.TRAIN", '("shapes_tiny_train",)', "DATASETS.TEST", '("shapes_tiny_val",)',
    "DATALOADER.NUM_WORKERS", "0", "SEED", "7",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.005", "SOLVER.WARMUP_ITERS", "4",
    "SOLVER.STEPS", "(12, 20)", "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.CHECKPOINT_PERIOD", str(PERIOD),
    "INPUT.MIN_SIZE_TRAIN", "(64, 80)", "INPUT.MAX_SIZE_TRAIN", "80", "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "64", "MODEL.MASK_ON", "False", "MODEL.HRNET_PYRAMID.OUT_CHANNELS", "32",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
]  # fmt: skip


def _train_cmd(out_dir, *extra):
    return [sys.executable, str(REPO / "train_net.py"), "--config-file", str(CONFIG), *extra, *TINY,
            "OUTPUT_DIR", str(out_dir)]  # fmt: skip


def _metrics(out_dir):
    with open(out_dir / "metrics.json") as f:
        return {r["iteration"]: r for r in map(json.loads, f) if "total_loss" in r}


def _last_checkpoint(out_dir):
    try:
        return (out_dir / "last_checkpoint").read_text().strip()
    except FileNotFoundError:
        return ""


def _assert_state_close(a, b, what):
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and max_rel_err(a, b) <= 1e-4, what
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            _assert_state_close(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_state_close(x, y, f"{what}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-6), what
    else:
        assert a == b, what


@pytest.mark.e2e
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    env = dict(os.environ, HRNET_D2_DATASETS=str(tmp_path / "datasets"), **ENV)
    full, killed = tmp_path / "full", tmp_path / "killed"

    # killed run: SIGKILL as soon as the first checkpoint is recorded, i.e. mid-run
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(_train_cmd(killed), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while not _last_checkpoint(killed) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    log.close()
    tagged = _last_checkpoint(killed)
    assert tagged.startswith("model_") and tagged != "model_final.pth", tagged
    assert not (killed / "model_final.pth").exists()
    resume_iter = int(tagged[len("model_") : -len(".pth")]) + 1
    assert resume_iter < MAX_ITER - 20  # the last 20-iteration loss window lies after the resume

    result = run_train_net(["--config-file", CONFIG, "--resume", *TINY, "OUTPUT_DIR", killed], env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Starting training from iteration {resume_iter}" in result.stderr + result.stdout

    result = run_train_net(["--config-file", CONFIG, *TINY, "OUTPUT_DIR", full], env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    # LR schedule and losses logged after the resume equal those of the uninterrupted run
    m_full, m_killed = _metrics(full), _metrics(killed)
    last = MAX_ITER - 1
    assert last in m_full and last in m_killed
    for it in m_killed:
        if it >= resume_iter:
            assert m_killed[it]["lr"] == pytest.approx(m_full[it]["lr"], rel=1e-9), it
    losses = [k for k in m_full[last] if k.startswith("loss_") or k == "total_loss"]
    assert len(losses) >= 5
    for k in losses:  # medians over iterations last-19 .. last, all after the resume
        assert m_killed[last][k] == pytest.approx(m_full[last][k], rel=1e-4, abs=1e-6), k

    # final weights, optimizer (momentum), scheduler and iteration are the same
    a = torch.load(full / "model_final.pth", map_location="cpu", weights_only=True)
    b = torch.load(killed / "model_final.pth", map_location="cpu", weights_only=True)
    assert a["iteration"] == b["iteration"] == last
    _assert_state_close(a["model"], b["model"], "model")
    # trainer state: iteration, LR scheduler (hooks), optimizer incl. momentum, RNG states
    assert a["trainer"]["hooks"]["LRScheduler"] and len(a["trainer"]["_trainer"]["optimizer"]["state"]) > 0
    _assert_state_close(a["trainer"], b["trainer"], "trainer")


class _Big(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.arange(1 << 20, dtype=torch.float32))


_KILL_DURING_SAVE = textwrap.dedent(
    """
    import sys, time, torch
    from test_interrupted_training import _Big
    from hrnet_d2.checkpoint import AtomicCheckpointer
    ckpt = AtomicCheckpointer(_Big(), {out!r})
    ckpt.save("model_0000000")
    real_save = torch.save
    def slow_save(obj, f, *a, **k):  # write half of the file, then hang until killed
        import io
        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        data = buf.getvalue()
        f.write(data[: len(data) // 2]); f.flush()
        print("HALF", flush=True)
        time.sleep(600)
    torch.save = slow_save
    ckpt.save("model_0000001")
    """
)


def _readline(proc, timeout):
    """The child's next stdout line ("" at its end), or None if none came within ``timeout`` seconds:
    a stuck child fails the test instead of hanging the suite (the caller kills it)."""
    import threading

    line = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return line[0] if line else None


def test_sigkill_during_save_leaves_no_truncated_checkpoint(tmp_path):
    code = _KILL_DURING_SAVE.format(out=str(tmp_path))
    env = dict(os.environ, **ENV, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = _readline(proc, timeout=180)
        assert line is not None, "the child printed nothing within 180 s (stuck before the save?)"
        assert line.strip() == "HALF"
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "model_0000001.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
    ckpt = AtomicCheckpointer(_Big(), str(tmp_path))
    assert ckpt.get_all_checkpoint_files() == [str(tmp_path / "model_0000000.pth")]
    ckpt.model.w.data.zero_()
    ckpt.resume_or_load("", resume=True)
    assert torch.equal(ckpt.model.w.data, torch.arange(1 << 20, dtype=torch.float32))


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ckpt = AtomicCheckpointer(_Big(), str(tmp_path))
    ckpt.save("model_0000000")

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save("model_0000001")
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000000.pth"]  # temp file removed
    assert ckpt.get_checkpoint_file() == str(tmp_path / "model_0000000.pth")
    assert oct(os.stat(tmp_path / "model_0000000.pth").st_mode & 0o777) != oct(0o600)


def test_atomic_path_for_any_writer(tmp_path, monkeypatch):
    """utils.file_io.atomic_path (the hrnet_d2:// download, converted checkpoints, dataset jsons):
    the target appears whole and fsynced or not at all; a stale temp file of a killed run is removed."""
    from hrnet_d2.utils import file_io

    synced = []
    fsync = os.fsync
    monkeypatch.setattr(file_io.os, "fsync", lambda fd: synced.append(fd) or fsync(fd))
    target = tmp_path / "model.pth"
    with pytest.raises(OSError, match="cut short"):
        with file_io.atomic_path(target) as tmp:
            assert not tmp.endswith(".pth") and os.path.dirname(tmp) == str(tmp_path)
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise OSError("download cut short")
    assert os.listdir(tmp_path) == []
    (tmp_path / ".model.pth.download").write_bytes(b"left by a killed run")
    with file_io.atomic_path(target, tmp_name=".model.pth.download") as tmp:
        assert not os.path.exists(tmp)
        with open(tmp, "wb") as f:
            f.write(b"whole")
    assert os.listdir(tmp_path) == ["model.pth"] and target.read_bytes() == b"whole" and synced
    file_io.atomic_write(target, lambda f: f.write("text"), mode="w")
    assert os.listdir(tmp_path) == ["model.pth"] and target.read_text() == "text"


@pytest.mark.parametrize("content", ["truncated", "garbage", "empty", "not_a_state_dict"])
def test_unreadable_checkpoint_error_names_the_file(tmp_path, content):
    good = AtomicCheckpointer(_Big(), str(tmp_path))
    good.save("model_0000004")
    path = tmp_path / "model_0000009.pth"
    if content == "truncated":
        data = (tmp_path / "model_0000004.pth").read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif content == "garbage":
        path.write_bytes(os.urandom(4096))
    elif content == "empty":
        path.write_bytes(b"")
    else:
        torch.save([1, 2, 3], path)
    (tmp_path / "last_checkpoint").write_text(path.name)  # as a non-atomic writer could leave it
    with pytest.raises(CheckpointError) as e:
        AtomicCheckpointer(_Big(), str(tmp_path)).resume_or_load("", resume=True)
    assert str(path) in str(e.value)
    assert "model_0000004.pth" in str(e.value)  # how to fall back is spelled out
    with pytest.raises(CheckpointError, match=str(path)):  # the same file as MODEL.WEIGHTS
        AtomicCheckpointer(_Big()).load(str(path))


def test_missing_weights_file_error_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.pth")):
        AtomicCheckpointer(_Big()).load(str(tmp_path / "nope.pth"))


def _tiny_trainer(tmp_path, *opts):
    from detectron2.data import DatasetCatalog

    from hrnet_d2.data.shapes import register_shapes
    from hrnet_d2.engine import Trainer

    (tmp_path / "out").mkdir()
    if "shapes_tiny_train" not in DatasetCatalog.list():
        register_shapes(tmp_path / "datasets")
    cfg = make_cfg("quickstart/mask_rcnn_hrnetv2p_w18_small_shapes.yaml", *TINY, "OUTPUT_DIR", str(tmp_path / "out"),
                   *opts)  # fmt: skip
    return Trainer(cfg)


def test_nan_loss_stops_training_naming_the_iteration(tmp_path):
    trainer = _tiny_trainer(tmp_path, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "100")
    # Detectron2's per-step finiteness check is on: metrics gathered every step, synchronously
    assert trainer._trainer.gather_metric_period == 1 and not trainer._trainer.async_write_metrics
    model = trainer._trainer.model
    forward = model.forward

    def nan_at_iteration_2(batched_inputs):
        losses = forward(batched_inputs)
        if trainer.iter == 2:
            losses["loss_cls"] = losses["loss_cls"] * float("nan")
        return losses

    model.forward = nan_at_iteration_2
    weights_before = None

    def remember(*args):
        nonlocal weights_before
        if trainer.iter == 2:
            weights_before = {k: v.clone() for k, v in model.state_dict().items()}

    trainer._trainer.after_backward = remember
    with pytest.raises(FloatingPointError, match=r"iteration=2\b"):
        trainer.train()
    assert trainer.iter == 2
    # stopped before the optimizer step: the NaN never reached the weights
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights_before.items())


def test_divergence_caught_outside_the_loss_check_names_the_iteration(tmp_path):
    trainer = _tiny_trainer(tmp_path, "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "100")
    rpn = trainer._trainer.model.proposal_generator
    rpn_forward = rpn.forward

    def diverged(*args, **kwargs):
        if trainer.iter == 1:
            raise FloatingPointError("Predicted boxes or scores contain Inf/NaN. Training has diverged.")
        return rpn_forward(*args, **kwargs)

    rpn.forward = diverged
    with pytest.raises(FloatingPointError, match=r"iteration=1\b.*Training has diverged"):
        trainer.train()
