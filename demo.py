#!/usr/bin/env python
"""Run a trained model on images and write the predictions drawn by Detectron2's Visualizer.

    # the quickstart's model, out of the box (after bash scripts/quickstart.sh):
    python demo.py --input datasets/shapes/val --output output/demo
    # any config + weights, files / folders / globs:
    python demo.py --config-file configs/COCO-InstanceSegmentation/mask_rcnn_hrnetv2p_w32_1x.yaml \
        --input photos/*.jpg --output out/ --opts MODEL.WEIGHTS model_final.pth MODEL.DEVICE cpu
    # a LazyConfig: weights from train.init_checkpoint
    python demo.py --config-file configs/lazy/mask_rcnn_hrnetv2p_w18_small_shapes.py --input a.png \
        --output out/ --opts train.init_checkpoint=output/lazy/mask_rcnn_shapes/model_final.pth

Weights: MODEL.WEIGHTS, else ``OUTPUT_DIR/model_final.pth`` (what train_net.py writes).
Class names come from the config's first test dataset.  A mistake (no images, no weights,
a config or device error) ends with one line ``error: ...`` and exit status 2; ``--debug``
shows the traceback.
"""

import argparse
import glob
import logging
import os
import sys
from pathlib import Path

import cv2
import torch
from tqdm import tqdm

from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.utils.logger import setup_logger

import hrnet_d2  # noqa: F401  (registers the backbones)
from hrnet_d2.checkpoint import AtomicCheckpointer
from hrnet_d2.config.validate import check_device, lazy_argument_errors, validate_config
from hrnet_d2.data import register_all_shapes
from hrnet_d2.engine.predictor import model_input, test_augmentations
from hrnet_d2.utils.errors import UserError, add_debug_argument, exit_on_user_error
from hrnet_d2.utils.visualization import draw_predictions

DEFAULT_CONFIG = "configs/quickstart/mask_rcnn_hrnetv2p_w18_small_shapes.yaml"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

logger = logging.getLogger("hrnet_d2.demo")


class DemoInputError(UserError, FileNotFoundError):
    """--input names no image, or the model weights are not there."""


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = Path(__file__).resolve().parent
    parser.add_argument("--config-file", default=str(here / DEFAULT_CONFIG), help="YAML or LazyConfig .py")
    parser.add_argument("--input", nargs="+", required=True, help="image files, folders or glob patterns")
    parser.add_argument("--output", required=True, help="folder for the PNGs (or a .png path for one input)")
    parser.add_argument("--confidence-threshold", type=float, default=0.5)
    add_debug_argument(parser)
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE / key=value")
    return parser


def expand_inputs(patterns):
    files = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            files += sorted(str(p) for p in Path(pattern).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif os.path.isfile(pattern):
            files.append(pattern)
        else:
            matches = sorted(glob.glob(os.path.expanduser(pattern)))
            if not matches:
                raise DemoInputError(f"--input {pattern!r}: no such file, folder or matching image")
            files += matches
    if not files:
        raise DemoInputError(f"--input {patterns}: no images found (extensions {IMAGE_EXTENSIONS})")
    return files


class Predictor:
    """DefaultPredictor for YAML and LazyConfig configs: resize, run, outputs at input size."""

    def __init__(self, config_file, opts, threshold):
        if config_file.endswith(".py"):
            from detectron2.config import LazyConfig, instantiate

            cfg = LazyConfig.apply_overrides(LazyConfig.load(config_file), opts)
            check_device(cfg.train.device, key="train.device")
            with lazy_argument_errors(cfg.model):
                self.model = instantiate(cfg.model)
            self.model.to(cfg.train.device)
            weights = cfg.train.init_checkpoint or os.path.join(cfg.train.output_dir, "model_final.pth")
            self.augmentation = instantiate(cfg.dataloader.test.mapper.augmentations)
            self.input_format = self.model.input_format
            names = cfg.dataloader.test.dataset.names
            dataset = names if isinstance(names, str) else names[0]
        else:
            from hrnet_d2 import get_hrnet_cfg

            cfg = get_hrnet_cfg(config_file, opts)
            for head in ("RETINANET", "ROI_HEADS"):
                getattr(cfg.MODEL, head).SCORE_THRESH_TEST = threshold
            cfg.MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH = threshold
            from detectron2.modeling import build_model

            validate_config(cfg)
            from hrnet_d2.modeling.inference_autocast import autocast_heads

            self.model = build_model(cfg)
            autocast_heads(self.model, cfg.MODEL.HRNET.INFERENCE_AUTOCAST)
            weights = cfg.MODEL.WEIGHTS or os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
            self.augmentation = test_augmentations(cfg)
            self.input_format = cfg.INPUT.FORMAT
            dataset = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused"
        if not weights or not os.path.isfile(weights):
            raise DemoInputError(
                f"Model weights {weights!r} not found. Pass them with --opts MODEL.WEIGHTS path.pth "
                "(train.init_checkpoint=path.pth for a .py config), or train the quickstart model first: "
                "bash scripts/quickstart.sh"
            )
        # foreign HRNet layouts converted, misfits and incomplete checkpoints stopped (hrnet_d2/checkpoint.py)
        AtomicCheckpointer(self.model, cfg=cfg, complete=True).load(weights)
        self.model.eval()
        self.metadata = MetadataCatalog.get(dataset)
        logger.info("Loaded %s with weights %s", config_file, weights)

    @torch.no_grad()
    def __call__(self, image):
        """``image``: HxWx3 in the model's input format."""
        return self.model([model_input(image, self.augmentation)])[0]


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="hrnet_d2")
    setup_logger(name="fvcore")
    register_all_shapes()
    files = expand_inputs(args.input)
    predictor = Predictor(args.config_file, args.opts, args.confidence_threshold)
    single_file = args.output.lower().endswith(".png") and len(files) == 1
    if not single_file:
        os.makedirs(args.output, exist_ok=True)
    written = []
    for path in tqdm(files, desc="demo", disable=len(files) < 2):
        image = utils.read_image(path, format=predictor.input_format)
        outputs = predictor(image)
        rgb = utils.convert_image_to_rgb(image, predictor.input_format)
        drawn = draw_predictions(rgb, outputs, predictor.metadata, args.confidence_threshold)
        out = args.output if single_file else os.path.join(args.output, Path(path).stem + ".png")
        cv2.imwrite(out, drawn[:, :, ::-1])
        written.append(out)
        summary = f"{len(outputs['instances'])} instances" if "instances" in outputs else sorted(outputs)
        logger.info("%s: %s -> %s", path, summary, out)
    return written


if __name__ == "__main__":
    exit_on_user_error(main, sys.argv[1:])
