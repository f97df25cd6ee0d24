#!/usr/bin/env bash
# Upstream canary: a side venv (.venv-canary) from the newest releases of every dependency, what moved against
# requirements-lock.txt, then the fast tests on it. Exit status: the tests'. Nothing in .venv or the lock changes.
#
#   bash scripts/canary.sh                   # fast tests (not slow, not Slurm)
#   bash scripts/canary.sh -m "not slurm"    # other pytest arguments replace the default selection
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv-canary}
rm -rf "$VENV"
VENV="$VENV" LATEST=1 DEMO_ASSETS=0 bash scripts/setup.sh
"$VENV/bin/python" scripts/lock.py diff
[ $# -gt 0 ] || set -- -m "not slow and not slurm"
status=0
LATEST=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider -rfE "$@" || status=$?
echo "canary: the newest releases $([ $status = 0 ] && echo pass || echo "FAIL (pytest exit $status)") the selected tests"
exit $status
