"""train_net.py end to end, as users run it: train on generated data, evaluate a
checkpoint (twice: same metrics), and a clear early stop when COCO is not on disk."""

import json
import math
import re

import pytest
from conftest import REPO, run_train_net

pytestmark = pytest.mark.e2e

QUICKSTART = REPO / "configs" / "quickstart" / "mask_rcnn_hrnetv2p_w18_small_shapes.yaml"
# The quickstart config on the tiny splits: a few iterations, one process, one thread.
TINY = [
    "DATASETS.TRAIN", "('shapes_tiny_train',)",
    "DATASETS.TEST", "('shapes_tiny_val',)",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "4",
    "SOLVER.WARMUP_ITERS", "2",
    "SOLVER.STEPS", "(3,)",
    "INPUT.MIN_SIZE_TRAIN", "(96,)",
    "INPUT.MAX_SIZE_TRAIN", "96",
    "INPUT.MIN_SIZE_TEST", "96",
    "INPUT.MAX_SIZE_TEST", "96",
    "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
COPYPASTE = re.compile(r"copypaste: Task: (\w+)\n.*copypaste: ([\w,]+)\n.*copypaste: ([-\d.,na]+)\n")


def _metrics(output):
    """{task: {metric: value}} from Detectron2's ``copypaste:`` log lines."""

    def value(text):
        return None if text == "nan" else float(text)  # nan (no such objects) != nan

    return {
        task: dict(zip(names.split(","), map(value, values.split(","))))
        for task, names, values in COPYPASTE.findall(output)
    }


def _check(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-iteration quickstart run on the tiny splits; (output dir, env, log)."""
    tmp = tmp_path_factory.mktemp("e2e")
    env = dict(ENV, HRNET_D2_DATASETS=str(tmp / "datasets"))
    out = tmp / "train"
    log = _check(run_train_net(["--config-file", QUICKSTART, *TINY, "OUTPUT_DIR", out], env=env, timeout=600))
    return out, env, log


def test_train_writes_checkpoint_finite_losses_and_predictions(trained):
    out, _, log = trained
    assert (out / "model_final.pth").stat().st_size > 1e6
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    losses = [(k, v) for r in records for k, v in r.items() if "loss" in k]
    assert {k for k, _ in losses} >= {"total_loss", "loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls"}
    assert all(math.isfinite(v) for _, v in losses), losses
    assert max(r["iteration"] for r in records if "total_loss" in r) == 3  # MAX_ITER 4: iterations 0..3
    # evaluated at the end of training (bbox + segm) and predictions drawn
    assert set(_metrics(log)) == {"bbox", "segm"}
    assert any("bbox/AP" in r and "segm/AP" in r for r in records)
    assert (out / "predictions.png").stat().st_size > 0


def test_eval_only_is_deterministic(trained):
    out, env, _ = trained
    runs = []
    for k in range(2):
        eval_dir = out.parent / f"eval{k}"
        args = ["--config-file", QUICKSTART, "--eval-only", *TINY, "MODEL.WEIGHTS", out / "model_final.pth"]
        log = _check(run_train_net([*args, "OUTPUT_DIR", eval_dir], env=env, timeout=600))
        detections = json.loads((eval_dir / "inference" / "coco_instances_results.json").read_text())
        runs.append((_metrics(log), detections))
        assert (eval_dir / "predictions.png").is_file()
    (metrics_a, detections_a), (metrics_b, detections_b) = runs
    assert set(metrics_a) == {"bbox", "segm"}
    assert metrics_a == metrics_b
    # the barely trained model still makes detections (scores ~1/num_classes): compare them all
    assert len(detections_a) > 0
    assert detections_a == detections_b


def test_missing_coco_stops_before_building_a_model(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    config = REPO / "configs" / "COCO-InstanceSegmentation" / "mask_rcnn_hrnetv2p_w18_1x.yaml"
    proc = run_train_net(
        ["--config-file", config, "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "OUTPUT_DIR", tmp_path / "out"],
        env=dict(ENV, DETECTRON2_DATASETS=str(empty)),
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2
    assert str(empty / "coco" / "annotations" / "instances_train2017.json") in output
    assert str(empty / "coco" / "val2017") in output
    assert "DETECTRON2_DATASETS" in output and "quickstart" in output
    assert "GeneralizedRCNN(" not in output  # stopped before the model was built (and printed)
    assert "Traceback" not in output
    assert not (tmp_path / "out" / "model_final.pth").exists()
