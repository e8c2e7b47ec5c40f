"""One clear line at the command line: each user mistake ends train_net.py,
lazy_train_net.py, demo.py and the tools with ``error: <message>`` and exit status 2,
without a traceback; ``--debug`` (or HRNET_D2_DEBUG=1) shows the traceback."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_train_net

QUICKSTART = REPO / "configs" / "quickstart" / "mask_rcnn_hrnetv2p_w18_small_shapes.yaml"
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# a CUDA device this machine does not have, whether or not it has CUDA
MISSING_CUDA = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


def _run(script, args, tmp_path, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)],
        cwd=tmp_path,
        env=dict(os.environ, HRNET_D2_DATASETS=str(tmp_path / "datasets"), **ENV, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _one_line_error(proc, *expected):
    """Exit 2, the message on stderr after ``error:``, no traceback."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors, proc.stderr[-3000:]
    for text in expected:
        assert text in proc.stderr, proc.stderr[-3000:]
    return errors[0]


@pytest.mark.e2e
def test_config_mistake_is_one_line_and_debug_shows_the_traceback(tmp_path):
    args = ["--config-file", QUICKSTART, "MODEL.HRNET.ARCH", "w19", "OUTPUT_DIR", tmp_path / "out"]
    line = _one_line_error(run_train_net(args, cwd=tmp_path, env=ENV, timeout=300))
    assert line.startswith("error: MODEL.HRNET.ARCH = 'w19' is invalid: allowed: ["), line
    assert not (tmp_path / "datasets").exists()  # stopped before generating any data
    debug = run_train_net(["--debug", *args], cwd=tmp_path, env=ENV, timeout=300)
    assert (
        debug.returncode != 0
        and "Traceback" in debug.stderr
        and ("ConfigError" in debug.stderr or "ConfigValueError" in debug.stderr)
    )


def test_exit_on_user_error_in_process(monkeypatch, capsys):
    from hrnet_d2.utils.errors import ConfigError, debug_enabled, exit_on_user_error

    def fail():
        raise ConfigError("MODEL.X = 1 is invalid: allowed: 2")

    monkeypatch.delenv("HRNET_D2_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        exit_on_user_error(fail)
    assert e.value.code == 2 and capsys.readouterr().err == "error: MODEL.X = 1 is invalid: allowed: 2\n"
    monkeypatch.setenv("HRNET_D2_DEBUG", "1")
    assert debug_enabled([])
    with pytest.raises(ConfigError):  # the traceback, as asked
        exit_on_user_error(fail)
    monkeypatch.setenv("HRNET_D2_DEBUG", "0")
    assert not debug_enabled([]) and debug_enabled(["x.py", "--debug"])
    with pytest.raises(RuntimeError):  # not a user mistake: untouched
        exit_on_user_error(lambda: (_ for _ in ()).throw(RuntimeError("bug")))


@pytest.mark.e2e
def test_cuda_device_that_does_not_exist(tmp_path):
    """train_net.py: see the --num-gpus 2 test below; here lazy_train_net.py."""
    lazy = _run("lazy_train_net.py", ["--config-file", REPO / "configs/lazy/mask_rcnn_hrnetv2p_w18_small_shapes.py",
                                      f"train.device={MISSING_CUDA}"], tmp_path)  # fmt: skip
    assert f"train.device = '{MISSING_CUDA}' is invalid" in _one_line_error(lazy)


@pytest.mark.e2e
def test_worker_processes_exit_2_without_a_traceback_wall(tmp_path):
    """With --num-gpus 2 the mistake is raised in spawned workers: one line each, exit 2."""
    args = ["--num-gpus", "2", "--dist-url", "auto", "--config-file", QUICKSTART,
            "MODEL.DEVICE", MISSING_CUDA, "OUTPUT_DIR", tmp_path / "out"]  # fmt: skip
    proc = run_train_net(args, cwd=tmp_path, env=ENV, timeout=300)
    line = _one_line_error(proc, "is invalid")
    assert proc.stderr.count("error: ") == 1, proc.stderr[-3000:]  # said once, not once per process
    assert f"MODEL.DEVICE = '{MISSING_CUDA}' is invalid" in line and "available: ['cpu'" in line, line
    assert "ProcessExitedException" not in proc.stderr


@pytest.mark.e2e
def test_checkpoint_of_another_width_stops_before_training(tmp_path):
    import timm

    weights = tmp_path / "hrnetv2_w18_imagenet_pretrained.pth"
    torch.save(timm.create_model("hrnet_w18", pretrained=False).state_dict(), weights)
    args = ["--config-file", QUICKSTART, "MODEL.WEIGHTS", weights, "OUTPUT_DIR", tmp_path / "out",
            "DATASETS.TRAIN", "('shapes_tiny_train',)", "DATASETS.TEST", "()", "DATALOADER.NUM_WORKERS", "0"]  # fmt: skip
    line = _one_line_error(run_train_net(args, cwd=tmp_path, env=ENV, timeout=300))
    assert "found HRNet w18 (branch widths 18/36/72/144)" in line and "expected w18_small_v1" in line, line
    assert not (tmp_path / "out" / "model_final.pth").exists()


def _coco(root, categories=("a", "b", "c", "d"), bad_box=False):
    """A 2-image COCO json (boxes only) and its images; returns (json path, image dir)."""
    import numpy as np
    from PIL import Image

    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    data = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(categories)]}
    for i in range(2):
        Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(images_dir / f"{i}.png")
        data["images"].append({"id": i + 1, "file_name": f"{i}.png", "height": 64, "width": 64})
        data["annotations"].append({"id": 10 + i, "image_id": i + 1, "category_id": 1, "bbox": [8, 8, 20, 0 if bad_box and i else 20],
                                    "area": 400, "iscrowd": 0})  # fmt: skip
    path = root / "ann.json"
    path.write_text(json.dumps(data))
    return path, images_dir


@pytest.mark.e2e
def test_data_mistakes_through_dataset_argument(tmp_path):
    ann, images = _coco(tmp_path / "bad", bad_box=True)
    base = ["--config-file", QUICKSTART, "--dataset", f"mine={ann}:{images}", "DATASETS.TRAIN", "('mine',)",
            "DATASETS.TEST", "()", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", tmp_path / "out"]  # fmt: skip
    line = _one_line_error(run_train_net(base, cwd=tmp_path, env=ENV, timeout=300))
    assert f"annotation file {ann}: annotation id=11" in line and "non-positive width/height" in line, line

    ann3, images3 = _coco(tmp_path / "three", categories=("a", "b", "c"))
    # the class count follows the data unless given on the command line (issue 18): a conflict there stops
    args = ["--config-file", QUICKSTART, "--dataset", f"mine={ann3}:{images3}", "DATASETS.TRAIN", "('mine',)",
            "MODEL.ROI_HEADS.NUM_CLASSES", "4", "OUTPUT_DIR", tmp_path / "out"]  # fmt: skip
    line = _one_line_error(run_train_net(args, cwd=tmp_path, env=ENV, timeout=300))
    assert "MODEL.ROI_HEADS.NUM_CLASSES = 4 (set on the command line)" in line and "has 3 categories" in line, line


def _in_process(main, argv, capsys):
    """``exit_on_user_error(main, argv)`` as the scripts' ``__main__`` runs it: (exit code, stderr)."""
    from hrnet_d2.utils.errors import exit_on_user_error

    with pytest.raises(SystemExit) as e:
        exit_on_user_error(main, argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return e.value.code, err


def test_demo_and_tools(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HRNET_D2_DEBUG", raising=False)
    monkeypatch.setenv("HRNET_D2_DATASETS", str(tmp_path / "datasets"))
    import export_model

    import demo

    code, err = _in_process(
        demo.main, ["--input", str(tmp_path / "nothing*.png"), "--output", str(tmp_path / "o")], capsys
    )
    assert code == 2 and err.startswith("error: --input") and "no such file, folder or matching image" in err
    code, err = _in_process(demo.main, ["--input", str(tmp_path), "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "no images found" in err
    argv = [
        "--config-file",
        str(QUICKSTART),
        "--export-method",
        "scripting",
        "--format",
        "onnx",
        "--output",
        str(tmp_path),
    ]
    code, err = _in_process(export_model.main, argv, capsys)
    assert code == 2 and err.startswith("error: --export-method scripting only produces TorchScript")


@pytest.mark.parametrize("script", ["train_net", "lazy_train_net", "demo", "analyze_model", "benchmark", "benchmark_d2",
                                    "export_model", "model_zoo", "precision_check", "visualize_data"])  # fmt: skip
def test_every_entry_point_accepts_debug(script, capsys):
    import importlib

    module = importlib.import_module(script)
    entry = getattr(module, "cli", None) or module.main
    with pytest.raises(SystemExit) as e:
        entry(["--help"])
    assert e.value.code == 0 and "--debug" in capsys.readouterr().out


def test_measuring_tools_stop_before_measuring(tmp_path, capsys, monkeypatch):
    """A config override yacs refuses, an output the tool could not write after minutes of measuring, a zoo
    name that does not exist: one ``error:`` line, exit 2, before any model is built."""
    monkeypatch.delenv("HRNET_D2_DEBUG", raising=False)
    import benchmark
    import benchmark_mmdet
    import experiment_compile_int8
    import precision_check
    import zoo_latency

    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where a folder is wanted
    for main, argv in (
        (benchmark.main, ["--quick", "--output-dir", blocked / "out"]),
        (benchmark_mmdet.main, ["--quick", "--output-dir", blocked / "out"]),
        (experiment_compile_int8.main, ["--quick", "--output-dir", blocked / "out"]),
        (zoo_latency.main, ["--output-dir", blocked / "out"]),
    ):
        code, err = _in_process(main, [str(a) for a in argv], capsys)
        assert code == 2 and err.startswith("error: --output-dir = ") and "cannot be created or written" in err, err
    code, err = _in_process(precision_check.main, ["--output", str(blocked / "out" / "p.json")], capsys)
    assert code == 2 and err.startswith("error: --output = ") and "cannot be created or written" in err, err
    for opts, expected in ((["MODEL.NOPE", "1"], "Non-existent key: MODEL.NOPE"),
                           (["MODEL.HRNET.INFERENCE_COMPILE", "maybe"], "Type mismatch")):  # fmt: skip
        code, err = _in_process(precision_check.main, ["--opts", *opts], capsys)
        assert code == 2 and err.startswith("error: config override ") and expected in err, err
        assert len(err.strip().splitlines()) == 1, err
    code, err = _in_process(zoo_latency.main, ["--only", "coco/nope", "--output-dir", str(tmp_path)], capsys)
    assert code == 2 and err.startswith("error: --only ['coco/nope']: not in the zoo"), err
