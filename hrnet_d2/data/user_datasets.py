"""Users' own COCO-format datasets from the command line, without code.

``train_net.py --dataset NAME=path/to/ann.json:path/to/images`` (repeatable) registers
each with Detectron2's ``register_coco_instances``; ``DATASETS.TRAIN`` / ``DATASETS.TEST``
select them by name, as for any registered dataset.  The model's class count is then
taken from the categories of the selected datasets.
"""

import json
import os
import re

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from ..utils.errors import UserError
from .checks import DataError, check_coco_json

__all__ = ["DatasetArgumentError", "add_dataset_argument", "apply_user_datasets", "parse_dataset_argument"]

_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9_.\-]+)=(?P<json>.+?\.json):(?P<root>.+)$")
# the class-count key each meta-architecture reads, for the instances datasets registered here
_NUM_CLASSES_KEY = {
    "GeneralizedRCNN": ("ROI_HEADS", "NUM_CLASSES"),
    "PanopticFPN": ("ROI_HEADS", "NUM_CLASSES"),
    "HybridTaskCascade": ("ROI_HEADS", "NUM_CLASSES"),
    "RetinaNet": ("RETINANET", "NUM_CLASSES"),
    "FCOSDetector": ("FCOS", "NUM_CLASSES"),
}


class DatasetArgumentError(UserError, ValueError):
    """A ``--dataset`` argument that cannot be used."""


def add_dataset_argument(parser):
    """Add the repeatable ``--dataset NAME=ANN.json:IMAGE_DIR`` option to an argparse parser."""
    parser.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="NAME=ANN.json:IMAGE_DIR",
        help="register a COCO-format dataset under NAME (repeatable); use it with "
        "DATASETS.TRAIN '(\"NAME\",)' and/or DATASETS.TEST '(\"NAME\",)'. NUM_CLASSES is set "
        "from its categories",
    )
    return parser


def parse_dataset_argument(text):
    """``"NAME=ann.json:images"`` -> (name, json_file, image_root)."""
    m = _SPEC.match(text)
    if not m:
        raise DatasetArgumentError(
            f"--dataset {text!r} is invalid: expected NAME=path/to/annotations.json:path/to/images "
            "(NAME of letters, digits, _ . -; the annotation file ends in .json)"
        )
    return m["name"], m["json"], m["root"]


def _register(name, json_file, image_root):
    arg = f"--dataset {name}={json_file}:{image_root}"
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        same = getattr(meta, "json_file", None) == json_file and getattr(meta, "image_root", None) == image_root
        if same:  # registered by an earlier call in this process
            return
        raise DatasetArgumentError(f"{arg}: the name {name!r} is already a registered dataset; choose another name")
    check_coco_json(json_file)  # DataError naming the file: missing, not JSON, not COCO
    if not os.path.isdir(image_root):
        raise DatasetArgumentError(f"{arg}: image folder {image_root} does not exist")
    register_coco_instances(name, {}, json_file, image_root)


def _num_categories(json_file):
    with open(json_file, encoding="utf-8") as f:
        return len(json.load(f)["categories"])


def _on_command_line(key, opts):
    """True when ``key`` is set by the ``KEY VALUE`` overrides ``opts``."""
    return key in list(opts or ())[0::2]


def apply_user_datasets(cfg, specs, opts=()):
    """Register the ``--dataset`` specs and set the config's class count from them.

    The datasets must be named by ``DATASETS.TRAIN`` or ``DATASETS.TEST``.  NUM_CLASSES
    (of the head the meta-architecture uses) follows the categories of the selected datasets
    (the training ones, else the test ones): a config file's value is the class count of the
    data it was written for (a COCO config's 80), not the user's choice.  A value given on the
    command line (``opts``, the ``KEY VALUE`` overrides) is kept, and stops with both numbers
    when it differs.  Returns a line for the log when it set NUM_CLASSES, else None.
    """
    registered = {}
    for text in specs or ():
        name, json_file, image_root = parse_dataset_argument(text)
        _register(name, json_file, image_root)
        registered[name] = json_file
    if not registered:
        return None
    train = [n for n in cfg.DATASETS.TRAIN if n in registered]
    test = [n for n in cfg.DATASETS.TEST if n in registered]
    if not train and not test:
        names = sorted(registered)
        raise DatasetArgumentError(
            f"--dataset registered {names}, but DATASETS.TRAIN = {tuple(cfg.DATASETS.TRAIN)} and DATASETS.TEST = "
            f"{tuple(cfg.DATASETS.TEST)} use none of them; add e.g. DATASETS.TRAIN '(\"{names[0]}\",)' to the command line"
        )
    selected = train or test
    counts = {n: _num_categories(registered[n]) for n in selected}
    if len(set(counts.values())) > 1:
        raise DataError(
            "The datasets selected have different numbers of categories: "
            + ", ".join(f"{n!r} ({registered[n]}): {c}" for n, c in counts.items())
        )
    num = next(iter(counts.values()))
    if cfg.MODEL.META_ARCHITECTURE not in _NUM_CLASSES_KEY:
        return None
    head, field = _NUM_CLASSES_KEY[cfg.MODEL.META_ARCHITECTURE]
    key = f"MODEL.{head}.{field}"
    value = getattr(getattr(cfg.MODEL, head), field)
    if value == num:
        return None
    if _on_command_line(key, opts):
        raise DatasetArgumentError(
            f"{key} = {value} (set on the command line), but dataset {selected[0]!r} "
            f"({registered[selected[0]]}) has {num} categories; drop the setting (it is then taken from the "
            f"categories) or set {key} {num}"
        )
    setattr(getattr(cfg.MODEL, head), field, num)
    return f"{key} = {num}, from the categories of {selected} (the config said {value})"
