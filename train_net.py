#!/usr/bin/env python
"""Train / evaluate Detectron2 models with HRNet backbones.

Detectron2's own ``tools/train_net.py`` plus: our config keys, the generated "shapes"
datasets, a dataset check that fails before anything is built, and a PNG of
predictions after evaluation.  Same CLI as Detectron2:

    python train_net.py --config-file configs/faster_rcnn_hrnetv2p_w32.yaml --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file ... --resume

``--num-gpus N`` starts N processes (Detectron2's ``launch``): on GPUs with NCCL, on a
CPU-only machine with gloo, the cores shared between them.  Started by torchrun or by srun
(one task per device), each process joins that job instead; a torchrun restart resumes from
the last complete checkpoint (docs/distributed.md):

    torchrun --nproc-per-node 8 --max-restarts 3 train_net.py --config-file ...

    # your own COCO-format data (README "Your own data"): register, then select by name
    python train_net.py --config-file ... --dataset mine_train=ann/train.json:images/train \
        --dataset mine_val=ann/val.json:images/val DATASETS.TRAIN '("mine_train",)' DATASETS.TEST '("mine_val",)'

A mistake in what was given (config, weights, data, device) ends with one line
``error: ...`` and exit status 2; ``--debug`` (or HRNET_D2_DEBUG=1) shows the traceback.
"""

import logging

from torch.nn.parallel import DistributedDataParallel

import detectron2.utils.comm as comm
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils.logger import setup_logger

from hrnet_d2 import get_hrnet_cfg
from hrnet_d2.checkpoint import AtomicCheckpointer
from hrnet_d2.checkpoint.inference import load_inference_weights
from hrnet_d2.checkpoint.pretrained import check_pretrained_weights
from hrnet_d2.config.validate import validate_config
from hrnet_d2.data import prepare_datasets, register_all_shapes
from hrnet_d2.data.user_datasets import add_dataset_argument, apply_user_datasets
from hrnet_d2.engine import Trainer, launch_cli, set_cpu_threads
from hrnet_d2.engine.predictor import visualize_predictions
from hrnet_d2.utils.errors import add_debug_argument
from hrnet_d2.utils.file_io import check_output_dir
from hrnet_d2.utils.safe_load import ALLOW_UNSAFE_YAML_ENV

logger = logging.getLogger("hrnet_d2")


def setup(args):
    allow_unsafe_yaml = getattr(args, "allow_unsafe_yaml", False) or None  # None: HRNET_D2_ALLOW_UNSAFE_YAML decides
    cfg = get_hrnet_cfg(args.config_file, args.opts, allow_unsafe_yaml=allow_unsafe_yaml)
    note = apply_user_datasets(cfg, args.dataset, args.opts)  # --dataset: registered here, i.e. in every worker
    cfg.freeze()
    validate_config(cfg)  # config mistakes stop before any output is written or data generated
    if comm.is_main_process():
        check_output_dir(cfg.OUTPUT_DIR)  # a folder that cannot be made or written: one line, before anything is built
    default_setup(cfg, args)
    # default_setup configures the detectron2/fvcore loggers; ours too
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="hrnet_d2", abbrev_name="hrnet_d2")
    if note:
        logger.info(note)
    set_cpu_threads(cfg.MODEL.DEVICE, cfg.DATALOADER.NUM_WORKERS)
    return cfg


def main(args):
    register_all_shapes()
    cfg = setup(args)
    check_pretrained_weights(cfg, args.config_file, resume=args.resume)
    names = list(cfg.DATASETS.TEST) + ([] if args.eval_only else list(cfg.DATASETS.TRAIN))
    prepare_datasets(names)  # generated on every machine; missing files stop naming the machine

    if args.eval_only:
        model = Trainer.build_model(cfg)
        if args.resume:  # the last checkpoint of OUTPUT_DIR (else MODEL.WEIGHTS), as Detectron2 does
            AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR, cfg=cfg, complete=True).resume_or_load(
                cfg.MODEL.WEIGHTS, resume=True
            )
        else:  # MODEL.WEIGHTS, else OUTPUT_DIR/model_final.pth: decided in one place for every inference entry point
            load_inference_weights(model, cfg)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
            visualize_predictions(cfg, model)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    res = trainer.train()
    if comm.is_main_process():
        model = trainer.model
        visualize_predictions(cfg, model.module if isinstance(model, DistributedDataParallel) else model)
    return res


def collective_timeout(args):
    """DIST.TIMEOUT_SECONDS of the config (read before the processes start)."""
    allow_unsafe_yaml = getattr(args, "allow_unsafe_yaml", False) or None
    return get_hrnet_cfg(args.config_file, args.opts, allow_unsafe_yaml=allow_unsafe_yaml).DIST.TIMEOUT_SECONDS


def get_parser():
    parser = add_dataset_argument(add_debug_argument(default_argument_parser()))
    parser.add_argument(
        "--allow-unsafe-yaml",
        action="store_true",
        help=f"read a config with python tags using yaml.unsafe_load (runs code: trusted files only; "
        f"same as {ALLOW_UNSAFE_YAML_ENV}=1)",
    )
    return parser


def cli(argv=None):
    args = get_parser().parse_args(argv)
    print("Command Line Args:", args)
    return launch_cli(main, args, timeout_seconds=lambda: collective_timeout(args))


if __name__ == "__main__":
    cli()
