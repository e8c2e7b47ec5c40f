#!/usr/bin/env bash
# Fine-tuning measured on generated data (docs/finetune.md, "A measured run"):
#   1. a detector trained elsewhere: Faster R-CNN HRNetV2p-W18-small-v1 on the 4-class "shapes" data
#      (circle, square, triangle, star), from scratch;
#   2. a new dataset that shares two class names (circle, square) and adds one (hexagon);
#   3. the same fine-tuning schedule from scratch, from (1) without class-name transfer, from (1) with it;
#      COCO AP on the new validation split every EVAL iterations.
# CPU-sized (128 px images); run from the repository root:  bash scripts/finetune_shapes.sh
set -euo pipefail
OUT=${OUT:-output/finetune_shapes}
DATA=${DATA:-datasets/finetune_shapes}
ITERS=${ITERS:-150}
EVAL=${EVAL:-50}
PY=${PYTHON:-python}
BASE=configs/shapes/Base-HRNetV2p-shapes.yaml
SIZE=(INPUT.MIN_SIZE_TRAIN "(128,)" INPUT.MAX_SIZE_TRAIN 128 INPUT.MIN_SIZE_TEST 128 INPUT.MAX_SIZE_TEST 128)

$PY - "$DATA" <<'PYEOF'
import sys
from hrnet_d2.data.shapes import generate_split
for split, n, seed in (("hexagons_train", 100, 1), ("hexagons_val", 50, 2)):
    generate_split(sys.argv[1], split, n, size=128, seed=seed, classes=("circle", "square", "hexagon"))
PYEOF

if [ ! -f "$OUT/pre/model_final.pth" ]; then
  $PY train_net.py --config-file $BASE OUTPUT_DIR "$OUT/pre" SOLVER.IMS_PER_BATCH 4 SOLVER.BASE_LR 0.02 \
    SOLVER.MAX_ITER 800 SOLVER.STEPS "(600,)" SOLVER.WARMUP_ITERS 100 SOLVER.CHECKPOINT_PERIOD 400 \
    TEST.EVAL_PERIOD 0 DATALOADER.NUM_WORKERS 1 "${SIZE[@]}"
fi

D="$DATA/shapes"
COMMON=(--config-file $BASE
  --dataset "hexagons_train=$D/annotations/hexagons_train.json:$D/hexagons_train"
  --dataset "hexagons_val=$D/annotations/hexagons_val.json:$D/hexagons_val"
  DATASETS.TRAIN '("hexagons_train",)' DATASETS.TEST '("hexagons_val",)'
  SOLVER.IMS_PER_BATCH 4 SOLVER.BASE_LR 0.01 SOLVER.MAX_ITER "$ITERS" SOLVER.WARMUP_ITERS 30
  SOLVER.STEPS "($((ITERS * 4 / 5)),)" SOLVER.CHECKPOINT_PERIOD 100000 TEST.EVAL_PERIOD "$EVAL"
  DATALOADER.NUM_WORKERS 1 "${SIZE[@]}")
$PY train_net.py "${COMMON[@]}" MODEL.WEIGHTS "" OUTPUT_DIR "$OUT/scratch"
$PY train_net.py "${COMMON[@]}" MODEL.WEIGHTS "$OUT/pre/model_final.pth" MODEL.CLASS_NAME_TRANSFER False \
  OUTPUT_DIR "$OUT/no_transfer"
$PY train_net.py "${COMMON[@]}" MODEL.WEIGHTS "$OUT/pre/model_final.pth" OUTPUT_DIR "$OUT/transfer"

# box AP (and per class) at every evaluation, from metrics.json
$PY - "$OUT" "$ITERS" <<'PYEOF'
import json, sys, os
for run in ("scratch", "no_transfer", "transfer"):
    path = os.path.join(sys.argv[1], run, "metrics.json")
    rows = [json.loads(l) for l in open(path)]
    for r in rows:
        if "bbox/AP" in r:
            per = ", ".join(f"{k[8:]} {r[k]:.1f}" for k in sorted(r) if k.startswith("bbox/AP-"))
            it = min(r["iteration"] + 1, int(sys.argv[2]))  # the final evaluation is logged one past the end
            print(f"{run:12s} iter {it:4d}: AP {r['bbox/AP']:.1f}  AP50 {r['bbox/AP50']:.1f}  ({per})")
PYEOF
