"""The ``Trainer`` of train_net.py, and ``use_checked_data`` for lazy_train_net.py."""

import logging
import os
import weakref

from detectron2.data import (
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data.build import _train_loader_from_config
from detectron2.engine import DefaultTrainer, TrainerBase, hooks
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, DatasetEvaluators, SemSegEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from detectron2.utils.registry import locate

from ..checkpoint import AtomicCheckpointer
from ..config.validate import check_world_size, validate_config
from ..data.checks import check_num_classes, load_dataset_dicts
from ..data.mapper import CheckedDatasetMapper
from ..modeling.inference_autocast import autocast_heads
from ..modeling.roi_align import parallel_roi_align
from .launch import create_ddp_model
from .resume import ResumeState, build_resumable_train_loader
from .train_loop import build_train_step

__all__ = ["Trainer", "inference_options", "use_checked_data"]

logger = logging.getLogger(__name__)


def use_checked_data(cfg):
    """Give a LazyConfig's data loaders (Detectron2's ``common/data`` layout) what
    ``Trainer`` gives YAML configs: datasets read by ``load_dataset_dicts`` (checked),
    images by ``CheckedDatasetMapper`` (errors name the file), and a training loader
    that resumes where the interrupted run was (``build_resumable_train_loader``).
    Other targets are left as the config names them.  Changes ``cfg`` in place."""
    swaps = {
        get_detection_dataset_dicts: load_dataset_dicts,
        DatasetMapper: CheckedDatasetMapper,
        build_detection_train_loader: build_resumable_train_loader,
    }

    def swap(node):
        if node is None or "_target_" not in node:
            return
        target = locate(node._target_) if isinstance(node._target_, str) else node._target_
        if target in swaps:
            node._target_ = swaps[target]
            if target is get_detection_dataset_dicts:
                node.pop("check_consistency", None)  # load_dataset_dicts always checks
                if "filter_empty" not in node:
                    node.filter_empty = True  # get_detection_dataset_dicts' default

    for split in ("train", "test"):
        loader = cfg.dataloader.get(split)
        if loader is not None:
            swap(loader)
            swap(loader.get("dataset"))
            swap(loader.get("mapper"))


def inference_options(model, cfg):
    """What hrnet_d2 adds to a built model for inference (``Trainer.build_model``, demo.py): the heads'
    convs / FCs under ``MODEL.HRNET.INFERENCE_AUTOCAST`` (the backbone applies it itself) and ROIAlign on all
    CPU threads (the same outputs).  Training is not affected.  Returns ``model``."""
    autocast_heads(model, cfg.MODEL.HRNET.INFERENCE_AUTOCAST)
    parallel_roi_align(model)
    return model


class Trainer(DefaultTrainer):
    """Detectron2's DefaultTrainer with evaluation by the dataset's evaluator_type, and:

    * the config is validated (``validate_config``) before the model is built;
    * datasets are checked when loaded and bad images stop training with the file named
      (``data/checks.py``, ``data/mapper.py``);
    * checkpoints are written atomically (``AtomicCheckpointer``) and also hold the RNG
      states of every rank; ``--resume`` skips the samples already seen
      (:class:`ResumeState`), so a resumed run continues the uninterrupted one (exact
      with DATALOADER.NUM_WORKERS 0);
    * several processes train on CPU too (gloo; :func:`create_ddp_model`);
    * a NaN/Inf loss or prediction stops training with the iteration named.
    """

    def __init__(self, cfg):
        # DefaultTrainer.__init__, with our DDP wrapper, the CPU AMP step and the
        # atomic checkpointer (built before the hooks, which take it)
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)
        # SOLVER.AMP.ENABLED on a CPU model: bf16 autocast (detectron2's AMPTrainer needs CUDA)
        self._trainer = build_train_step(model, data_loader, optimizer, amp=cfg.SOLVER.AMP.ENABLED)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, cfg=cfg, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        ret = super().build_hooks()
        resume = ResumeState(
            getattr(self.data_loader, "resumable_sampler", None),
            self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size(),
            self.cfg.SOLVER.CHECKPOINT_PERIOD,
        )
        # right before the PeriodicCheckpointer (rank 0) / the EvalHook (other ranks)
        at = next(i for i, h in enumerate(ret) if isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook)))
        ret.insert(at, resume)
        return ret

    @staticmethod
    def auto_scale_workers(cfg, num_workers):
        """DefaultTrainer's scaling to ``num_workers`` processes (SOLVER.REFERENCE_WORLD_SIZE),
        with one-line errors where Detectron2 asserts."""
        check_world_size(cfg, num_workers)
        return DefaultTrainer.auto_scale_workers(cfg, num_workers)

    @classmethod
    def build_model(cls, cfg):
        validate_config(cfg)
        return inference_options(super().build_model(cfg), cfg)

    @classmethod
    def build_train_loader(cls, cfg):
        dataset = load_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
            invalid_boxes="drop" if cfg.DATALOADER.DROP_INVALID_BOXES else "error",
        )
        check_num_classes(cfg, cfg.DATASETS.TRAIN)
        return build_resumable_train_loader(
            **_train_loader_from_config(cfg, CheckedDatasetMapper(cfg, True), dataset=dataset)
        )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        proposal_files = None
        if cfg.MODEL.LOAD_PROPOSALS:
            proposal_files = [cfg.DATASETS.PROPOSAL_FILES_TEST[list(cfg.DATASETS.TEST).index(dataset_name)]]
        dataset = load_dataset_dicts([dataset_name], proposal_files=proposal_files)
        return build_detection_test_loader(
            dataset=dataset,
            mapper=CheckedDatasetMapper(cfg, False),
            num_workers=cfg.DATALOADER.NUM_WORKERS,
            batch_size=cfg.TEST.IMS_PER_BATCH,
        )

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
