"""Train / evaluate HRNet models from Python (LazyConfig) configs.

Detectron2's ``tools/lazyconfig_train_net.py`` (not shipped in the pip package) with what
``train_net.py`` guarantees, from the same pieces of ``hrnet_d2.engine``: the generated
"shapes" datasets and the dataset checks, the model's wiring validated before data is
read, atomic checkpoints, bf16 AMP on CPU, ``--resume`` that continues the data stream
and RNG states of every rank, ``--num-gpus N`` on CPU (gloo).  Same CLI:

    python lazy_train_net.py --config-file configs/lazy/mask_rcnn_hrnetv2p_w32_1x.py --num-gpus 8
    python lazy_train_net.py --config-file configs/lazy/mask_rcnn_hrnetv2p_w18_small_shapes.py \
        train.max_iter=100 dataloader.train.total_batch_size=4
    python lazy_train_net.py --config-file ... --eval-only train.init_checkpoint=output/model_final.pth

Overrides are ``key=value`` in LazyConfig's dotted syntax (``model.backbone.bottom_up.stages.arch=w18``).
A mistake in what was given ends with one line ``error: ...`` and exit status 2;
``--debug`` (or HRNET_D2_DEBUG=1) shows the traceback.
"""

import logging

from omegaconf import OmegaConf

import detectron2.utils.comm as comm
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_argument_parser, default_setup, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils.logger import setup_logger

import hrnet_d2  # noqa: F401  (registers the backbones)
from hrnet_d2.checkpoint import AtomicCheckpointer
from hrnet_d2.checkpoint.inference import load_inference_weights
from hrnet_d2.config.validate import check_device, lazy_argument_errors, validate_model
from hrnet_d2.data import prepare_datasets, register_all_shapes
from hrnet_d2.data.checks import check_num_classes
from hrnet_d2.engine import ResumeState, create_ddp_model, launch_cli, set_cpu_threads, use_checked_data
from hrnet_d2.engine.train_loop import build_train_step
from hrnet_d2.utils.errors import add_debug_argument
from hrnet_d2.utils.file_io import check_output_dir

logger = logging.getLogger("detectron2")


def dataset_names(cfg, eval_only=False, splits=None):
    """Names of the datasets the config reads (train unless eval_only, and test; or ``splits``)."""
    names = []
    for split in splits or (("test",) if eval_only else ("train", "test")):
        loader = cfg.dataloader.get(split)
        if loader is None or "dataset" not in loader or "names" not in loader.dataset:
            continue
        value = loader.dataset.names
        names += [value] if isinstance(value, str) else list(value)
    return names


def do_test(cfg, model):
    if "evaluator" in cfg.dataloader:
        ret = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
        print_csv_format(ret)
        return ret


def build_model(cfg):
    with lazy_argument_errors(cfg.model):  # a module's bad argument named by its path, model.backbone...
        model = instantiate(cfg.model)
    validate_model(model)  # before any data is read
    return model.to(cfg.train.device)


def do_train(args, cfg):
    model = build_model(cfg)
    logger.info("Model:\n{}".format(model))

    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)

    train_loader = instantiate(cfg.dataloader.train)
    train_names = dataset_names(cfg, splits=("train",))
    check_num_classes(cfg, train_names)  # after loading: the json gives thing_classes

    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = build_train_step(model, train_loader, optim, amp=cfg.train.amp.enabled)
    # atomic saves; foreign HRNet layouts converted, misfits stopped (train.allow_partial_weights=True)
    checkpointer = AtomicCheckpointer(model, cfg.train.output_dir, cfg=cfg, trainer=trainer)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            ResumeState(
                getattr(train_loader, "resumable_sampler", None),  # None: a loader of the config's own
                cfg.dataloader.train.total_batch_size // comm.get_world_size(),
                cfg.train.checkpointer.period,
            ),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
            # metrics.json, TensorBoard events, and the console log with ETA
            (
                hooks.PeriodicWriter(
                    default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period
                )
                if comm.is_main_process()
                else None
            ),
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def main(args):
    register_all_shapes()
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    check_device(cfg.train.device, key="train.device")  # before anything is generated or built
    if comm.is_main_process():
        check_output_dir(cfg.train.output_dir, key="train.output_dir")
    default_setup(cfg, args)
    # default_setup configures the detectron2/fvcore loggers; ours too
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="hrnet_d2", abbrev_name="hrnet_d2")
    set_cpu_threads(cfg.train.device, OmegaConf.select(cfg, "dataloader.train.num_workers", default=0))
    prepare_datasets(dataset_names(cfg, args.eval_only))  # on every machine; missing files name the machine
    use_checked_data(cfg)

    if args.eval_only:
        model = create_ddp_model(build_model(cfg))
        load_inference_weights(model, cfg)  # train.init_checkpoint, else train.output_dir/model_final.pth
        return do_test(cfg, model)
    do_train(args, cfg)


def collective_timeout(args):
    """``train.dist_timeout_seconds`` of the config (DIST.TIMEOUT_SECONDS of YAML configs; None:
    Detectron2's 30 minutes), read before the processes start."""
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    return OmegaConf.select(cfg, "train.dist_timeout_seconds", default=None)


def cli(argv=None):
    args = add_debug_argument(default_argument_parser()).parse_args(argv)
    return launch_cli(main, args, timeout_seconds=lambda: collective_timeout(args))


if __name__ == "__main__":
    cli()
