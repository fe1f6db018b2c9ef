#!/usr/bin/env bash
# Set up (idempotent), check the import layering, and run the whole test suite, slow real-model tests included.
# Locally, skip the slow ones with: .venv/bin/python -m pytest -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/lint-imports  # the layering written in pyproject.toml [tool.importlinter]
.venv/bin/python -m pytest -q "$@"  # last: its closing line is what CI reads
