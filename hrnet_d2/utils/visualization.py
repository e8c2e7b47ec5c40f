"""Drawing a model's predictions with Detectron2's Visualizer, whatever the meta-architecture."""

import torch

from detectron2.utils.visualizer import ColorMode, Visualizer

__all__ = ["draw_predictions"]


def draw_predictions(rgb, outputs, metadata, score_threshold=0.5, instance_mode=ColorMode.IMAGE):
    """An RGB uint8 image of ``outputs`` (one image's model output dict) drawn over ``rgb``.

    Panoptic output wins over instances, which win over semantic segmentation, as in
    Detectron2's demo.
    """
    visualizer = Visualizer(rgb, metadata, instance_mode=instance_mode)
    if "panoptic_seg" in outputs:
        panoptic_seg, segments_info = outputs["panoptic_seg"]
        vis = visualizer.draw_panoptic_seg_predictions(panoptic_seg.to("cpu"), segments_info)
    elif "instances" in outputs:
        instances = outputs["instances"].to("cpu")
        vis = visualizer.draw_instance_predictions(instances[instances.scores >= score_threshold])
    elif "sem_seg" in outputs:
        vis = visualizer.draw_sem_seg(outputs["sem_seg"].argmax(dim=0).to(torch.device("cpu")))
    else:
        raise ValueError(f"nothing to draw in model outputs with keys {sorted(outputs)}")
    return vis.get_image()
