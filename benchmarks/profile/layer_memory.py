"""Peak memory and time of one whole SparseAttention layer (every branch on the generated kernels),
forward + backward, at several n, beside dense causal SDPA (flash and cuDNN backends) in the same run.

Shapes: b = 1, H = 64, K = 4 (G = 16), d = 128, l = 32, s = 16, l' = 64, k = 16, W = 512, bf16, causal.
The model width is --dim (default 1024): the module's two projections (to_qkv: dim -> (H + 2K) d,
combine_heads: H d -> dim) are not attention and dense SDPA gets none, so a small width keeps the
comparison on the attention; q, k, v and every attention tensor have the same shapes as at
dim = H * d = 8192 (which would add about 2 x 9 TFLOP of projection GEMMs at 64k and 1 GiB per (n, dim)
activation). SDPA gets q, k, v of shape (1, H, n, d): k and v expanded to all 64 heads, as a dense layer
would hold them.

Per n (--sizes, default 16384,32768,65536):
  memory: after a warm-up pass (compiles the kernels at the first n), with x and every .grad freed, the peak
    of torch.cuda.max_memory_allocated() over one forward + backward, minus what was allocated before it
    (parameters + x); also what the forward leaves allocated for the backward (saved activations + output).
    Linear growth shows as a constant number of bytes per token. The same for SDPA flash / cuDNN.
  time (at the largest n; --time-all for every n): triton.testing.do_bench medians of the forward and of
    forward + backward (grads set to None before each call).
Writes DIR/layer_memory.json after every measurement (an interrupted run keeps what was done) and prints a
short table last. Takes about 2-3 minutes on an H200, most of it the first-call compilation of the
kernels; with --time-all, timings at the smaller n are skipped once --budget-s seconds (default 210)
have passed.

    python3 benchmarks/profile/layer_memory.py [--sizes 16384,32768,65536] [--dim 1024] [--time-all]
                                               [--budget-s 210] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
from nsa_codegen import SparseAttention  # noqa: E402

_ap = argparse.ArgumentParser(description="peak memory and time of one SparseAttention layer vs dense SDPA")
_ap.add_argument("--sizes", default="16384,32768,65536", help="sequence lengths n, comma-separated")
_ap.add_argument("--dim", type=int, default=1024, help="model width (projections only; attention shapes fixed)")
_ap.add_argument("--time-all", action="store_true", help="time every n, not only the largest")
_ap.add_argument("--budget-s", type=float, default=210, help="with --time-all: skip timings after this many s")
_ap.add_argument("--out", default=".", help="folder for layer_memory.json")
ARGS = _ap.parse_args()

H, K, D = 64, 4, 128
DIM = ARGS.dim
L, S, LSEL, TOPK, W = 32, 16, 64, 16, 512
SIZES = [int(s) for s in ARGS.sizes.split(",")]
TIME_AT = set(SIZES) if ARGS.time_all else {max(SIZES)}
BUDGET_S = ARGS.budget_s
OUT_DIR = ARGS.out
T0 = time.time()
GiB = 2 ** 30
BACKENDS = (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION))


def layer() -> SparseAttention:
    torch.manual_seed(0)
    return SparseAttention(
        dim=DIM, dim_head=D, heads=H, kv_heads=K, causal=True, sliding_window_size=W,
        compress_block_size=L, compress_block_sliding_stride=S, selection_block_size=LSEL,
        num_selected_blocks=TOPK).cuda().to(torch.bfloat16)


def _error(exc: BaseException) -> dict:
    tb = traceback.format_exc().strip().splitlines()
    print(f"  ERROR {type(exc).__name__}: {exc}", file=sys.stderr)
    print("\n".join(tb[-12:]), file=sys.stderr)
    return dict(error=f"{type(exc).__name__}: {exc}"[:600], where=tb[-4:])


def _clear_grads(*tensors) -> None:
    for t in tensors:
        t.grad = None


def _peak(step, leaves, grad) -> dict:
    """Peak allocation of step() (a forward returning the output; the backward with `grad`, allocated before,
    runs here) above what is allocated before it (parameters, inputs, grad), and what the forward alone
    leaves allocated (saved for the backward + the output)."""
    _clear_grads(*leaves)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step()
    torch.cuda.synchronize()
    saved = torch.cuda.memory_allocated() - base
    fwd_peak = torch.cuda.max_memory_allocated() - base
    out.backward(grad)
    del out
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    _clear_grads(*leaves)
    return dict(peak_bytes=peak, fwd_peak_bytes=fwd_peak, saved_after_fwd_bytes=saved, base_bytes=base)


def _times(fwd, leaves, g, rep_fwd=200, rep_bwd=400) -> dict:
    def fwd_bwd():
        fwd().backward(g)

    t_fwd = do_bench(fwd, warmup=25, rep=rep_fwd, grad_to_none=leaves, return_mode="median")
    t_fb = do_bench(fwd_bwd, warmup=25, rep=rep_bwd, grad_to_none=leaves, return_mode="median")
    _clear_grads(*leaves)
    return dict(fwd_ms=t_fwd, fwdbwd_ms=t_fb)


def measure_layer(attn, n: int, timed: bool) -> dict:
    x = torch.randn(1, n, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    leaves = [x, *attn.parameters()]
    t = time.time()
    attn(x).sum().backward()  # warm-up: compiles every kernel on the first n
    torch.cuda.synchronize()
    res = dict(warmup_s=time.time() - t, paths=dict(attn.last_paths))
    if set(res["paths"].values()) != {"triton"}:
        print(f"  WARNING: not every branch ran on the kernels: {res['paths']}", file=sys.stderr)
    g = torch.randn_like(x)  # the output is (1, n, dim) like x
    res.update(_peak(lambda: attn(x), leaves, g))
    if timed:
        res.update(_times(lambda: attn(x), leaves, g))
    del x, g
    return res


def measure_sdpa(n: int, backend, timed: bool) -> dict:
    q, k, v = (torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn_like(q)
    with sdpa_kernel(backend):
        f = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        f().backward(g)  # warm-up (and fails fast if the backend cannot run these shapes)
        res = _peak(f, [q, k, v], g)
        if timed:
            res.update(_times(f, [q, k, v], g))
    del q, k, v, g
    return res


def write(results: dict) -> None:
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, "layer_memory.json"), "w") as f:
        json.dump(results, f, indent=1)


def summarize(results: dict) -> None:
    rows = [r for r in results["rows"] if "peak_bytes" in r.get("layer", {})]
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        results["linear_check"] = dict(
            n_ratio=b["n"] / a["n"], peak_ratio=b["layer"]["peak_bytes"] / a["layer"]["peak_bytes"],
            bytes_per_token=[r["layer"]["peak_bytes"] / r["n"] for r in rows])


def print_table(results: dict) -> None:
    print()
    print(f"SparseAttention layer (b=1, H={H}, K={K}, d={D}, dim={DIM}, l={L}, s={S}, l'={LSEL}, k={TOPK}, W={W}, "
          f"bf16, causal) on {results['gpu']}, torch {results['torch']}, triton {results['triton']}")
    print("peak = max allocated over one forward + backward above parameters, inputs and the output's gradient; "
          "constant KiB/token = linear")
    print(f"{'n':>6} | {'layer peak GiB':>14} {'KiB/token':>9} {'fwd-saved GiB':>13} | "
          f"{'flash peak GiB':>14} {'cudnn peak GiB':>14}")
    for r in results["rows"]:
        lay = r.get("layer", {})
        if "peak_bytes" not in lay:
            print(f"{r['n']:>6} | layer error: {lay.get('error', 'not run')}")
            continue
        fl = r.get("sdpa_flash", {}).get("peak_bytes")
        cu = r.get("sdpa_cudnn", {}).get("peak_bytes")
        fmt = lambda v: f"{v / GiB:>14.2f}" if v is not None else f"{'error':>14}"  # noqa: E731
        print(f"{r['n']:>6} | {lay['peak_bytes'] / GiB:>14.2f} {lay['peak_bytes'] / r['n'] / 1024:>9.1f} "
              f"{lay['saved_after_fwd_bytes'] / GiB:>13.2f} | {fmt(fl)} {fmt(cu)}")
    lc = results.get("linear_check")
    if lc:
        print(f"peak ratio {lc['peak_ratio']:.2f} for n ratio {lc['n_ratio']:.0f}")
    print("time ratios: t / t(NSA layer), above 1 = the NSA layer is faster")
    print(f"{'n':>6} | {'impl':<28} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd ratio':>12} {'f+b ratio':>12}")
    for r in results["rows"]:
        lay = r.get("layer", {})
        if "fwd_ms" not in lay:
            continue
        for name, label in (("layer", "NSA layer (all kernels)"), ("sdpa_flash", "SDPA flash, dense causal"),
                            ("sdpa_cudnn", "SDPA cuDNN, dense causal")):
            m = r.get(name, {})
            if "fwd_ms" not in m:
                print(f"{r['n']:>6} | {label:<28} {m.get('error', 'not timed')[:60]}")
                continue
            print(f"{r['n']:>6} | {label:<28} {m['fwd_ms']:>9.2f} {m['fwdbwd_ms']:>11.2f} "
                  f"{m['fwd_ms'] / lay['fwd_ms']:>11.2f}x {m['fwdbwd_ms'] / lay['fwdbwd_ms']:>11.2f}x")
    print(f"paths: {results['rows'][0].get('layer', {}).get('paths')}; wall {results['wall_s']:.0f} s; "
          f"JSON: {os.path.join(OUT_DIR, 'layer_memory.json')}")


def main():
    import triton

    results = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   config=dict(b=1, H=H, K=K, d=D, dim=DIM, l=L, s=S, l_sel=LSEL, k=TOPK, W=W, dtype="bf16",
                               causal=True, sizes=SIZES, timed_at=sorted(TIME_AT)),
                   rows=[])
    attn = layer()
    for n in SIZES:
        timed = n in TIME_AT and (n == max(SIZES) or time.time() - T0 < BUDGET_S)
        row = dict(n=n)
        results["rows"].append(row)
        print(f"n={n}: layer (timed={timed}) at {time.time() - T0:.0f} s", flush=True)
        try:
            row["layer"] = measure_layer(attn, n, timed)
        except Exception as exc:  # report, never drop
            row["layer"] = _error(exc)
        torch.cuda.empty_cache()
        for name, backend in BACKENDS:
            print(f"n={n}: {name} at {time.time() - T0:.0f} s", flush=True)
            try:
                row[name] = measure_sdpa(n, backend, timed)
            except Exception as exc:
                row[name] = _error(exc)
            torch.cuda.empty_cache()
        results["wall_s"] = time.time() - T0
        summarize(results)
        write(results)
    results["wall_s"] = time.time() - T0
    summarize(results)
    write(results)
    print_table(results)


if __name__ == "__main__":
    main()
