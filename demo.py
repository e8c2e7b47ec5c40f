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
    # predictions as data (COCO results, pycocotools' loadRes), 8 images per forward pass
    python demo.py --input photos/ --json out/results.json --batch-size 8 --opts MODEL.WEIGHTS model_final.pth
    # a video, drawn frame by frame
    python demo.py --video-input clip.mp4 --output out/clip.mp4 --opts MODEL.WEIGHTS model_final.pth

Weights: MODEL.WEIGHTS, else ``OUTPUT_DIR/model_final.pth`` (what train_net.py writes);
``hrnet_d2.checkpoint.inference`` decides, for the tools too.  Class names (and, for --json,
category and image ids) come from the config's first test dataset.  Grayscale, palette, RGBA,
16-bit and EXIF-rotated images work; a file that cannot be read is named, skipped and counted
(exit status 1 when no input could be read).  With --json the model keeps the config's test
score threshold (what evaluation uses: the file gives --eval-only's AP); --confidence-threshold
only filters what is drawn.  A mistake (no images, no weights, a config or device error) ends
with one line ``error: ...`` and exit status 2; ``--debug`` shows the traceback.
"""

import argparse
import glob
import logging
import os
import sys
import time
from pathlib import Path

import cv2
import torch
from tqdm import tqdm

from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.utils.logger import setup_logger

import hrnet_d2  # noqa: F401  (registers the backbones)
from hrnet_d2.checkpoint.inference import load_inference_weights
from hrnet_d2.config.validate import check_device, lazy_argument_errors, validate_config
from hrnet_d2.data import register_all_shapes
from hrnet_d2.engine.predictor import CocoResults, image_batches, model_input, test_augmentations
from hrnet_d2.utils.errors import UserError, add_debug_argument, exit_on_user_error
from hrnet_d2.utils.file_io import check_output_dir
from hrnet_d2.utils.visualization import draw_predictions

DEFAULT_CONFIG = "configs/quickstart/mask_rcnn_hrnetv2p_w18_small_shapes.yaml"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

logger = logging.getLogger("hrnet_d2.demo")


class DemoInputError(UserError, FileNotFoundError):
    """--input names no image, or the video cannot be opened."""


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = Path(__file__).resolve().parent
    parser.add_argument("--config-file", default=str(here / DEFAULT_CONFIG), help="YAML or LazyConfig .py")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="image files, folders or glob patterns")
    source.add_argument("--video-input", help="a video file (read with OpenCV); --output: the annotated video")
    parser.add_argument(
        "--output", help="folder for the PNGs (or a .png path for one input; a video path, or folder, for a video)"
    )
    parser.add_argument("--json", help="write the predictions as COCO results to this file (and the image list)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    parser.add_argument(
        "--num-workers", type=int, default=None, help="processes decoding images (default: 0 at batch 1, else 2)"
    )
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
    """DefaultPredictor for YAML and LazyConfig configs, on batches: resize, run, outputs at input size.

    Args:
        config_file, opts: the config and its overrides.
        threshold: the model's test score threshold (None: the config's).
    """

    def __init__(self, config_file, opts, threshold=None):
        if config_file.endswith(".py"):
            from detectron2.config import LazyConfig, instantiate

            cfg = LazyConfig.apply_overrides(LazyConfig.load(config_file), opts)
            check_device(cfg.train.device, key="train.device")
            with lazy_argument_errors(cfg.model):
                self.model = instantiate(cfg.model)
            self.model.to(cfg.train.device)
            self.augmentation = instantiate(cfg.dataloader.test.mapper.augmentations)
            self.input_format = self.model.input_format
            names = cfg.dataloader.test.dataset.names
            dataset = names if isinstance(names, str) else names[0]
        else:
            from hrnet_d2 import get_hrnet_cfg

            cfg = get_hrnet_cfg(config_file, opts)
            if threshold is not None:
                for head in ("RETINANET", "ROI_HEADS"):
                    getattr(cfg.MODEL, head).SCORE_THRESH_TEST = threshold
                cfg.MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH = threshold
            from detectron2.modeling import build_model

            validate_config(cfg)
            from hrnet_d2.engine import inference_options

            self.model = inference_options(build_model(cfg), cfg)
            self.augmentation = test_augmentations(cfg)
            self.input_format = cfg.INPUT.FORMAT
            dataset = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused"
        # MODEL.WEIGHTS / train.init_checkpoint, else OUTPUT_DIR/model_final.pth; the whole model from it
        weights = load_inference_weights(self.model, cfg)
        self.model.eval()
        self.metadata = MetadataCatalog.get(dataset)
        logger.info("Loaded %s with weights %s", config_file, weights)

    @torch.no_grad()
    def __call__(self, image):
        """``image``: HxWx3 in the model's input format."""
        return self.model([model_input(image, self.augmentation)])[0]

    @torch.no_grad()
    def batch(self, inputs):
        """Model input dicts (:func:`model_input`) -> their outputs, in one forward pass."""
        return self.model(list(inputs))


def _draw(predictor, image, outputs, threshold):
    rgb = utils.convert_image_to_rgb(image, predictor.input_format)
    return draw_predictions(rgb, outputs, predictor.metadata, threshold)[:, :, ::-1]  # BGR, for cv2


def run_on_images(args, predictor, files):
    """Predict ``files`` in batches; PNGs to --output, COCO results to --json.  Returns (written PNGs,
    unreadable files as (path, reason))."""
    single_file = bool(args.output) and args.output.lower().endswith(".png") and len(files) == 1
    results = CocoResults(predictor.metadata) if args.json else None
    workers = args.num_workers if args.num_workers is not None else (0 if args.batch_size == 1 else 2)
    written, unreadable, done = [], [], 0
    start = time.perf_counter()
    batches = image_batches(files, predictor.input_format, predictor.augmentation, args.batch_size, workers)
    with tqdm(total=len(files), desc="demo", disable=len(files) < 2) as bar:
        for batch in batches:
            bar.update(len(batch))
            for item in batch:
                if "error" in item:
                    logger.warning("Skipped: %s", item["error"])
                    unreadable.append((item["file_name"], item["error"]))
            batch = [item for item in batch if "error" not in item]
            if not batch:
                continue
            outputs = predictor.batch(item["input"] for item in batch)
            done += len(batch)
            for item, out in zip(batch, outputs):
                path, image = item["file_name"], item["image"]
                if results is not None:
                    results.add(path, image.shape[0], image.shape[1], out)
                summary = f"{len(out['instances'])} instances" if "instances" in out else sorted(out)
                if args.output:
                    dst = args.output if single_file else os.path.join(args.output, Path(path).stem + ".png")
                    cv2.imwrite(dst, _draw(predictor, image, out, args.confidence_threshold))
                    written.append(dst)
                    logger.info("%s: %s -> %s", path, summary, dst)
                else:
                    logger.info("%s: %s", path, summary)
    seconds = time.perf_counter() - start
    if done:
        logger.info(
            "%d images in %.1f s (%.2f images/s, batch size %d, %d decoding workers)",
            done,
            seconds,
            done / seconds,
            args.batch_size,
            workers,
        )
    if results is not None and done:
        logger.info("COCO results of %d images: %s (images: %s)", done, *results.write(args.json))
    return written, unreadable


def _video_output_path(args):
    if not args.output:
        raise DemoInputError("--video-input needs --output (a video file such as out.mp4, or a folder)")
    if os.path.splitext(args.output)[1].lower() in (".mp4", ".avi", ".mkv", ".mov"):
        return args.output
    return os.path.join(args.output, Path(args.video_input).stem + ".mp4")


def _open_video(path):
    video = cv2.VideoCapture(path)
    if not video.isOpened():
        raise DemoInputError(f"--video-input {path}: cannot be opened as a video (OpenCV)")
    return video


def run_on_video(args, predictor):
    """Draw the predictions on every frame of --video-input and write them to a video (as Detectron2's demo)."""
    video = _open_video(args.video_input)
    width, height = int(video.get(cv2.CAP_PROP_FRAME_WIDTH)), int(video.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    out_path = _video_output_path(args)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fourcc = "XVID" if out_path.lower().endswith(".avi") else "mp4v"
    writer = cv2.VideoWriter(out_path, cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
    if not writer.isOpened():
        raise DemoInputError(f"--output {out_path}: OpenCV cannot write a {fourcc} video there")
    frames = 0
    try:
        while True:
            ok, frame = video.read()  # BGR
            if not ok:
                break
            image = frame if predictor.input_format == "BGR" else frame[:, :, ::-1]
            outputs = predictor(image)
            writer.write(_draw(predictor, image, outputs, args.confidence_threshold))
            frames += 1
    finally:
        video.release()
        writer.release()
    if not frames:
        raise DemoInputError(f"--video-input {args.video_input}: no frame could be read")
    logger.info("%d frames of %s -> %s", frames, args.video_input, out_path)
    return [out_path]


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="hrnet_d2")
    setup_logger(name="fvcore")
    if args.batch_size < 1:
        raise DemoInputError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.input is not None and not args.output and not args.json:
        raise DemoInputError("--input needs --output (PNGs) and/or --json (COCO results)")
    register_all_shapes()
    files = expand_inputs(args.input) if args.input is not None else None
    if files is None:  # mistakes in the video arguments stop before the model is built
        _open_video(args.video_input).release()
        _video_output_path(args)
    single_png = args.output and args.output.lower().endswith(".png") and files is not None and len(files) == 1
    if args.output and files is not None and not single_png:
        check_output_dir(args.output, key="--output")
    # --json: the config's score threshold (evaluation's); drawing alone: the confidence threshold
    predictor = Predictor(args.config_file, args.opts, None if args.json else args.confidence_threshold)
    if files is None:
        return run_on_video(args, predictor)
    written, unreadable = run_on_images(args, predictor, files)
    if unreadable:
        logger.warning(
            "%d of %d inputs could not be read and were skipped: %s",
            len(unreadable),
            len(files),
            ", ".join(path for path, _ in unreadable),
        )
    if len(unreadable) == len(files):
        print(f"error: none of the {len(files)} inputs could be read (first: {unreadable[0][1]})", file=sys.stderr)
        raise SystemExit(1)
    return written


if __name__ == "__main__":
    exit_on_user_error(main, sys.argv[1:])
