#!/usr/bin/env bash
# The GPU lane on the H200 (device tool): `bash scripts/gpu_lane.sh [pytest args]`.
# Carries .whl/ (pure-Python wheels the GPU image lacks); the repo root goes on PYTHONPATH.
set -uo pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 NSA_CODEGEN_CACHE=/tmp/nsa_cache
# per-case worst errors: select tests -> $OUT/select_errors.jsonl, window/compressed -> $OUT/dense_kernels_gpu.jsonl
export NSA_ERR_LOG="${NSA_ERR_LOG:-$OUT/select_errors.jsonl}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/gpu_lane.xml" "$@" 2>&1 | tee "$OUT/gpu_lane.log" | tail -40
rc=${PIPESTATUS[0]}
if [ -s "$NSA_ERR_LOG" ]; then python3 scripts/summarize_err_log.py "$NSA_ERR_LOG" | tail -20; fi
exit "$rc"
