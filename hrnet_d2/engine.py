"""Pieces of train_net.py that users of their own Detectron2 scripts may want too."""
import logging
import os

import numpy as np
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, DatasetEvaluators, SemSegEvaluator

from .visualization import draw_predictions

__all__ = ["Trainer", "check_datasets", "visualize_predictions", "DatasetFilesMissing"]

logger = logging.getLogger(__name__)

class Trainer(DefaultTrainer):
    """Detectron2's DefaultTrainer with COCO evaluation (bbox, + segm/keypoints when the model has them)."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        # as Detectron2's tools/train_net.py: by the dataset's evaluator_type
        kind = getattr(MetadataCatalog.get(dataset_name), "evaluator_type", "coco")
        evaluators = []
        if kind in ("sem_seg", "coco_panoptic_seg", "cityscapes_sem_seg"):
            evaluators.append(SemSegEvaluator(dataset_name, output_dir=output_folder))
        if kind in ("coco", "coco_panoptic_seg"):
            sigmas = cfg.TEST.KEYPOINT_OKS_SIGMAS
            evaluators.append(COCOEvaluator(dataset_name, output_dir=output_folder, kpt_oks_sigmas=sigmas))
        if kind == "coco_panoptic_seg" and hasattr(MetadataCatalog.get(dataset_name), "panoptic_json"):
            evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
        if not evaluators:
            raise NotImplementedError(f"no evaluator for {dataset_name} (evaluator_type {kind!r})")
        return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)


_PATH_KEYS = ("json_file", "image_root", "sem_seg_root", "panoptic_root", "panoptic_json")


class DatasetFilesMissing(SystemExit):
    """Raised (exit status 2) when a dataset's files are not on disk."""

    def __init__(self, message):
        super().__init__(message)
        self.code = 2


def check_datasets(names):
    """Stop with a readable message, before any model is built, when a dataset's files
    are missing (e.g. COCO not under $DETECTRON2_DATASETS)."""
    problems = []
    for name in names:
        if name not in DatasetCatalog.list():
            problems.append(f"  {name}: not a registered dataset")
            continue
        meta = MetadataCatalog.get(name)
        for key in _PATH_KEYS:
            path = getattr(meta, key, None) if hasattr(meta, key) else None
            if path and not os.path.exists(path):
                problems.append(f"  {name}: {key} {path} does not exist")
    if problems:
        root = os.environ.get("DETECTRON2_DATASETS", "datasets")
        raise DatasetFilesMissing(
            "Dataset files are missing:\n"
            + "\n".join(problems)
            + f"\nDetectron2 looks for builtin datasets under $DETECTRON2_DATASETS (now: {root!r}); "
            "see https://detectron2.readthedocs.io/en/latest/tutorials/builtin_datasets.html for the layout.\n"
            "To try hrnet_d2 without downloading anything, run the quickstart "
            "(README 'Quickstart': bash scripts/quickstart.sh), which trains on generated data."
        )


@torch.no_grad()
def visualize_predictions(cfg, model, num_images=4, dataset_name=None, output_path=None, score_threshold=0.5):
    """Write a PNG grid of the model's predictions on the first images of a test set."""
    dataset_name = dataset_name or cfg.DATASETS.TEST[0]
    output_path = output_path or os.path.join(cfg.OUTPUT_DIR, "predictions.png")
    dicts = DatasetCatalog.get(dataset_name)[:num_images]
    metadata = MetadataCatalog.get(dataset_name)
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    was_training = model.training
    model.eval()
    panels = []
    for d in dicts:
        image = utils.read_image(d["file_name"], format=cfg.INPUT.FORMAT)
        h, w = image.shape[:2]
        resized = aug.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
        outputs = model([{"image": tensor, "height": h, "width": w}])[0]
        rgb = utils.convert_image_to_rgb(image, cfg.INPUT.FORMAT)
        panels.append(draw_predictions(rgb, outputs, metadata, score_threshold))
    model.train(was_training)
    if not panels:
        return None
    height = max(p.shape[0] for p in panels)
    panels = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0))) for p in panels]
    grid = np.concatenate(panels, axis=1)
    os.makedirs(os.path.dirname(output_path) or ".", exist_ok=True)
    import cv2

    cv2.imwrite(output_path, grid[:, :, ::-1])
    logger.info("Wrote predictions of %d %s images to %s", len(panels), dataset_name, output_path)
    return output_path
