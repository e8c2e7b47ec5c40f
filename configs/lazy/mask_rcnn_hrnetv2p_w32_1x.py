"""Mask R-CNN, HRNetV2p-W32, 1x (90k iterations, batch 16, LR 0.02): the LazyConfig
equivalent of configs/COCO-InstanceSegmentation/mask_rcnn_hrnetv2p_w32_1x.yaml.

    python lazy_train_net.py --config-file configs/lazy/mask_rcnn_hrnetv2p_w32_1x.py \
        train.init_checkpoint=pretrained/hrnetv2_w32_imagenet_d2.pth

Data augmentation is Detectron2's lazy COCO default (multi-scale 640-800 + flip), the
YAML uses a single 800 scale.
"""

from detectron2.model_zoo import get_config

from .common.hrnetv2p_rcnn import model

dataloader = get_config("common/data/coco.py").dataloader
dataloader.train.mapper.image_format = "RGB"
optimizer = get_config("common/optim.py").SGD
optimizer.params.weight_decay_norm = 1e-4  # as SOLVER.WEIGHT_DECAY_NORM in the YAML base
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_1x
train = get_config("common/train.py").train
train.init_checkpoint = ""  # e.g. a converted ImageNet checkpoint (README "Pretrained weights")
