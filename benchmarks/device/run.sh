#!/usr/bin/env bash
# The accelerator benchmark in one command (benchmarks/device/README.md).
#
#   benchmarks/device/run.sh [--cpu-smoke] [--train-batches 64,32,16] [--sections ...]
#
# Runs from the repository root with the repository on PYTHONPATH (the package need not be
# installed). Wheels under .whl/ (git-ignored; see the README) are installed into a scratch
# folder first when the interpreter lacks ml_collections, as on the device machine. Results go
# to $OUT when set, else benchmarks/device/out/: device_bench.json, device_bench.md, run.log.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-benchmarks/device/out}"
mkdir -p "$OUT_DIR"

if ! "$PY" -c "import ml_collections" 2>/dev/null; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "ml_collections is missing and there are no wheels in .whl/ (see benchmarks/device/README.md)" >&2
    exit 2
  fi
  SITE="${JFE_WHEEL_SITE:-/tmp/jfe_device_site}"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# JAX and PyTorch share the GPU: JAX allocates as it goes instead of taking 75% up front, and
# may grow to most of the memory once PyTorch has freed its cache (the train step).
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"

"$PY" benchmarks/device/bench_device.py --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/run.log"
exit "${PIPESTATUS[0]}"
