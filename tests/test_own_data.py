"""Users' own COCO-format data without code: ``train_net.py --dataset NAME=ann.json:images``."""

import json
import re
import uuid

import numpy as np
import pytest
from conftest import REPO, make_cfg, run_train_net

from detectron2.data import DatasetCatalog, MetadataCatalog

from hrnet_d2.data.checks import DataError
from hrnet_d2.data.shapes import generate_split
from hrnet_d2.data.user_datasets import DatasetArgumentError, apply_user_datasets, parse_dataset_argument

FASTER = "COCO-Detection/faster_rcnn_hrnetv2p_w18_1x.yaml"
RETINANET = "shapes/retinanet_hrnetv2p_w18_small_shapes.yaml"


def _three_class_split(root, split, num_images):
    """A generated "shapes" split (96 px) with 3 of the 4 categories: stars removed."""
    path = generate_split(root, split, num_images, size=96, seed=3)
    data = json.loads(path.read_text())
    data["categories"] = [c for c in data["categories"] if c["id"] != 4]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 4]
    path.write_text(json.dumps(data))
    return path, path.parents[1] / split


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    return root, _three_class_split(root, "mine_train", 6), _three_class_split(root, "mine_val", 3)


def _name():
    return f"own_{uuid.uuid4().hex[:8]}"


def test_parse():
    assert parse_dataset_argument("a_1=dir/x.json:img") == ("a_1", "dir/x.json", "img")
    assert parse_dataset_argument("a=/p:q/x.json:/r:s") == ("a", "/p:q/x.json", "/r:s")
    for bad in ("a", "a=x.json", "a=x.txt:img", "=x.json:img", "a b=x.json:img"):
        with pytest.raises(DatasetArgumentError, match="NAME=path/to/annotations.json:path/to/images"):
            parse_dataset_argument(bad)


def test_registers_and_sets_num_classes_from_categories(splits):
    _, (train_json, train_dir), (val_json, val_dir) = splits
    train, val = _name(), _name()
    cfg = make_cfg(FASTER, "DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{val}',)")
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 80  # Detectron2's default, not set by the config
    note = apply_user_datasets(cfg, [f"{train}={train_json}:{train_dir}", f"{val}={val_json}:{val_dir}"])
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3 and "from the categories" in note
    assert len(DatasetCatalog.get(train)) == 6 and MetadataCatalog.get(train).thing_classes == [
        "circle",
        "square",
        "triangle",
    ]
    # the same registration again (a second call in this process) is fine; a taken name is not
    apply_user_datasets(cfg, [f"{train}={train_json}:{train_dir}"])
    with pytest.raises(DatasetArgumentError, match="'coco_2017_train' is already a registered dataset"):
        apply_user_datasets(cfg, [f"coco_2017_train={train_json}:{train_dir}"])
    # RetinaNet reads its own key; an explicit value that agrees is kept
    cfg = make_cfg(RETINANET, "DATASETS.TRAIN", f"('{train}',)", "MODEL.RETINANET.NUM_CLASSES", "3")
    assert apply_user_datasets(cfg, [f"{train}={train_json}:{train_dir}"]) is None


def test_conflicts_and_mistakes_stop(splits, tmp_path):
    _, (train_json, train_dir), _ = splits
    name = _name()
    spec = f"{name}={train_json}:{train_dir}"
    # the config file's class count is the data it was written for: the user's data decides
    cfg = make_cfg(RETINANET, "DATASETS.TRAIN", f"('{name}',)")  # the config sets NUM_CLASSES 4
    note = apply_user_datasets(cfg, [spec], ["DATASETS.TRAIN", f"('{name}',)"])
    assert cfg.MODEL.RETINANET.NUM_CLASSES == 3 and "(the config said 4)" in note
    # ... but a value given on the command line is the user's: a conflict stops with both numbers
    opts = ["MODEL.RETINANET.NUM_CLASSES", "4", "DATASETS.TRAIN", f"('{name}',)"]
    with pytest.raises(
        DatasetArgumentError,
        match=r"MODEL.RETINANET.NUM_CLASSES = 4 \(set on the command line\).* has 3 categories.*"
        r"set MODEL.RETINANET.NUM_CLASSES 3",
    ):
        apply_user_datasets(make_cfg(RETINANET, *opts), [spec], opts)
    opts = ["MODEL.ROI_HEADS.NUM_CLASSES", "5", "DATASETS.TRAIN", f"('{name}',)"]
    with pytest.raises(DatasetArgumentError, match=r"NUM_CLASSES = 5 .* has 3 categories"):
        apply_user_datasets(make_cfg(FASTER, *opts), [spec], opts)
    with pytest.raises(DatasetArgumentError, match=r"use none of them; add e.g. DATASETS.TRAIN"):
        apply_user_datasets(make_cfg(FASTER), [f"{_name()}={train_json}:{train_dir}"])
    with pytest.raises(DataError, match=rf"{tmp_path / 'no.json'}.*does not exist"):
        apply_user_datasets(make_cfg(FASTER), [f"{_name()}={tmp_path / 'no.json'}:{train_dir}"])
    with pytest.raises(DatasetArgumentError, match=rf"image folder {tmp_path / 'nope'} does not exist"):
        apply_user_datasets(make_cfg(FASTER), [f"{_name()}={train_json}:{tmp_path / 'nope'}"])


@pytest.mark.e2e
def test_train_and_evaluate_own_data_from_the_command_line(splits, tmp_path):
    _, (train_json, train_dir), (val_json, val_dir) = splits
    out = tmp_path / "out"
    args = [
        "--config-file", REPO / "configs" / FASTER,
        "--dataset", f"mine_train={train_json}:{train_dir}",
        "--dataset", f"mine_val={val_json}:{val_dir}",
        "DATASETS.TRAIN", "('mine_train',)", "DATASETS.TEST", "('mine_val',)",
        "MODEL.WEIGHTS", "", "MODEL.HRNET.ARCH", "w18_small_v1", "MODEL.DEVICE", "cpu",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.REFERENCE_WORLD_SIZE", "0", "SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "(2,)",
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "96",
        "INPUT.MAX_SIZE_TEST", "96", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", out,
    ]  # fmt: skip
    proc = run_train_net(args, env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, cwd=tmp_path, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "MODEL.ROI_HEADS.NUM_CLASSES = 3, from the categories of ['mine_train']" in log
    assert (out / "model_final.pth").is_file()
    # trained 3 iterations with 3 classes, evaluated on mine_val with COCO AP
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    losses = {m["iteration"]: m["total_loss"] for m in metrics if "total_loss" in m}
    assert max(losses) == 2 and all(np.isfinite(v) for v in losses.values())
    assert re.search(r"Evaluation results for bbox", log) and "copypaste: AP,AP50" in log
    assert (out / "inference" / "coco_instances_results.json").is_file()


def teardown_module():
    for name in [n for n in DatasetCatalog.list() if n.startswith("own_")]:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
