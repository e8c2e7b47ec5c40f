"""Dataset loading that stops on bad data with a message naming the file.

Without these checks a broken annotation json surfaces as a bare ``KeyError`` or
``JSONDecodeError`` from inside pycocotools, a missing image as an error thousands of
iterations into training, and images without annotations are dropped with an INFO
line.  Here the dataset dicts are loaded once, checked up front (fields, image files),
and every problem is a ``DataError`` naming the dataset and the file.
"""
import json
import logging
import os

import torch

from detectron2.data import MetadataCatalog, get_detection_dataset_dicts
from detectron2.utils.file_io import PathManager

from ..safe_load import UnsafeFileError, load_pickle

__all__ = ["DataError", "check_coco_json", "find_coco_json_problem", "check_dataset_dicts", "load_dataset_dicts"]

logger = logging.getLogger(__name__)

_MAX_LISTED = 5


class DataError(RuntimeError):
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
    label = (f"dataset(s) {list(names)}" if names else "dataset") + (f" (annotation file {', '.join(files)})" if files else "")
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


def load_dataset_dicts(names, *, filter_empty=False, min_keypoints=0, proposal_files=None):
    """``get_detection_dataset_dicts`` with clear errors and an explicit warning for what is dropped."""
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
    if filter_empty and dicts and "annotations" in dicts[0]:
        dicts = _filter_empty(dicts, names)
    return dicts
