"""configs/shapes/mask_rcnn_hrnetv2p_w18_small_shapes.yaml as a LazyConfig: a CPU-sized
Mask R-CNN (HRNet-W18-small-v1, 64-channel pyramid, trainable BN) on the generated
"shapes" dataset.

    python lazy_train_net.py --config-file configs/lazy/mask_rcnn_hrnetv2p_w18_small_shapes.py
"""

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.model_zoo import get_config
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from .common.hrnetv2p_rcnn import model

model.backbone.bottom_up.stages.arch = "w18_small_v1"
model.backbone.bottom_up.norm = "BN"
model.backbone.out_channels = 64
model.proposal_generator.head.in_channels = 64
model.proposal_generator.anchor_generator.sizes = [[16], [32], [64], [128], [256]]
model.proposal_generator.batch_size_per_image = 128
model.proposal_generator.pre_nms_topk = (1000, 500)
model.proposal_generator.post_nms_topk = (300, 100)
model.roi_heads.num_classes = 4
model.roi_heads.batch_size_per_image = 128
model.roi_heads.box_head.input_shape = ShapeSpec(channels=64, height=7, width=7)
model.roi_heads.box_head.fc_dims = [256, 256]
model.roi_heads.box_predictor.input_shape = ShapeSpec(channels=256)
model.roi_heads.box_predictor.test_topk_per_image = 20
model.roi_heads.mask_head.input_shape = ShapeSpec(channels=64, width=14, height=14)
model.roi_heads.mask_head.conv_dims = [64, 64, 64]

dataloader = get_config("common/data/coco.py").dataloader
dataloader.train.dataset.names = "shapes_train"
dataloader.train.mapper.image_format = "RGB"
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(160,), max_size=160, sample_style="choice"),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.total_batch_size = 8
dataloader.train.num_workers = 1
dataloader.test.dataset.names = "shapes_val"
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=160, max_size=160)]
dataloader.test.num_workers = 1

optimizer = get_config("common/optim.py").SGD
optimizer.lr = 0.02
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[1000, 1300], num_updates=1400),
    warmup_length=100 / 1400,
    warmup_factor=0.001,
)
train = get_config("common/train.py").train
train.max_iter = 1400
train.device = "cpu"
train.eval_period = 0  # evaluate once, at the end
train.checkpointer.period = 500
train.output_dir = "./output/lazy/mask_rcnn_shapes"
train.seed = 42
