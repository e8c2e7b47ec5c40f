"""Pieces of train_net.py that users of their own Detectron2 scripts may want too."""

import logging
import os
import weakref

import cv2
import numpy as np
import torch
from torch.multiprocessing import ProcessExitedException

from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data import detection_utils as utils
from detectron2.data.build import _train_loader_from_config
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import DefaultTrainer, TrainerBase, hooks, launch
from detectron2.engine.defaults import create_ddp_model as _d2_create_ddp_model
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, DatasetEvaluators, SemSegEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from detectron2.utils.registry import locate

from .amp import build_train_step
from .build import validate_config
from .checkpoint import AtomicCheckpointer, capture_rng_state, restore_rng_state
from .config import ConfigValueError
from .data.checks import check_num_classes, load_dataset_dicts
from .data.mapper import CheckedDatasetMapper
from .data.sampler import ResumableSampler
from .errors import DEBUG_ENV, UserError, exit_on_user_error_in_worker
from .inference_autocast import autocast_heads
from .predict import model_input, test_augmentations
from .visualization import draw_predictions

__all__ = [
    "launch_cli",
    "Trainer",
    "ResumeState",
    "build_resumable_train_loader",
    "use_checked_data",
    "create_ddp_model",
    "set_cpu_threads",
    "check_datasets",
    "visualize_predictions",
    "DatasetFilesMissing",
]

logger = logging.getLogger(__name__)


def set_cpu_threads(device, num_workers):
    """On CPU, give each training process its share of the cores, less one per
    data-loader worker (at least 1 thread).

    PyTorch's default (one thread per core in every process) plus the workers
    oversubscribes the cores, and OpenMP's spinning threads then slow down many-fold
    when anything else runs.  With ``--num-gpus N`` on CPU the N processes of a machine
    share its cores.  An explicit OMP_NUM_THREADS wins.
    """
    if torch.device(device).type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    processes = comm.get_local_size()
    torch.set_num_threads(max(1, cores // processes - num_workers))
    logger.info(
        "Using %d CPU threads (%d cores, %d training processes on this machine, %d data-loader workers each)",
        torch.get_num_threads(),
        cores,
        processes,
        num_workers,
    )


def create_ddp_model(model, **kwargs):
    """Detectron2's ``create_ddp_model``, also for a model on the CPU.

    Detectron2 gives DistributedDataParallel ``device_ids=[local rank]``, which only a
    single-GPU module accepts; a CPU module (``launch`` picks the gloo backend when
    there is no CUDA) takes none.
    """
    if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return _d2_create_ddp_model(model, **kwargs)


class ResumeState(hooks.HookBase):
    """Makes ``--resume`` continue the interrupted run, in every process.

    * The RNG states (Python, NumPy, torch) of every rank are saved in the checkpoint
      (as this hook's state) and restored on the same rank before the first resumed
      step: augmentations and the sampling of anchors / RoIs continue as they would
      have.
    * Each rank's training data stream (a :class:`ResumableSampler`) skips the samples
      that the iterations before the checkpoint consumed.

    Register it on every rank, after the LRScheduler hook and right before the
    PeriodicCheckpointer (which exists on rank 0 only); at the checkpointer's
    iterations it gathers the states of all ranks to rank 0.

    Args:
        sampler (ResumableSampler or None): this rank's training sampler.
        images_per_rank (int): images per iteration in each process.
        checkpoint_period (int): the PeriodicCheckpointer's period.
    """

    def __init__(self, sampler, images_per_rank, checkpoint_period):
        self._sampler = sampler
        self._images_per_rank = images_per_rank
        self._period = checkpoint_period
        self._rng, self._rng_iter = None, None  # states of all ranks, captured after iteration _rng_iter
        self._to_restore = None

    def after_step(self):
        it = self.trainer.iter
        # the iterations where fvcore's PeriodicCheckpointer.step saves
        if (it + 1) % self._period == 0 or it >= self.trainer.max_iter - 1:
            state = capture_rng_state()
            self._rng = comm.gather(state) if comm.get_world_size() > 1 else [state]
            self._rng_iter = it

    def state_dict(self):
        if self._rng_iter != self.trainer.iter:  # a save outside the checkpointer's schedule
            if comm.get_world_size() > 1:
                return {}  # the other ranks' states cannot be collected here
            self._rng, self._rng_iter = [capture_rng_state()], self.trainer.iter
        return {"rng": self._rng}

    def load_state_dict(self, state_dict):
        self._to_restore = state_dict.get("rng")

    def before_train(self):
        start = self.trainer.start_iter
        if self._sampler is not None:
            self._sampler.start = start * self._images_per_rank
        if self._to_restore is not None:
            if len(self._to_restore) == comm.get_world_size():
                restore_rng_state(self._to_restore[comm.get_rank()])
            else:
                logger.warning(
                    "The checkpoint holds the RNG states of %d processes, this run has %d: "
                    "RNGs keep their fresh per-rank seeds",
                    len(self._to_restore),
                    comm.get_world_size(),
                )
            self._to_restore = None
        if start:
            optimizer = self.trainer.optimizer
            lr = optimizer.param_groups[hooks.LRScheduler.get_best_param_group_id(optimizer)]["lr"]
            # every rank logs it (ranks > 0 to OUTPUT_DIR/log.txt.rank<N>)
            logger.info(
                "Rank %d resumes at iteration %d, lr %.10g, after %d samples of its training data stream",
                comm.get_rank(),
                start,
                lr,
                self._sampler.start if self._sampler is not None else -1,
            )


def build_resumable_train_loader(dataset, *, mapper, sampler=None, **kwargs):
    """Detectron2's ``build_detection_train_loader`` (same arguments) whose sampler can
    start part-way through its stream: a :class:`ResumableSampler` around ``sampler``
    (default: Detectron2's TrainingSampler), also returned as the loader's
    ``resumable_sampler`` for :class:`ResumeState`."""
    if sampler is None and not isinstance(dataset, torch.utils.data.IterableDataset):
        sampler = TrainingSampler(len(dataset))
    sampler = ResumableSampler(sampler) if sampler is not None else None
    # The DataLoader draws its workers' base seed when iterated; a private generator
    # (seeded from the already-seeded NumPy RNG) keeps that draw off the global torch
    # RNG, whose state a resumed run restores.
    kwargs.setdefault("seed", int(np.random.randint(2**31)))
    loader = build_detection_train_loader(dataset, mapper=mapper, sampler=sampler, **kwargs)
    loader.resumable_sampler = sampler
    return loader


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
        ref, batch = cfg.SOLVER.REFERENCE_WORLD_SIZE, cfg.SOLVER.IMS_PER_BATCH
        if not isinstance(ref, int) or ref < 0 or (ref not in (0, num_workers) and batch % ref):
            raise ConfigValueError(
                "SOLVER.REFERENCE_WORLD_SIZE",
                ref,
                f"must be 0 (no scaling) or a number of processes that divides SOLVER.IMS_PER_BATCH = {batch} "
                f"(for a smaller batch than the recipe's, also set SOLVER.REFERENCE_WORLD_SIZE 0)",
            )
        if not ref and batch % num_workers:
            raise ConfigValueError(
                "SOLVER.IMS_PER_BATCH", batch, f"must be divisible by the number of training processes ({num_workers})"
            )
        return DefaultTrainer.auto_scale_workers(cfg, num_workers)

    @classmethod
    def build_model(cls, cfg):
        validate_config(cfg)
        model = super().build_model(cfg)
        autocast_heads(model, cfg.MODEL.HRNET.INFERENCE_AUTOCAST)  # the backbone applies it itself
        return model

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


_PATH_KEYS = ("json_file", "image_root", "sem_seg_root", "panoptic_root", "panoptic_json")


class DatasetFilesMissing(UserError, FileNotFoundError):
    """A dataset's files are not on disk (or the dataset is not registered)."""


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
    augmentations = test_augmentations(cfg)
    was_training = model.training
    model.eval()
    panels = []
    for d in dicts:
        image = utils.read_image(d["file_name"], format=cfg.INPUT.FORMAT)
        h, w = image.shape[:2]
        scale = max(1.0, min_panel_size / min(h, w))
        h, w = round(h * scale), round(w * scale)
        # outputs are rescaled to the requested height/width (masks pasted at that size)
        outputs = model([model_input(image, augmentations, h, w)])[0]
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


def launch_cli(main, args):
    """Run ``main(args)`` through Detectron2's ``launch`` (``args.num_gpus`` processes per machine,
    NCCL on GPUs, gloo on CPU) so that a user mistake ends the command with one ``error:`` line and
    exit status 2 from any process (``--debug``: the traceback, also in the spawned workers)."""
    if args.debug:
        os.environ[DEBUG_ENV] = "1"  # seen by the spawned workers too
    try:
        return launch(
            exit_on_user_error_in_worker,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(main, args),
        )
    except ProcessExitedException as e:  # a worker stopped on a user mistake and said why
        if e.exit_code == UserError.exit_code:
            raise SystemExit(e.exit_code) from None
        raise
