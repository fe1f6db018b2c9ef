#!/usr/bin/env bash
# Set up (idempotent) and run the quickstart: SmolLM2-135M, short 2-bit ParetoQ QAT, checkpoint, GGUF, llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/paretoq-export quickstart "$@"
