#!/usr/bin/env bash
# Set up (idempotent), then the main job on the embedded default: train a small HRNetV2p
# Mask R-CNN from scratch on the generated shapes dataset (CPU), evaluate it (COCO bbox +
# segm AP) and write a PNG of predictions.  Extra arguments go to train_net.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
exec .venv/bin/python train_net.py --config-file configs/quickstart/mask_rcnn_hrnetv2p_w18_small_shapes.yaml "$@"
