#!/usr/bin/env bash
# Idempotent set-up: .venv in the repo, pinned dependencies, detectron2, hrnet_d2 (editable).
# Re-running is a no-op unless requirements*.txt, setup.py or this script changed.
#
# Detectron2: if the Python you run this with can already import detectron2 (e.g. built
# from the official source), the venv sees it (--system-site-packages) and neither torch
# nor detectron2 is installed over it.  Otherwise the faithful redistribution
# sal-detectron2==0.7.2 (upstream a59f0563) is installed: its pure-Python package runs
# on 3.11; its compiled extension (CPython 3.10) is not needed by the R-CNN models.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
VENV=.venv
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import detectron2" >/dev/null 2>&1; then
    echo "[setup] detectron2 is importable from $PY: creating a venv that sees it" >&2
    "$PY" -m venv --system-site-packages "$VENV"
    touch "$VENV/.use-system-detectron2"
  else
    "$PY" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"
stamp="$VENV/.hrnet_d2_setup"
digest=$(cat requirements.txt requirements-torch.txt requirements-mmdet.txt setup.py scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ] && "$VPY" -c "import hrnet_d2, detectron2" >/dev/null 2>&1; then
  exit 0
fi

echo "[setup] installing pinned dependencies into $VENV (first run takes a few minutes)" >&2
if [ ! -f "$VENV/.use-system-detectron2" ]; then
  "$VPY" -m pip install -q -r requirements-torch.txt
fi
"$VPY" -m pip install -q -r requirements.txt
if ! "$VPY" -c "import detectron2" >/dev/null 2>&1; then
  SITE=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  "$VPY" -m pip install -q --no-deps --only-binary=:all: --python-version 3.10 \
    --implementation cp --target "$SITE" --upgrade sal-detectron2==0.7.2
fi
"$VPY" -m pip install -q --no-deps --no-build-isolation -e .
# Test-only oracle for converted detectors (tests/test_mmdet_oracle.py): mmdetection 3.3.0 on mmcv-lite
# (no compiled ops; the tests stand in for the two kernels they need).  mmcv-lite is a source package:
# built here against the venv's torch and setuptools (< 81, pinned in requirements.txt), ~1 min.
"$VPY" -m pip install -q -r requirements-mmdet.txt
"$VPY" -m pip install -q --no-deps mmengine==0.10.7 mmdet==3.3.0
"$VPY" -m pip install -q --no-deps --no-build-isolation mmcv-lite==2.1.0
"$VPY" -c "import detectron2, hrnet_d2; print('[setup] detectron2', detectron2.__version__, 'from', detectron2.__path__[0])" >&2
echo "$digest" > "$stamp"
