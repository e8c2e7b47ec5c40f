"""Faster R-CNN, HRNetV2p-W32, 1x: the LazyConfig equivalent of
configs/COCO-Detection/faster_rcnn_hrnetv2p_w32_1x.yaml (Mask R-CNN without the mask head)."""

from .mask_rcnn_hrnetv2p_w32_1x import dataloader, lr_multiplier, model, optimizer, train

model.roi_heads.update(mask_in_features=None, mask_pooler=None, mask_head=None)
dataloader.train.mapper.use_instance_mask = False
