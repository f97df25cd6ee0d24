#!/usr/bin/env bash
# Set everything up and fine-tune the offline demo (MiniLM on Rotten Tomatoes reviews) on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 .venv/bin/python launcher/run.py recipes/demo.yaml output.overwrite=true "$@"
