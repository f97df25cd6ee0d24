#!/usr/bin/env bash
# Set everything up and run the whole test suite (slow and real-Slurm tests included; Slurm tests skip
# with a reason where this is not root with apt). Quicker: bash scripts/test.sh -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python -m pytest "$@"
