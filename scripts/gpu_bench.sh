#!/usr/bin/env bash
# The benchmark on the H200 (device tool), one command line:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash scripts/gpu_bench.sh [bench args]
# with carry=[".whl"]. .whl/ holds the anchors' pure-Python wheels the GPU image lacks (fla-core 0.6.0,
# native-sparse-attention-pytorch 0.2.3 and its needs); the line above installs them if that was not done.
# Results (JSON, PNGs, log) go to $OUT (the device tool brings them back), else benchmarks/results/.
set -uo pipefail
if ! python3 -c "import fla, native_sparse_attention_pytorch" 2>/dev/null && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export NSA_CODEGEN_CACHE="${NSA_CODEGEN_CACHE:-/tmp/nsa_cache}" TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton_cache}"
OUTDIR="${OUT:-benchmarks/results}"; mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader || true
python3 -m benchmarks.bench --out "$OUTDIR" "$@" 2>&1 | tee "$OUTDIR/bench.log"
exit "${PIPESTATUS[0]}"
