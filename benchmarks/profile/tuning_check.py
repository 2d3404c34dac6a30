"""First-call cost and steady-state gain of the persisted tile-config tuning (nsa_codegen/kernels/tuning.py)
on a CUDA GPU; about 1-2 minutes on an H200.

  python3 benchmarks/profile/tuning_check.py [--out DIR]

Case: `nsa_codegen.kernels.selected.selected_attention` forward, n=8192, b=1, H=64, K=4 (G=16), d=128, l'=64, kk=16
random causal selections, no gates, bf16. Each scenario is a fresh process (its own
NSA_CODEGEN_CACHE / TRITON_CACHE_DIR) that times its first call (host clock, synchronized):

  untuned-cold   NSA_CODEGEN_TUNE=0, empty Triton cache: first call without tuning (compile the default config)
  tuned-cold     empty tuning table, empty Triton cache: compile + benchmark every fitting config, persist
  tuned-warm     the table and Triton cache of tuned-cold: table lookup + cached binary
  untuned-warm   NSA_CODEGEN_TUNE=0, the Triton cache of untuned-cold
  table-only     tuned-cold's table, empty Triton cache: what a shipped table gives (one compile)

tuned-warm also measures the steady state: every candidate with a long do_bench (did the short tuning
benchmark pick the best?), default vs tuned config interleaved 3x (the same raw launch, only the config
differs), the warm `choose_config` cost (us per call), a call under
torch.cuda.set_sync_debug_mode("error") (no host sync on the warm path), and default vs tuned outputs. tuned-cold checks that its first output (computed around the benchmark) equals its second.
Writes DIR/tuning_check.json (DIR: --out, default the current folder) and the tuning table beside it;
prints a short table last. The repository root is put on sys.path / PYTHONPATH (no install needed).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root
B, N, H, K, D, L, KK = 1, 8192, 64, 4, 128, 64, 16
SCENARIOS = ["untuned-cold", "tuned-cold", "tuned-warm", "untuned-warm", "table-only"]
CHILD_TIMEOUT_S = 100  # per scenario process
DEADLINE_S = 170  # the whole check stays under 3 minutes


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------------------------------
# child: one fresh process, one scenario


def child(mode: str, result_path: str) -> None:
    t_start = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    import torch
    import triton
    from triton.testing import do_bench

    from nsa_codegen.codegen import cache
    from nsa_codegen.codegen.spec import VariantSpec
    from nsa_codegen.kernels import _launch, selected, tuning

    res = {"mode": mode, "import_s": time.perf_counter() - t_start, "tune_env": os.environ.get("NSA_CODEGEN_TUNE"),
           "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__}
    torch.empty(1, device="cuda")  # CUDA context outside the timed call
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, N, K, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(B, N, K, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    nblk = -(-N // L)
    own = torch.arange(N, device="cuda") // L
    scores = torch.rand(B, N, K, nblk, device="cuda", generator=gen)
    scores = scores.masked_fill(torch.arange(nblk, device="cuda")[None, None, None, :] >= own[None, :, None, None], 2.0)
    idx = scores.argsort(dim=-1)[..., :KK].to(torch.int32).contiguous()
    valid = (idx < own[None, :, None, None]).contiguous()
    kw = dict(block_size=L, causal=True, scale=D ** -0.5)
    f = lambda: selected.selected_attention(q, k, v, idx, valid, None, **kw)  # noqa: E731
    torch.cuda.synchronize()

    t0 = time.perf_counter()
    out = f()
    torch.cuda.synchronize()
    res["first_call_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out2 = f()
    torch.cuda.synchronize()
    res["second_call_s"] = time.perf_counter() - t0
    res["first_equals_second"] = bool(torch.equal(out, out2))

    mod = cache.load_variant(VariantSpec("select_fwd", L, H // K, True))  # the module the calls above used
    block_d = _launch.padded_head_dim(D)
    launch_valid = selected._in_range(idx, valid, N, L)
    scratch_out = torch.empty_like(q)
    scratch_lse = torch.empty((B, N, H), device="cuda", dtype=torch.float32)

    def launch(config):
        """One forward launch with `config` (bypassing the tuned choice) into scratch outputs."""
        selected._launch_fwd(mod, _launch.split(config), _launch.no_wrap, q, k, v, idx, launch_valid, None,
                             kw["scale"], scratch_out, scratch_lse)
        return scratch_out

    tune = (None, q, launch)
    used = _launch.choose_config(mod, D, q.dtype, tune=tune)  # warm: what the calls above used
    default = _launch.split(_launch.default_config(mod.CONFIGS, block_d, 2))
    res["variant"] = tuning.variant_name(mod)
    res["config"] = {**used[0], **used[1]}
    res["default_config"] = {**default[0], **default[1]}
    key = tuning.make_key(res["variant"], D, q.dtype, N, q.device)
    res["key"] = str(key)
    entry = tuning.load_table().get(str(key))
    res["table_entry"] = entry
    res["table_path"] = str(tuning.table_path())
    res["decisions"] = tuning.decisions()  # cold-path decisions of this process (source, reason, times)

    if mode == "tuned-warm":
        cands = _launch.fitting_configs(mod.CONFIGS, block_d, 2)

        def forced(config):
            return lambda: launch(config)

        res["candidates_long_bench_ms"] = [
            {"config": c, "ms": float(do_bench(forced(c), warmup=25, rep=200, return_mode="median"))} for c in cands]
        default_cfg = _launch.default_config(mod.CONFIGS, block_d, 2)
        tuned_cfg = res["config"]
        rounds = []  # both through the same raw launch, so only the tile config differs
        for _ in range(3):
            rounds.append({"default_ms": float(do_bench(forced(default_cfg), warmup=10, rep=100, return_mode="median")),
                           "tuned_ms": float(do_bench(forced(tuned_cfg), warmup=10, rep=100, return_mode="median"))})
        res["steady_rounds"] = rounds
        res["steady_default_ms"] = sorted(r["default_ms"] for r in rounds)[1]
        res["steady_tuned_ms"] = sorted(r["tuned_ms"] for r in rounds)[1]
        out_default = forced(default_cfg)().clone()
        res["max_abs_diff_default_vs_tuned"] = float((out_default.float() - f().float()).abs().max())
        reps = 20000
        t0 = time.perf_counter()
        for _ in range(reps):
            _launch.choose_config(mod, D, q.dtype, tune=tune)
        res["config_tuned_us"] = (time.perf_counter() - t0) / reps * 1e6
        t0 = time.perf_counter()
        for _ in range(reps):
            _launch.choose_config(mod, D, q.dtype)
        res["config_untuned_us"] = (time.perf_counter() - t0) / reps * 1e6
        torch.cuda.synchronize()
        try:
            torch.cuda.set_sync_debug_mode("error")
            f()
            res["warm_call_sync_free"] = True
        except RuntimeError as exc:
            res["warm_call_sync_free"] = f"no: {exc}"[:300]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    Path(result_path).write_text(json.dumps(res, indent=1))


# ----------------------------------------------------------------------------------------------------
# parent


def run_child(mode, env, tmp: Path, timeout: float) -> dict:
    result = tmp / f"{mode}.json"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", mode, str(result)], env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return {"mode": mode, "error": f"timeout after {timeout:.0f} s", "stderr_tail": err[-3000:],
                "process_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result.exists():
        log(proc.stdout[-3000:], proc.stderr[-3000:])
        return {"mode": mode, "error": f"rc={proc.returncode}", "stderr_tail": proc.stderr[-3000:], "process_s": wall}
    res = json.loads(result.read_text())
    res["process_s"] = wall
    if proc.stderr.strip():
        res["stderr_tail"] = proc.stderr[-1500:]
    return res


def label(c) -> str:
    return f"BLOCK_N={c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']}" if c else "-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".", help="folder for tuning_check.json and tuning_table.json")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "RESULT"))
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="nsa_tuning_check_"))
    dirs = {name: tmp / name for name in ("tune_B", "triton_A", "triton_B", "tune_C", "triton_C", "tune_A")}
    for p in dirs.values():
        p.mkdir()
    base = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NSA_CODEGEN_TUNE")}
    base["PYTHONPATH"] = str(ROOT) + os.pathsep + base.get("PYTHONPATH", "")
    base["PYTHONUNBUFFERED"] = "1"
    envs = {
        "untuned-cold": dict(base, NSA_CODEGEN_TUNE="0", NSA_CODEGEN_CACHE=str(dirs["tune_A"]),
                             TRITON_CACHE_DIR=str(dirs["triton_A"])),
        "tuned-cold": dict(base, NSA_CODEGEN_CACHE=str(dirs["tune_B"]), TRITON_CACHE_DIR=str(dirs["triton_B"])),
        "tuned-warm": dict(base, NSA_CODEGEN_CACHE=str(dirs["tune_B"]), TRITON_CACHE_DIR=str(dirs["triton_B"])),
        "untuned-warm": dict(base, NSA_CODEGEN_TUNE="0", NSA_CODEGEN_CACHE=str(dirs["tune_A"]),
                             TRITON_CACHE_DIR=str(dirs["triton_A"])),
        "table-only": dict(base, NSA_CODEGEN_CACHE=str(dirs["tune_C"]), TRITON_CACHE_DIR=str(dirs["triton_C"])),
    }
    t_all = time.perf_counter()
    results = {}
    for mode in SCENARIOS:
        if mode == "table-only":
            table = dirs["tune_B"] / "tuning.json"
            if table.exists():
                shutil.copy(table, dirs["tune_C"] / "tuning.json")
        left = DEADLINE_S - (time.perf_counter() - t_all)
        if left < 20:
            results[mode] = {"mode": mode, "error": "skipped: out of time"}
            continue
        log(f"== {mode}")
        results[mode] = run_child(mode, envs[mode], tmp, min(CHILD_TIMEOUT_S, left))
        r = results[mode]
        log(json.dumps({k: r.get(k) for k in ("first_call_s", "second_call_s", "config", "process_s", "error")}))
    table = dirs["tune_B"] / "tuning.json"
    if table.exists():
        shutil.copy(table, out_dir / "tuning_table.json")
    summary = {"case": dict(b=B, n=N, H=H, K=K, d=D, l=L, kk=KK, dtype="bfloat16", causal=True, gates=False),
               "total_s": time.perf_counter() - t_all, "scenarios": results}
    (out_dir / "tuning_check.json").write_text(json.dumps(summary, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    print_table(summary, out_dir)


def print_table(summary: dict, out_dir: Path) -> None:
    results = summary["scenarios"]
    warm = results.get("tuned-warm", {})
    cold = results.get("tuned-cold", {})
    log("")
    log(f"gpu: {warm.get('gpu')}  torch {warm.get('torch')}  triton {warm.get('triton')}  variant {warm.get('variant')}")
    log(f"{'scenario':<14} {'first call s':>12} {'2nd call ms':>11} {'process s':>9}  {'source':<9} config")
    for mode in SCENARIOS:
        r = results.get(mode, {"error": "not run"})
        if "error" in r:
            log(f"{mode:<14} ERROR {r['error']}")
            continue
        source = "TUNE=0" if r.get("tune_env") == "0" else r.get("decisions", {}).get(r.get("key"), {}).get("source", "memo")
        log(f"{mode:<14} {r['first_call_s']:>12.3f} {r['second_call_s'] * 1e3:>11.2f} {r['process_s']:>9.1f}  "
            f"{source:<9} {label(r['config'])}")
    entry = cold.get("table_entry") or {}
    longs = {json.dumps(c["config"], sort_keys=True): c["ms"] for c in warm.get("candidates_long_bench_ms", [])}
    if entry:
        log("candidate                  tuning ms   long ms")
        for t in entry.get("times_ms", []):
            lm = longs.get(json.dumps(t["config"], sort_keys=True))
            mark = " <- tuned" if t["config"] == entry["config"] else ""
            log(f"{label(t['config']):<26} {t['ms'] if t['ms'] is None else round(t['ms'], 4)!s:>9} "
                f"{'-' if lm is None else round(lm, 4)!s:>9}{mark}")
    if "steady_default_ms" in warm:
        log(f"steady state ms (median of 3 interleaved): default {warm['steady_default_ms']:.4f}  "
            f"tuned {warm['steady_tuned_ms']:.4f}  default/tuned {warm['steady_default_ms'] / warm['steady_tuned_ms']:.3f}")
        log(f"warm _config: tuned {warm['config_tuned_us']:.2f} us/call, untuned {warm['config_untuned_us']:.2f} us/call; "
            f"sync-free warm call: {warm['warm_call_sync_free']}; |default - tuned| out {warm['max_abs_diff_default_vs_tuned']:.3g}; "
            f"cold first == second output: {cold.get('first_equals_second')}")
    log(f"total {summary['total_s']:.0f} s; JSON: {out_dir / 'tuning_check.json'}")


if __name__ == "__main__":
    main()
