#!/usr/bin/env bash
# The accelerator kit: verify and measure the launcher on one CUDA GPU in at most 8 minutes of wall time.
#
#   bash scripts/device_wheels.sh                 # once, here, with network: the wheels the GPU machine lacks -> .whl/
#   bash benchmarks/device/run.sh                 # there, from the repository root; results in $OUT
#   bash benchmarks/device/run.sh --smoke DIR     # CI: the same stages at toy sizes on the CPU, results in DIR
#
# On this workplace's lent GPU: device tool `run` with command "bash benchmarks/device/run.sh", carry [".whl"],
# timeout_s 540. On any CUDA machine with network: skip the wheels (pip install -e ".[deepspeed,bench,test]") and
# run it with OUT=folder. Stages, each under the time guard (KIT_BUDGET_S, default 470 s from the start):
#   1. install the carried wheels (--no-index, into /tmp/kit-site), print GPU, driver, libraries, free memory
#   2. the CUDA tests: pytest -m cuda tests/device/test_cuda.py (at most KIT_TEST_BUDGET_S, default 170 s)
#   3. benchmarks.compare: BERT-base seq 128 bf16 against both tutorials and the deferred-sync loop; Llama-3-8B
#      shape with LoRA at seq 512 in bf16, as a classifier and as SFT (python -m benchmarks.device.kit benchmarks;
#      a benchmark that would not finish before the guard is skipped and says so)
#   4. summary: device-kit.json / .md (targets met or missed by how much), plots, pytest report, kit.log, and
#      all-results.tar.gz with every result file and run log; at most 8 files, as the device tool returns.
# KIT_STAGES="tests" or "benchmarks" reruns one stage, KIT_BENCHMARKS=name,... some benchmarks (a warm machine's
# remaining minutes: the models stay in /tmp/kit-work). Order: bert-base-seq128, llama3-8b-lora-seq512,
# llama3-8b-lora-sft-seq512; the last is the first the time guard skips.
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)

SMOKE=0
if [ "${1:-}" = "--smoke" ]; then
    SMOKE=1
    OUT=${2:?usage: run.sh --smoke OUTPUT_DIR}
fi
OUT=${OUT:-$REPO/benchmarks/results/device-$(date -u +%Y%m%d-%H%M%S)}
PYTHON=${PYTHON:-python3}
# 8 minutes on the GPU less a margin; the smoke mode's time is the CI machine's business (no guard to speak of).
BUDGET=${KIT_BUDGET_S:-$( [ $SMOKE = 1 ] && echo 3600 || echo 470 )}
TEST_BUDGET=${KIT_TEST_BUDGET_S:-$( [ $SMOKE = 1 ] && echo 1800 || echo 170 )}
STAGES=${KIT_STAGES:-tests benchmarks}
WORK=${KIT_WORK:-$( [ $SMOKE = 1 ] && echo "$OUT/work" || echo /tmp/kit-work )}
STAGE_DIR=$WORK/results  # everything the kit writes; $OUT gets the files people read plus one archive
DEADLINE=$(( $(date +%s) + BUDGET ))
mkdir -p "$OUT" "$STAGE_DIR"
exec > >(tee -a "$STAGE_DIR/kit.log") 2>&1

left() { echo $(( DEADLINE - $(date +%s) )); }
# Each stage runs in its own process group under `timeout`, which ends the whole group (the training runs a
# stage starts too); SIGINT first, so pytest still writes its report.
guarded() {
    local seconds=$1; shift
    if [ "$seconds" -le 5 ]; then echo "[kit] no time left for: $*"; return 124; fi
    timeout -s INT -k 20 "$seconds" "$@"
}

echo "[kit] $(date -u +%FT%TZ) smoke=$SMOKE stages='$STAGES' budget=${BUDGET}s out=$OUT work=$WORK"
if [ $SMOKE = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kit-site .whl/*.whl \
        || { echo "[kit] installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=/tmp/kit-site
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ $SMOKE = 1 ] && export LAUNCHER_KIT_SMOKE=1
SMOKE_FLAG=$( [ $SMOKE = 1 ] && echo --smoke )

guarded 90 "$PYTHON" -m benchmarks.device.kit environment --out "$STAGE_DIR"
status=0
if [[ " $STAGES " == *" tests "* ]]; then
    seconds=$(left); [ "$TEST_BUDGET" -lt "$seconds" ] && seconds=$TEST_BUDGET
    guarded "$seconds" "$PYTHON" -m pytest -m cuda tests/device/test_cuda.py -p no:cacheprovider -q -o junit_family=xunit1 \
        --junitxml="$STAGE_DIR/pytest-cuda.xml" || status=1
fi
if [[ " $STAGES " == *" benchmarks "* ]]; then
    guarded $(( $(left) - 25 )) "$PYTHON" -m benchmarks.device.kit benchmarks $SMOKE_FLAG --out "$STAGE_DIR" \
        --work "$WORK" --deadline "$DEADLINE" --only "${KIT_BENCHMARKS:-}" || status=1
fi
"$PYTHON" -m benchmarks.device.kit summary --out "$STAGE_DIR" > /dev/null || status=1

# What comes back: the summary, the plots, the test report and the log, and one archive with everything else.
tar -czf "$OUT/all-results.tar.gz" -C "$WORK" results $(cd "$WORK" && ls -d runs/*/*/output.log runs/*/*/metrics.jsonl 2>/dev/null)
cp "$STAGE_DIR"/device-kit.json "$STAGE_DIR"/device-kit.md "$OUT"/
for file in "$STAGE_DIR"/*.png "$STAGE_DIR"/pytest-cuda.xml; do [ -e "$file" ] && cp "$file" "$OUT"/; done
echo "[kit] done in $(( BUDGET - $(left) )) s, status $status; results in $OUT"
cp "$STAGE_DIR/kit.log" "$OUT"/
exit $status
