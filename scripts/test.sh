#!/usr/bin/env bash
# Set up (idempotent), check format and lint (ruff, ruff.toml), then run the whole test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
.venv/bin/ruff format --check --quiet . || { echo "ruff format: files above need .venv/bin/ruff format ." >&2; exit 1; }
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest tests "$@"
