"""Section ``first_call`` of the benchmark: how long a user waits for the first forward + backward.

Each scenario runs in a fresh Python process (``python -m benchmarks.first_call --child ...``) that builds
the README's example layer (``nsa_codegen.tune.PRESETS["readme"]``, causal, b=1, bf16) and times

    first_s    construction + the first forward + backward (compiles, tunes, loads), synchronized
    second_s   the next forward + backward in the same process (hot)

Scenarios (compile caches: Triton's and ours, both in one temporary directory per cold run):

    cold                     empty caches; the shipped tuning table and parallel candidate compiles
                             (what a user of a GPU the project ships tables for gets)
    cold_no_shipped          empty caches, shipped table off: every tuned kernel is benchmarked, its
                             candidates compiled in parallel (a GPU without shipped tables)
    cold_no_shipped_serial   as above with one compile thread (the candidates one after another)
    warm_disk                a new process on the caches ``cold`` left (compiled kernels load from disk)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {
    "cold": {},
    "cold_no_shipped": {"NSA_CODEGEN_SHIPPED_TUNING": "0"},
    "cold_no_shipped_serial": {"NSA_CODEGEN_SHIPPED_TUNING": "0", "NSA_CODEGEN_COMPILE_THREADS": "1"},
}
CHILD_TIMEOUT_S = 240


def child(n: int) -> int:
    start = time.perf_counter()
    import torch

    from nsa_codegen import SparseAttention
    from nsa_codegen.kernels import tuning
    from nsa_codegen.tune import PRESETS

    import_s = time.perf_counter() - start
    torch.manual_seed(0)

    def step(layer):
        x = torch.randn(1, n, layer.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        layer(x).float().sum().backward()
        torch.cuda.synchronize()

    torch.cuda.init()
    t0 = time.perf_counter()
    layer = SparseAttention(**PRESETS["readme"], causal=True).cuda().to(torch.bfloat16)
    step(layer)
    first_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    step(layer)
    second_s = time.perf_counter() - t1
    sources = {}
    for decision in tuning.decisions().values():
        sources[decision["source"]] = sources.get(decision["source"], 0) + 1
    print(json.dumps(dict(import_s=import_s, first_s=first_s, second_s=second_s, tuning_sources=sources,
                          paths=dict(layer.last_paths))))
    return 0


def _run_child(n: int, env_extra: dict, cache_root: Path) -> dict:
    env = dict(os.environ, **env_extra, NSA_CODEGEN_CACHE=str(cache_root / "nsa"),
               TRITON_CACHE_DIR=str(cache_root / "triton"), NSA_CODEGEN_NOTICE_S="off")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.first_call", "--child", str(n)], cwd=str(ROOT),
                          env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return dict(status="error", error=(proc.stderr or proc.stdout)[-600:], process_s=wall)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return dict(status="ok", process_s=wall, **result)


def phase(bench, deadline: float, n: int = 4096) -> None:
    """Adds one row per scenario (section first_call, impl = scenario, ms = first_s in ms)."""
    with tempfile.TemporaryDirectory(prefix="nsa_first_call_") as tmp:
        runs = [(name, env, Path(tmp) / name) for name, env in SCENARIOS.items()]
        runs.insert(1, ("warm_disk", {}, Path(tmp) / "cold"))  # right after cold, on its caches
        for name, env, root in runs:
            if time.perf_counter() > deadline:
                bench.add(dict(section="first_call", impl=name, n=n, G=4, mode="fwdbwd", status="skipped",
                               error="time budget"))
                continue
            try:
                result = _run_child(n, env, root)
            except subprocess.TimeoutExpired:
                result = dict(status="error", error=f"timed out after {CHILD_TIMEOUT_S} s")
            row = dict(section="first_call", impl=name, label=name, n=n, G=4, mode="fwdbwd", **result)
            if result["status"] == "ok":
                row.update(ms=result["first_s"] * 1e3, ms_p20=result["first_s"] * 1e3,
                           ms_p80=result["first_s"] * 1e3, first_call_s=result["first_s"])
            bench.add(row)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(child(int(sys.argv[2])))
    print("run through `python -m nsa_codegen bench --sections first_call`", file=sys.stderr)
    sys.exit(2)
