#!/usr/bin/env python
"""Draw a config's training data: raw annotations or what the data loader feeds the model.

Detectron2's ``tools/visualize_data.py`` (not shipped in the pip package) with our
config keys and the generated datasets registered; it draws boxes, masks, keypoints
and semantic maps, whichever the dataset has.

    python tools/visualize_data.py --config-file configs/shapes/keypoint_rcnn_hrnetv2p_w18_small_shapes.yaml \
        --source annotation --output-dir output/vis_data
    python tools/visualize_data.py --config-file ... --source dataloader --output-dir ... --max-images 16
"""

import itertools
import os
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader
from detectron2.data import detection_utils as utils
from detectron2.utils.visualizer import Visualizer

from hrnet_d2.data import ensure_all_generated
from hrnet_d2.data.checks import check_datasets
from hrnet_d2.engine.defaults import run_tool, tool_argument_parser, tool_setup


def get_parser():
    parser = tool_argument_parser(__doc__)
    parser.add_argument("--source", choices=["annotation", "dataloader"], required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-images", type=int, default=50, help="stop after this many images")
    parser.add_argument("--scale", type=float, default=1.0)
    return parser


def _draw_annotation(dic, metadata, scale):
    image = utils.read_image(dic["file_name"], "RGB")
    return Visualizer(image, metadata=metadata, scale=scale).draw_dataset_dict(dic).get_image()


def _draw_loaded(per_image, cfg, metadata, scale):
    image = utils.convert_image_to_rgb(per_image["image"].permute(1, 2, 0).numpy(), cfg.INPUT.FORMAT)
    visualizer = Visualizer(image, metadata=metadata, scale=scale)
    if "sem_seg" in per_image:
        visualizer.draw_sem_seg(per_image["sem_seg"], alpha=0.5)
    if "instances" in per_image:
        fields = per_image["instances"].get_fields()
        labels = [metadata.thing_classes[i] for i in fields["gt_classes"]]
        visualizer.overlay_instances(
            labels=labels,
            boxes=fields.get("gt_boxes"),
            masks=fields.get("gt_masks"),
            keypoints=fields.get("gt_keypoints"),
        )
    return visualizer.output.get_image()


def main(argv=None):
    args = get_parser().parse_args(argv)
    cfg = tool_setup(args, loggers=("hrnet_d2",))
    cfg.DATALOADER.NUM_WORKERS = min(cfg.DATALOADER.NUM_WORKERS, 1)
    names = list(cfg.DATASETS.TRAIN)
    ensure_all_generated(names)
    check_datasets(names)
    metadata = MetadataCatalog.get(names[0])
    os.makedirs(args.output_dir, exist_ok=True)

    if args.source == "annotation":
        dicts = itertools.chain.from_iterable(DatasetCatalog.get(name) for name in names)
        items = ((d, str(d.get("image_id", Path(d["file_name"]).stem))) for d in dicts)
        draw = lambda d: _draw_annotation(d, metadata, args.scale)  # noqa: E731
    else:
        loader = build_detection_train_loader(cfg)
        items = ((d, str(d["image_id"])) for batch in loader for d in batch)
        draw = lambda d: _draw_loaded(d, cfg, metadata, args.scale)  # noqa: E731

    written = []
    seen = set()
    with tqdm(total=args.max_images, desc=f"visualize {args.source}") as progress:
        for item, image_id in itertools.islice(items, args.max_images):
            name = image_id if image_id not in seen else f"{image_id}_{len(written)}"
            seen.add(name)
            path = os.path.join(args.output_dir, f"{name}.png")
            cv2.imwrite(path, np.ascontiguousarray(draw(item)[:, :, ::-1]))
            written.append(path)
            progress.update()
    return written


if __name__ == "__main__":
    run_tool(main)
