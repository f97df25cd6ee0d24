#!/usr/bin/env bash
# Wheels the lent GPU machine lacks, for its Python 3.12 on manylinux x86_64, into .whl/ (ignored by git), so the
# device kit (benchmarks/device/run.sh) installs them there with no network:
#
#   bash scripts/device_wheels.sh            # here, with network to PyPI; then carry .whl to the GPU machine
#
# Versions come from requirements-lock.txt, the versions CI tests with, so both machines run the same launcher,
# transformers and peft code. The GPU machine keeps its own torch (CUDA build), accelerate, tokenizers, huggingface-hub, pyarrow,
# pandas, numpy and the rest of its image: `pip install --no-deps` there checks no version ranges, and run.sh
# prints what it ended up importing. DeepSpeed is published as an sdist only: its wheel is built here (pure
# Python, ops are JIT-compiled on first use and the launcher uses none). The device tool carries 64 MiB per
# call in all, working tree included: the script fails when the folder would not fit.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
OUT_DIR=${WHEEL_DIR:-.whl}
LIMIT_MIB=${WHEEL_LIMIT_MIB:-56}  # 64 MiB per call minus the working tree (about 3 MiB) and headroom
# Packages the device image lacks (pydantic, datasets, deepspeed) with the dependencies it lacks or has at other
# versions, and the libraries whose code should match CI's exactly (transformers, peft).
PACKAGES=(pydantic pydantic-core annotated-types typing-inspection typing-extensions
          datasets dill multiprocess fsspec
          transformers regex peft
          hjson)

version_of() { "$PYTHON" -c "import sys; sys.path.insert(0, 'scripts'); import lock; print(lock.read_lock()[lock.normalized(sys.argv[1])])" "$1"; }

rm -rf "$OUT_DIR" && mkdir -p "$OUT_DIR"
specs=()
for name in "${PACKAGES[@]}"; do specs+=("$name==$(version_of "$name")"); done
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$OUT_DIR" "${specs[@]}"
# --no-build-isolation: DeepSpeed's setup.py imports torch; an isolated build would download a CUDA torch.
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
    -w "$OUT_DIR" "deepspeed==$(version_of deepspeed)"

echo "carried to the GPU machine ($OUT_DIR/):"
ls -1 "$OUT_DIR"
size_kib=$(du -sk "$OUT_DIR" | cut -f1)
echo "total: $((size_kib / 1024)) MiB (limit $LIMIT_MIB MiB)"
if [ "$size_kib" -gt $((LIMIT_MIB * 1024)) ]; then
    echo "error: $OUT_DIR is over $LIMIT_MIB MiB: it would not travel with the working tree" >&2
    exit 1
fi
