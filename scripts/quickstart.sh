#!/usr/bin/env bash
# Set up (idempotent) and run the quickstart: SmolLM2-135M, short QAT in the Q4_0 layout, checkpoint, GGUF, llama.cpp,
# next to the F16 file and llama.cpp's own Q4_0.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/paretoq-export quickstart "$@"
