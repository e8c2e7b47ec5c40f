"""Dataset loading that stops on bad data with a message naming the file.

Without these checks a broken annotation json surfaces as a bare ``KeyError`` or
``JSONDecodeError`` from inside pycocotools, a missing image as an error thousands of
iterations into training, and images without annotations are dropped with an INFO
line.  Here the dataset dicts are loaded once, checked up front (fields, image files,
training boxes), and every problem is a ``DataError`` naming the dataset and the file.
The model's class count is checked against each training dataset's categories.
"""

import json
import logging
import os
import socket
from collections import Counter

import torch

from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from detectron2.structures import BoxMode
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from ..utils.errors import UserError
from ..utils.safe_load import UnsafeFileError, load_pickle

__all__ = [
    "DataError",
    "DatasetFilesMissing",
    "check_datasets",
    "check_coco_json",
    "check_dataset_dicts",
    "check_num_classes",
    "find_coco_json_problem",
    "load_dataset_dicts",
]

logger = logging.getLogger(__name__)

_MAX_LISTED = 5


class DataError(UserError, RuntimeError):
    """The dataset (annotation json, image file, ...) is unusable; the message names the file."""


def _example_list(items):
    items = list(items)
    more = f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return ", ".join(map(str, items[:_MAX_LISTED])) + more


def _check_records(kind, records, required):
    if not isinstance(records, list):
        return f"{kind!r} must be a list, got {type(records).__name__}"
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            return f"{kind}[{i}] must be an object, got {type(r).__name__}"
        missing = [k for k in required if k not in r]
        if missing:
            return f"{kind}[{i}] (id={r.get('id', '?')}) lacks the required field {missing[0]!r}"
    return None


def find_coco_json_problem(path):
    """The first structural problem of a COCO instances json, or None if it looks valid."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return "does not exist"
    except UnicodeDecodeError as e:
        return f"is not valid JSON (not UTF-8 text: {e})"
    except json.JSONDecodeError as e:
        return f"is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
    if not isinstance(data, dict):
        return f"must hold a JSON object with 'images', 'annotations', 'categories', got a {type(data).__name__}"
    for key in ("images", "categories"):
        if key not in data:
            return f"lacks the required field {key!r}"
    problem = (
        _check_records("images", data["images"], ("id", "file_name", "height", "width"))
        or _check_records("categories", data["categories"], ("id", "name"))
        or _check_records("annotations", data.get("annotations", []), ("image_id", "category_id", "bbox"))
    )
    if problem:
        return problem
    category_ids = {c["id"] for c in data["categories"]}
    image_ids = {im["id"] for im in data["images"]}
    for i, a in enumerate(data.get("annotations", [])):
        if not isinstance(a["bbox"], list) or len(a["bbox"]) != 4:
            return f"annotations[{i}] (id={a.get('id', '?')}) has bbox={a['bbox']!r}; needs [x, y, width, height]"
        if a["category_id"] not in category_ids:
            return f"annotations[{i}] (id={a.get('id', '?')}) has category_id={a['category_id']!r}, not in 'categories'"
        if a["image_id"] not in image_ids:
            return f"annotations[{i}] (id={a.get('id', '?')}) has image_id={a['image_id']!r}, not in 'images'"
    return None


def check_coco_json(path):
    """Raise DataError naming ``path`` if it is not a usable COCO instances json."""
    problem = find_coco_json_problem(path)
    if problem:
        raise DataError(f"Annotation file {path} {problem}.")


def _explain_load_failure(names, error):
    for name in names:
        json_file = getattr(MetadataCatalog.get(name), "json_file", None)
        if json_file and str(json_file).endswith(".json"):
            problem = find_coco_json_problem(json_file)
            if problem:
                return DataError(f"Dataset {name!r}: annotation file {json_file} {problem}.")
    files = [getattr(MetadataCatalog.get(n), "json_file", None) for n in names]
    files = [f for f in files if f]
    where = f" (annotation files: {', '.join(map(str, files))})" if files else ""
    return DataError(f"Loading dataset(s) {list(names)} failed{where}: {type(error).__name__}: {error}")


def check_dataset_dicts(dicts, names=()):
    """Fields every loader needs, and that all image (and sem-seg) files exist."""
    files = [getattr(MetadataCatalog.get(n), "json_file", None) for n in names]
    files = [str(f) for f in files if f]
    label = (f"dataset(s) {list(names)}" if names else "dataset") + (
        f" (annotation file {', '.join(files)})" if files else ""
    )
    missing_files = []
    for d in dicts:
        if "file_name" not in d:
            raise DataError(f"A record of {label} lacks 'file_name' (image_id={d.get('image_id', '?')})")
        for key in ("file_name", "sem_seg_file_name"):
            if key in d and not os.path.isfile(d[key]):
                missing_files.append(d[key])
        for j, ann in enumerate(d.get("annotations", ())):
            for key in ("bbox", "bbox_mode", "category_id"):
                if key not in ann:
                    raise DataError(
                        f"{label}: annotation {j} (id={ann.get('id', '?')}) of image {d['file_name']} "
                        f"lacks the required field {key!r}"
                    )
    if missing_files:
        raise DataError(
            f"{len(missing_files)} of the files listed by {label} do not exist: {_example_list(missing_files)}"
        )


def _filter_empty(dicts, names):
    """As Detectron2's filter_images_with_only_crowd_annotations, but says what it drops."""

    def usable(d):
        return any(ann.get("iscrowd", 0) == 0 for ann in d.get("annotations", ()))

    kept = [d for d in dicts if usable(d)]
    dropped = [d["file_name"] for d in dicts if not usable(d)]
    if dropped:
        logger.warning(
            "%d of %d images of %s have no (non-crowd) annotations and are not used for training "
            "(DATALOADER.FILTER_EMPTY_ANNOTATIONS True): %s",
            len(dropped),
            len(dicts),
            list(names),
            _example_list(dropped),
        )
    if not kept:
        raise DataError(f"No image of dataset(s) {list(names)} has annotations; nothing to train on")
    return kept


def _box_problem(ann, width, height):
    """Why a (non-crowd) annotation's box cannot be trained on, or None."""
    if ann.get("iscrowd", 0):
        return None  # crowd regions are ignored by training anyway
    mode, box = ann["bbox_mode"], ann["bbox"]
    try:
        if mode == BoxMode.XYWH_ABS:
            x0, y0, w, h = (float(v) for v in box)
            x1, y1 = x0 + w, y0 + h
        else:
            x0, y0, x1, y1 = (float(v) for v in BoxMode.convert(list(box), mode, BoxMode.XYXY_ABS))
    except (NotImplementedError, AssertionError, TypeError, ValueError):
        return None  # relative boxes: not ours to judge
    if not (x1 > x0 and y1 > y0):  # also NaN
        return "non-positive width/height"
    if width and height and (x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height):
        return f"entirely outside the {width}x{height} image"
    return None


def _annotation_id(names, record, ann):
    """(annotation id, json file) of a dataset-dict annotation, read back from the COCO json
    (Detectron2's load_coco_json does not keep the id)."""
    for name in names:
        json_file = getattr(MetadataCatalog.get(name), "json_file", None)
        if not json_file or not str(json_file).endswith(".json"):
            continue
        try:
            with open(json_file, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        root = getattr(MetadataCatalog.get(name), "image_root", "")
        images = [im for im in data.get("images", ()) if im.get("id") == record.get("image_id")]
        if not any(os.path.join(root, im["file_name"]) == record["file_name"] for im in images):
            continue
        for a in data.get("annotations", ()):
            if a.get("image_id") == record.get("image_id") and a.get("bbox") == list(ann["bbox"]):
                return a.get("id", "?"), json_file
        return "?", json_file
    return "?", None


def _check_boxes(dicts, names, drop):
    """Stop on (or, with ``drop``, remove with a warning) boxes that training would drop
    silently: non-positive width/height, or entirely outside the image."""
    bad = []  # (record index, annotation index, problem)
    for i, d in enumerate(dicts):
        for j, ann in enumerate(d.get("annotations", ())):
            problem = _box_problem(ann, d.get("width"), d.get("height"))
            if problem:
                bad.append((i, j, problem))
    if not bad:
        return dicts
    if not drop:
        i, j, problem = bad[0]
        d, ann = dicts[i], dicts[i]["annotations"][j]
        ann_id, json_file = _annotation_id(names, d, ann)
        where = f"annotation file {json_file}" if json_file else f"dataset(s) {list(names)}"
        more = f" ({len(bad) - 1} more invalid boxes)" if len(bad) > 1 else ""
        raise DataError(
            f"{where}: annotation id={ann_id} (image {d['file_name']}) has bbox {list(ann['bbox'])} "
            f"({BoxMode(ann['bbox_mode']).name}): {problem}{more}. Fix the annotations, or set "
            "DATALOADER.DROP_INVALID_BOXES True to drop such boxes with a warning"
        )
    drop_at = {}
    for i, j, problem in bad:
        drop_at.setdefault(i, set()).add(j)
    out = list(dicts)
    for i, js in drop_at.items():
        out[i] = dict(dicts[i], annotations=[a for j, a in enumerate(dicts[i]["annotations"]) if j not in js])
    kinds = Counter(problem.split(" the ")[0] for _, _, problem in bad)
    logger.warning(
        "Dropped %d of %d annotations of %s with invalid boxes (%s) from %d images (DATALOADER.DROP_INVALID_BOXES True)",
        len(bad),
        sum(len(d.get("annotations", ())) for d in dicts),
        list(names),
        ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())),
        len(drop_at),
    )
    return out


def _classes_keys(cfg):
    """(config key, value, metadata field) of the class counts the meta-architecture uses."""
    meta = cfg.MODEL.META_ARCHITECTURE
    keys = []
    if meta in ("GeneralizedRCNN", "PanopticFPN", "HybridTaskCascade"):
        keys.append(("MODEL.ROI_HEADS.NUM_CLASSES", cfg.MODEL.ROI_HEADS.NUM_CLASSES, "thing_classes"))
        if cfg.MODEL.KEYPOINT_ON:
            keys.append(
                ("MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS, "keypoint_names")
            )
    if meta == "RetinaNet":
        keys.append(("MODEL.RETINANET.NUM_CLASSES", cfg.MODEL.RETINANET.NUM_CLASSES, "thing_classes"))
    if meta in ("SemanticSegmentor", "PanopticFPN"):
        keys.append(("MODEL.SEM_SEG_HEAD.NUM_CLASSES", cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, "stuff_classes"))
    return keys


def _lazy_classes_keys(cfg):
    """As _classes_keys, for a LazyConfig (``model.roi_heads.num_classes``, ...)."""
    from omegaconf import OmegaConf

    keys = []
    for key, field in (
        ("model.roi_heads.num_classes", "thing_classes"),
        ("model.roi_heads.keypoint_head.num_keypoints", "keypoint_names"),
        ("model.num_classes", "thing_classes"),  # RetinaNet
        ("model.sem_seg_head.num_classes", "stuff_classes"),
    ):
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, int):
            keys.append((key, value, field))
    return keys


def check_num_classes(cfg, names):
    """Stop when the model's class count differs from a dataset's categories.

    ``NUM_CLASSES`` smaller than the dataset's categories makes the extra classes
    background (trains without complaint, evaluates near 0 AP on them); larger wastes
    outputs that are never trained.  Call after the datasets are loaded (load_coco_json
    sets ``thing_classes``).  ``cfg``: a YAML config (CfgNode) or a LazyConfig.
    """
    lazy = not hasattr(cfg, "MODEL")
    for name in names:
        meta = MetadataCatalog.get(name)
        for key, value, field in _lazy_classes_keys(cfg) if lazy else _classes_keys(cfg):
            classes = getattr(meta, field, None) if hasattr(meta, field) else None
            if classes is None or len(classes) == value:
                continue
            json_file = getattr(meta, "json_file", None) if hasattr(meta, "json_file") else None
            source = f" (annotation file {json_file})" if json_file else ""
            setting = f"{key}={len(classes)}" if lazy else f"{key} {len(classes)}"
            raise DataError(
                f"{key} = {value}, but dataset {name!r}{source} has {len(classes)} {field}: "
                f"{_example_list(classes)}. Set {setting}"
            )


def load_dataset_dicts(names, *, filter_empty=False, min_keypoints=0, proposal_files=None, invalid_boxes=None):
    """``get_detection_dataset_dicts`` with clear errors and an explicit warning for what is dropped.

    ``invalid_boxes`` (training sets): "error" stops on a box with non-positive size or
    entirely outside its image, naming the json and the annotation id; "drop" removes
    them with a warning that counts them; None leaves boxes unchecked.
    """
    names = [names] if isinstance(names, str) else list(names)
    try:
        for path in proposal_files or ():
            # Detectron2 reads proposal .pkl files with plain pickle.load: read each with the restricted
            # unpickler first, so one that references anything but plain data and numeric arrays stops here
            with PathManager.open(path, "rb") as f:
                load_pickle(f, path)
        dicts = get_detection_dataset_dicts(
            names, filter_empty=False, min_keypoints=min_keypoints, proposal_files=proposal_files
        )
    except (DataError, UnsafeFileError):
        raise
    except Exception as e:  # JSONDecodeError, KeyError, "Dataset ... is empty!", ...
        raise _explain_load_failure(names, e) from e
    if isinstance(dicts, torch.utils.data.Dataset):
        return dicts
    check_dataset_dicts(dicts, names)
    if invalid_boxes is not None:
        if invalid_boxes not in ("error", "drop"):
            raise ValueError(f"invalid_boxes={invalid_boxes!r}: allowed 'error', 'drop', None")
        dicts = _check_boxes(dicts, names, drop=invalid_boxes == "drop")
    if filter_empty and dicts and "annotations" in dicts[0]:
        dicts = _filter_empty(dicts, names)
    return dicts


_PATH_KEYS = ("json_file", "image_root", "sem_seg_root", "panoptic_root", "panoptic_json")


class DatasetFilesMissing(UserError, FileNotFoundError):
    """A dataset's files are not on disk (or the dataset is not registered)."""


def _missing_files(names):
    problems = []
    for name in names:
        if name not in DatasetCatalog.list():
            problems.append(f"{name}: not a registered dataset")
            continue
        meta = MetadataCatalog.get(name)
        for key in _PATH_KEYS:
            path = getattr(meta, key, None) if hasattr(meta, key) else None
            if path and not os.path.exists(path):
                problems.append(f"{name}: {key} {path} does not exist")
    return problems


def check_datasets(names):
    """Stop with a readable message, before any model is built, when a dataset's files
    are missing (e.g. COCO not under $DETECTRON2_DATASETS).

    In a job of several machines every process calls it (a collective): each machine reads
    its own files, and a machine that lacks some stops every process with one line naming
    that machine's rank, its host and the path."""
    problems = _missing_files(names)
    if comm.get_world_size() > 1 and comm.get_world_size() > comm.get_local_size():
        machine = comm.get_rank() // comm.get_local_size()
        reports = comm.all_gather((machine, socket.gethostname(), problems))
        missing = {(m, host): p for m, host, p in reports if p}
        if missing:
            (machine, host), problems = min(missing.items())
            others = sorted({m for m, _ in missing} - {machine})
            also = f" (also missing on machine rank(s) {', '.join(map(str, others))})" if others else ""
            raise DatasetFilesMissing(
                f"Dataset files are missing on machine rank {machine} ({host}): {'; '.join(problems)}{also}. "
                "Every machine reads the datasets from its own disk at the same path (a shared folder, or a copy "
                "on each machine; generated datasets are made on each machine)."
            )
        return
    if problems:
        root = os.environ.get("DETECTRON2_DATASETS", "datasets")
        raise DatasetFilesMissing(
            "Dataset files are missing:\n"
            + "\n".join(f"  {p}" for p in problems)
            + f"\nDetectron2 looks for builtin datasets under $DETECTRON2_DATASETS (now: {root!r}); "
            "see https://detectron2.readthedocs.io/en/latest/tutorials/builtin_datasets.html for the layout.\n"
            "To try hrnet_d2 without downloading anything, run the quickstart "
            "(README 'Quickstart': bash scripts/quickstart.sh), which trains on generated data."
        )
