#!/usr/bin/env bash
# One H200 call (device tool, carry [".whl"]) that checks the pending patches that fit in ~9 minutes, each
# on its own patched copy (scripts/gpu_pending_check.sh), plus main's G = 16 token-packing experiment:
#   bash scripts/gpu_pending_round.sh
# Per step: a time limit, its exit status and elapsed seconds; results under $OUT/<patch>/ and
# $OUT/g16_tokens/. A summary table is printed last. Not covered here (too long for the same call):
# int64-offsets (its lanes: select + window + compressed, ~5 min) and `make bench` (~8 min).
set -uo pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
T0=$(date +%s)
SUMMARY=()
step() {  # step <name> <limit_s> <command...>
  local name="$1" limit="$2"; shift 2
  local left=$(( 585 - ($(date +%s) - T0) ))
  if [ "$left" -lt 30 ]; then SUMMARY+=("$name: skipped (time)"); return; fi
  [ "$limit" -gt "$left" ] && limit="$left"
  local t=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  SUMMARY+=("$name: rc=$rc in $(( $(date +%s) - t )) s (limit $limit s); $(tail -1 "$OUT/$name.log" | cut -c1-150)")
}
step rotary 90 bash scripts/gpu_pending_check.sh rotary-kernel \
  bash scripts/gpu_lane.sh -n 8 tests/test_rotary_kernels.py
step window_bwd_tuned 170 bash scripts/gpu_pending_check.sh window-bwd-tuned \
  bash -c 'bash scripts/gpu_lane.sh -n 14 tests/test_window_kernels.py; python3 scripts/gpu_branch_timing.py window'
step packed_dedupe 200 bash scripts/gpu_pending_check.sh packed-dedupe-chunked \
  bash scripts/gpu_lane.sh -n 14 tests/test_select_kernels.py
step g16_tokens 150 env OUT="$OUT/g16_tokens" PYTHONPATH="$PWD" \
  python3 scripts/gpu_select_check.py --skip smoke,timing,packing,resources,configs
echo "=== pending round (main window timing for comparison: 64k fwd+bwd 38.3 ms in the session-3 bench) ==="
grep -h "^window\|^branch" "$OUT"/window-bwd-tuned/*.json "$OUT"/window_bwd_tuned.log 2>/dev/null | cut -c1-200
grep -h "^g16_tokens" "$OUT/g16_tokens.log" 2>/dev/null | cut -c1-300
printf '%s\n' "${SUMMARY[@]}"
