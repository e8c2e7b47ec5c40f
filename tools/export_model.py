#!/usr/bin/env python
"""Export an HRNet model to TorchScript or ONNX with Detectron2's export tools.

Detectron2's ``tools/deploy/export_model.py`` (not shipped in the pip package), for our
configs, plus ``--what backbone`` (HRNet body + HRNetV2p pyramid alone, the part other
runtimes usually want) and a check that the exported model gives PyTorch's outputs.

    python tools/export_model.py --config-file configs/COCO-Detection/faster_rcnn_hrnetv2p_w32_1x.yaml \
        --format onnx --output export/ --opts MODEL.WEIGHTS model_final.pth MODEL.DEVICE cpu
    python tools/export_model.py --config-file ... --what backbone --format torchscript --output export/

Whole models are exported by tracing (``TracingAdapter``): the exported graph takes one
CHW image tensor (already resized, in the config's INPUT.FORMAT) and returns the
flattened Instances fields (boxes, classes, [28x28 ROI masks], scores, image size) at
that resized size, as Detectron2's export does (``do_postprocess=False``).  The backbone
export takes NCHW and returns the pyramid levels in order, with dynamic N/H/W in ONNX.
Scripting (``--export-method scripting``, TorchScript only) compiles the Python code
instead: ``torch.jit.script`` for the backbone (dynamic shapes, dict output) and
Detectron2's ``scripting_with_instances`` for whole R-CNNs, whose scripted
``inference(inputs, do_postprocess=False)`` returns Instances as the eager model does.
"""

import logging
import os

import numpy as np
import torch
from torch import nn

from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils as utils
from detectron2.export import TracingAdapter, dump_torchscript_IR, scripting_with_instances
from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.structures import Boxes

from hrnet_d2.checkpoint.inference import load_inference_weights
from hrnet_d2.engine.defaults import run_tool, tool_argument_parser, tool_setup
from hrnet_d2.engine.predictor import model_input, test_augmentations
from hrnet_d2.utils.errors import UserError

logger = logging.getLogger("hrnet_d2.export")

ONNX_OPSET = 17


class BackboneOutputs(nn.Module):
    """The backbone with a tuple output (in ``names`` order): what tracing / ONNX need."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.names = list(backbone.output_shape())

    def forward(self, x):
        features = self.backbone(x)
        return tuple(features[name] for name in self.names)


def sample_image(cfg, path=None):
    """A CHW float tensor as the model receives it: ``path`` (or the first test image,
    or noise) resized as at test time."""
    if path is None and cfg.DATASETS.TEST and cfg.DATASETS.TEST[0] in DatasetCatalog.list():
        try:
            path = DatasetCatalog.get(cfg.DATASETS.TEST[0])[0]["file_name"]
        except Exception as e:  # dataset files absent (e.g. COCO not downloaded)
            logger.warning("No image from %s (%s); exporting with a random image", cfg.DATASETS.TEST[0], e)
    if path is None:
        image = np.random.RandomState(0).randint(0, 256, (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST, 3))
        image = image.astype(np.uint8)
    else:
        image = utils.read_image(path, format=cfg.INPUT.FORMAT)
    return model_input(image, test_augmentations(cfg))["image"]


def raw_inference(model, inputs):
    """The model's outputs before resizing to the original image (Detectron2's export does
    the same): R-CNN masks stay 28x28 ROI probabilities, whose pasting does not export to ONNX."""
    if isinstance(model, GeneralizedRCNN):
        return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]
    return model(inputs)


def traceable(model, what, image):
    """(module, example inputs) to trace / export."""
    if what == "backbone":
        wrapped = BackboneOutputs(model.backbone).eval()
        x = ((image.to(model.pixel_mean.device) - model.pixel_mean) / model.pixel_std)[None]
        return wrapped, (x,)
    adapter = TracingAdapter(model, [{"image": image}], raw_inference).eval()
    return adapter, adapter.flattened_inputs


def export_tracing(model, what, image, fmt, output_dir):
    module, inputs = traceable(model, what, image)
    os.makedirs(output_dir, exist_ok=True)
    if fmt == "torchscript":
        with torch.no_grad():
            ts = torch.jit.trace(module, inputs)
        path = os.path.join(output_dir, f"{what}.ts")
        ts.save(path)
        dump_torchscript_IR(ts, output_dir)
    else:
        path = os.path.join(output_dir, f"{what}.onnx")
        kwargs = {}
        if what == "backbone":
            kwargs = dict(
                input_names=["image"],
                output_names=module.names,
                dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}},
            )
        with torch.no_grad():
            torch.onnx.export(module, inputs, path, opset_version=ONNX_OPSET, dynamo=False, **kwargs)
    logger.info("Exported %s (%s, tracing) to %s", what, fmt, path)
    return path, module, inputs


def instance_fields(model):
    """The Instances fields a scripted R-CNN carries (RPN proposals and the predictions)."""
    fields = {
        "proposal_boxes": Boxes,
        "objectness_logits": torch.Tensor,
        "pred_boxes": Boxes,
        "scores": torch.Tensor,
        "pred_classes": torch.Tensor,
    }
    roi_heads = getattr(model, "roi_heads", None)
    if getattr(roi_heads, "mask_on", False):
        fields["pred_masks"] = torch.Tensor
    if getattr(roi_heads, "keypoint_on", False):
        fields["pred_keypoints"] = torch.Tensor
    return fields


def export_scripting(model, what, output_dir):
    if what == "backbone":
        scripted = torch.jit.script(model.backbone)
    else:
        if not isinstance(model, GeneralizedRCNN):
            raise UserError(f"--export-method scripting of a whole model supports R-CNNs, not {type(model).__name__}")
        scripted = scripting_with_instances(model, instance_fields(model))
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, f"{what}.ts")
    scripted.save(path)
    dump_torchscript_IR(scripted, output_dir)
    logger.info("Exported %s (torchscript, scripting) to %s", what, path)
    return path


def instance_tensors(rcnn, image):
    """The Instances fields a (scripted or eager) R-CNN predicts on ``image``, as tensors in name order."""
    with torch.no_grad():
        fields = rcnn.inference([{"image": image}], do_postprocess=False)[0].get_fields()
    return [v.tensor if hasattr(v, "tensor") else v for _, v in sorted(fields.items())]


def _rel_diff(a, b):
    """max |a - b| / max |b| (b the PyTorch output): comparable across models and CPUs."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not b.size:
        return 0.0
    return float(np.abs(a - b).max() / max(np.abs(b).max(), np.finfo(np.float32).tiny))


def scripting_diff(model, path, what, image):
    """Largest |scripted - PyTorch| on ``image``, relative to each output's max |PyTorch|
    (inf when shapes differ)."""
    scripted = torch.jit.load(path)
    if what == "backbone":
        _, (x,) = traceable(model, what, image)  # the normalised NCHW input the backbone sees
        with torch.no_grad():
            got, ref = list(scripted(x).values()), list(model.backbone(x).values())
    else:
        got, ref = instance_tensors(scripted, image), instance_tensors(model, image)
    if len(got) != len(ref) or any(a.shape != b.shape for a, b in zip(got, ref)):
        return float("inf")
    return max(_rel_diff(a.numpy(), b.numpy()) for a, b in zip(got, ref))


def run_exported(path, fmt, inputs):
    """Outputs (list of numpy arrays) of an exported file on ``inputs``."""
    if fmt == "torchscript":
        with torch.no_grad():
            outputs = torch.jit.load(path)(*inputs)
        return [o.numpy() for o in (outputs if isinstance(outputs, (tuple, list)) else [outputs])]
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)


def max_rel_diff(module, path, fmt, inputs):
    """Largest |exported - PyTorch| over all outputs, relative to each output's max
    |PyTorch| (inf when shapes differ)."""
    with torch.no_grad():
        reference = module(*inputs)
    reference = [r.numpy() for r in (reference if isinstance(reference, (tuple, list)) else [reference])]
    exported = run_exported(path, fmt, inputs)
    if len(exported) != len(reference) or any(a.shape != b.shape for a, b in zip(exported, reference)):
        return float("inf")
    return max(_rel_diff(a, b) for a, b in zip(exported, reference))


def disable_fast_paths(model):
    """Export the reference graph: inference-only fast paths (e.g. HRNet's folded oneDNN
    kernels, ``inference_fuse``) call ops that ONNX and portable TorchScript lack."""
    for m in model.modules():
        if hasattr(m, "inference_fuse"):
            m.inference_fuse = False
        if hasattr(m, "training_fuse"):
            m.training_fuse = False
    return model


def load_model(cfg):
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        load_inference_weights(model, cfg)  # the one place MODEL.WEIGHTS is resolved for inference
    else:
        logger.warning("MODEL.WEIGHTS is empty: exporting a randomly initialised model")
    return disable_fast_paths(model.eval())


def get_parser():
    parser = tool_argument_parser(__doc__, opts_flag=True)
    parser.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript")
    parser.add_argument("--export-method", choices=["tracing", "scripting"], default="tracing")
    parser.add_argument("--what", choices=["model", "backbone"], default="model")
    parser.add_argument("--sample-image", default=None, help="image used for tracing (default: first test image)")
    parser.add_argument("--output", required=True, help="output folder")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    cfg = tool_setup(args)
    if args.export_method == "scripting" and args.format != "torchscript":
        raise UserError("--export-method scripting only produces TorchScript (--format torchscript)")
    model = load_model(cfg)
    image = sample_image(cfg, args.sample_image)
    if args.export_method == "scripting":
        path = export_scripting(model, args.what, args.output)
        diff = scripting_diff(model, path, args.what, image)
        logger.info("Scripted vs PyTorch on the sample: max |difference| / max |output| = %.3g", diff)
        return path, diff
    logger.info("Tracing with an input of shape %s", tuple(image.shape))
    path, module, inputs = export_tracing(model, args.what, image, args.format, args.output)
    diff = max_rel_diff(module, path, args.format, inputs)
    logger.info("Exported vs PyTorch on the sample: max |difference| / max |output| = %.3g", diff)
    return path, diff


if __name__ == "__main__":
    run_tool(main)
