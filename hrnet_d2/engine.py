"""Pieces of train_net.py that users of their own Detectron2 scripts may want too."""
import logging
import os
import sys
import weakref

import cv2
import numpy as np
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.data.build import _train_loader_from_config
from detectron2.engine import DefaultTrainer, hooks
from detectron2.utils import comm
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, DatasetEvaluators, SemSegEvaluator

from .visualization import draw_predictions
from .amp import amp_trainer_for
from .build import validate_config
from .checkpoint import AtomicCheckpointer, capture_rng_state, restore_rng_state
from .data.checks import load_dataset_dicts
from .data.mapper import CheckedDatasetMapper
from .data.resize import resize_augmentation
from .data.sampler import ResumableSampler

__all__ = ["Trainer", "check_datasets", "visualize_predictions", "DatasetFilesMissing"]

logger = logging.getLogger(__name__)

class Trainer(DefaultTrainer):
    """Detectron2's DefaultTrainer with evaluation by the dataset's evaluator_type, and:

    * the config is validated (``validate_config``) before the model is built;
    * datasets are checked when loaded and bad images stop training with the file named
      (``data/checks.py``, ``data/mapper.py``);
    * checkpoints are written atomically (``AtomicCheckpointer``) and also hold the RNG
      states; ``--resume`` skips the samples already seen, so a resumed run continues
      the uninterrupted one (single process; exact with DATALOADER.NUM_WORKERS 0);
    * a NaN/Inf loss or prediction stops training with the iteration named.
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        # SOLVER.AMP.ENABLED on a CPU model: bf16 autocast (detectron2's AMPTrainer needs CUDA)
        self._trainer = amp_trainer_for(cfg, self._trainer)
        # DefaultTrainer.__init__ makes a plain DetectionCheckpointer and gives it to the
        # PeriodicCheckpointer hook: replace it in both places.
        self.checkpointer = AtomicCheckpointer(self.model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        for h in self._hooks:
            if isinstance(h, hooks.PeriodicCheckpointer):
                h.checkpointer = self.checkpointer
        self._rng_state_to_restore = None

    @classmethod
    def build_model(cls, cfg):
        validate_config(cfg)
        return super().build_model(cfg)

    @classmethod
    def build_train_loader(cls, cfg):
        dataset = load_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        args = _train_loader_from_config(cfg, CheckedDatasetMapper(cfg, True), dataset=dataset)
        sampler = ResumableSampler(args["sampler"]) if args["sampler"] is not None else None
        args["sampler"] = sampler
        # The DataLoader draws its workers' base seed when iterated; a private generator
        # (seeded from the already-seeded NumPy RNG) keeps that draw off the global torch
        # RNG, whose state a resumed run restores.
        loader = build_detection_train_loader(**args, seed=int(np.random.randint(2**31)))
        loader.resumable_sampler = sampler
        return loader

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        proposal_files = None
        if cfg.MODEL.LOAD_PROPOSALS:
            proposal_files = [cfg.DATASETS.PROPOSAL_FILES_TEST[list(cfg.DATASETS.TEST).index(dataset_name)]]
        dataset = load_dataset_dicts([dataset_name], proposal_files=proposal_files)
        return build_detection_test_loader(
            dataset=dataset, mapper=CheckedDatasetMapper(cfg, False), num_workers=cfg.DATALOADER.NUM_WORKERS
        )

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        sampler = getattr(self._trainer.data_loader, "resumable_sampler", None)
        if sampler is not None:
            sampler.start = self.start_iter * (self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size())
            if sampler.start:
                logger.info("Resuming the training data stream after %d samples", sampler.start)

    def state_dict(self):
        ret = super().state_dict()
        ret["rng"] = capture_rng_state()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # Restored in before_train, after everything that runs between loading and the
        # first step; other ranks than 0 keep Detectron2's per-rank seeding.
        if "rng" in state_dict and comm.get_world_size() == 1:
            self._rng_state_to_restore = state_dict["rng"]

    def before_train(self):
        super().before_train()
        if self._rng_state_to_restore is not None:
            restore_rng_state(self._rng_state_to_restore)
            self._rng_state_to_restore = None

    def run_step(self):
        # Detectron2 checks the losses after every step (FloatingPointError naming the
        # iteration); Inf/NaN caught earlier (e.g. in RPN proposals) do not name it.
        try:
            super().run_step()
        except FloatingPointError as e:
            if f"iteration={self.iter}" in str(e):
                raise
            raise FloatingPointError(f"Training diverged at iteration={self.iter}: {e}") from e

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
            tasks = ("bbox",) + ("segm",) * cfg.MODEL.MASK_ON + ("keypoints",) * cfg.MODEL.KEYPOINT_ON
            sigmas = cfg.TEST.KEYPOINT_OKS_SIGMAS
            evaluators.append(COCOEvaluator(dataset_name, tasks, output_dir=output_folder, kpt_oks_sigmas=sigmas))
        if kind == "coco_panoptic_seg" and hasattr(MetadataCatalog.get(dataset_name), "panoptic_json"):
            evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
        if not evaluators:
            raise NotImplementedError(f"no evaluator for {dataset_name} (evaluator_type {kind!r})")
        return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)


_PATH_KEYS = ("json_file", "image_root", "sem_seg_root", "panoptic_root", "panoptic_json")


class DatasetFilesMissing(SystemExit):
    """Raised (exit status 2) when a dataset's files are not on disk.

    Python prints a SystemExit's message only when its code is a string: print it here.
    """

    def __init__(self, message):
        super().__init__(message)
        self.code = 2
        print(message, file=sys.stderr, flush=True)


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
def visualize_predictions(
    cfg, model, num_images=4, dataset_name=None, output_path=None, score_threshold=0.5, min_panel_size=320
):
    """Write a PNG grid of the model's predictions on the first images of a test set.

    Small images are drawn enlarged (short side >= ``min_panel_size``) so that labels
    stay readable; the model still sees them at the test size.
    """
    if dataset_name is None:
        if not cfg.DATASETS.TEST:
            logger.info("No DATASETS.TEST: no predictions to draw")
            return None
        dataset_name = cfg.DATASETS.TEST[0]
    output_path = output_path or os.path.join(cfg.OUTPUT_DIR, "predictions.png")
    dicts = DatasetCatalog.get(dataset_name)[:num_images]
    metadata = MetadataCatalog.get(dataset_name)
    aug = resize_augmentation(cfg)
    was_training = model.training
    model.eval()
    panels = []
    for d in dicts:
        image = utils.read_image(d["file_name"], format=cfg.INPUT.FORMAT)
        h, w = image.shape[:2]
        resized = aug.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
        scale = max(1.0, min_panel_size / min(h, w))
        h, w = round(h * scale), round(w * scale)
        # outputs are rescaled to the requested height/width (masks pasted at that size)
        outputs = model([{"image": tensor, "height": h, "width": w}])[0]
        rgb = utils.convert_image_to_rgb(image, cfg.INPUT.FORMAT)
        if scale > 1:
            rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
        panels.append(draw_predictions(rgb, outputs, metadata, score_threshold))
    model.train(was_training)
    if not panels:
        return None
    height = max(p.shape[0] for p in panels)
    panels = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0))) for p in panels]
    grid = np.concatenate(panels, axis=1)
    os.makedirs(os.path.dirname(output_path) or ".", exist_ok=True)
    cv2.imwrite(output_path, grid[:, :, ::-1])
    logger.info("Wrote predictions of %d %s images to %s", len(panels), dataset_name, output_path)
    return output_path
