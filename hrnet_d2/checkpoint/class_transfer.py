"""The class-specific layers of a detector, and class-name transfer between checkpoints.

Fine-tuning a detector on other classes changes the shapes of the layers with one row (or a
few rows) per class: the box classifier (``cls_score``, K + 1 rows, background last), the
class-specific box regression (``bbox_pred``, 4 rows per class) and the mask predictor
(one output channel per class), in every cascade stage.  Everything else of the detector
is the same for any class count and must come from the checkpoint (see
``detection_checkpoint.AtomicCheckpointer``).

Class-name transfer: a class of the training data with the name of a class the checkpoint
was trained on starts from that class's rows in these layers; the others start from the
model's fresh initialisation.  The checkpoint's class names are those stored with it
(``thing_classes``, which our checkpointer saves) or, for ``hrnet_d2://coco/...``, COCO's 80
names in Detectron2's contiguous order (``builtin_meta.COCO_CATEGORIES``), which is the
order of mmdetection's COCO classes too.
"""

import re

__all__ = [
    "CLASS_SPECIFIC",
    "checkpoint_class_names",
    "is_class_specific",
    "model_class_names",
    "transfer_rows",
]

# the parameters whose shape depends on the class count: R-CNN heads (Detectron2's and ours, cascade
# stages and per-stage mask heads included), the dense heads' classifier (RetinaNet: one row per
# anchor and class, FCOS: one per class), the semantic-segmentation predictor (stuff classes)
CLASS_SPECIFIC = re.compile(
    r"^(roi_heads\.(box_predictor(\.\d+)?\.(cls_score|bbox_pred)|mask_head(\.heads\.\d+)?\.predictor)"
    r"|head\.cls_score|sem_seg_head\.predictor)\.(weight|bias)$"
)


def is_class_specific(key):
    return CLASS_SPECIFIC.match(key) is not None


def coco_class_names():
    """COCO's 80 thing classes in the contiguous order of Detectron2's (and mmdetection's) models."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    return [c["name"] for c in COCO_CATEGORIES if c["isthing"]]


def checkpoint_class_names(checkpoint, path):
    """The class names a checkpoint's class-specific rows stand for, or None when unknown."""
    names = checkpoint.get("thing_classes")
    if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        return list(names)
    if isinstance(path, str) and path.startswith("hrnet_d2://coco/"):
        return coco_class_names()
    return None


def model_class_names(cfg):
    """The class names of the training data of a YAML config or LazyConfig, or None."""
    from detectron2.data import MetadataCatalog

    if cfg is None:
        return None
    if hasattr(cfg, "MODEL"):
        names = list(cfg.DATASETS.TRAIN) or list(cfg.DATASETS.TEST)
    else:
        from omegaconf import OmegaConf

        names = OmegaConf.select(cfg, "dataloader.train.dataset.names", default=None)
        names = [names] if isinstance(names, str) else list(names or ())
    if not names:
        return None
    meta = MetadataCatalog.get(names[0])
    classes = meta.get("thing_classes", None)
    return list(classes) if classes else None


def _rows_per_class(key, old_rows, num_old):
    """How many consecutive rows each class has in ``key`` (1 or 4), or None for a class-agnostic layer."""
    if ".cls_score." in key:
        return 1 if old_rows == num_old + 1 else None
    if ".bbox_pred." in key:
        return 4 if old_rows == 4 * num_old else None
    return 1 if old_rows == num_old else None  # mask predictor, FCOS (RetinaNet's A x K rows: not transferred)


def transfer_rows(key, old, fresh, old_names, new_names):
    """``fresh`` (the model's initialised tensor for ``new_names``) with the rows of the classes
    named in ``old_names`` copied from ``old``; None when the layer is class-agnostic or the
    sizes do not match the names.  The background row of ``cls_score`` (last) is copied too."""
    per = _rows_per_class(key, old.shape[0], len(old_names))
    if per is None:
        return None
    extra_new = fresh.shape[0] - per * len(new_names)  # the background row of cls_score
    extra_old = old.shape[0] - per * len(old_names)
    if extra_new != extra_old or extra_new not in (0, 1) or old.shape[1:] != fresh.shape[1:]:
        return None
    out = fresh.clone()
    index = {n: i for i, n in enumerate(old_names)}
    for j, name in enumerate(new_names):
        i = index.get(name)
        if i is not None:
            out[per * j : per * (j + 1)] = old[per * i : per * (i + 1)]
    if extra_new:
        out[-1] = old[-1]
    return out
