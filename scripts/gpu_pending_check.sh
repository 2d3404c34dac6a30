#!/usr/bin/env bash
# Check a pending change (docs/pending/<name>.patch) on the H200 without touching the checkout:
#   bash scripts/gpu_pending_check.sh <name> <command...>
# copies the repository to /tmp/pending-<name>, applies the patch there, regenerates generated/, and runs
# <command...> in that copy with $OUT set to $OUT/<name> (e.g. `bash scripts/gpu_lane.sh -n 14
# tests/test_window_kernels.py` or `python3 scripts/gpu_select_check.py --skip smoke,timing,resources,configs`).
# Run the same command on the checkout itself for the comparison. Carry .whl as for gpu_lane.sh.
set -uo pipefail
name="$1"; shift
patch="$PWD/docs/pending/$name.patch"
[ -f "$patch" ] || { echo "no such patch: $patch" >&2; exit 2; }
copy="/tmp/pending-$name"
rm -rf "$copy" && cp -r "$PWD" "$copy" && cd "$copy" || exit 1
# the device's copy of the checkout may have no .git: GNU patch reads git diffs too
if [ -d .git ]; then git apply "$patch"; else patch -s -p1 < "$patch"; fi || { echo "patch $name does not apply" >&2; exit 1; }
PYTHONPATH="$copy" python3 -m nsa_codegen generate > .generate.log && head -1 .generate.log
export OUT="${OUT:-/tmp/out}/$name" NSA_CODEGEN_CACHE="/tmp/nsa_cache_$name"
mkdir -p "$OUT"
"$@"
