"""Time one layer branch alone (forward and forward + backward) on a CUDA GPU at the bench settings: b=1,
H=64, K=4, d=128, causal, bf16; sliding window W=512; compressed attention l=32, s=16, M=1 (ck, cv given,
as in the bench's branch_compressed row). Run it before and after a kernel change to compare the two.
Prints one JSON line per (branch, n) and the tile configs tuning chose; writes DIR/branch_timing.json.

    python3 benchmarks/profile/branch_timing.py [window|compressed ...] [--n 16384,65536] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

H, K, D = 64, 4, 128


def window_call(n):
    from nsa_codegen.kernels.window import sliding_window_attention

    q, k, v = (torch.randn(1, n, h, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (H, K, K))
    return (q, k, v), lambda: sliding_window_attention(q, k, v, window=512, causal=True, scale=D ** -0.5)


def compressed_call(n):
    from nsa_codegen.kernels.compressed import compressed_attention

    rows = 1 + n // 16
    q = torch.randn(1, n, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ck, cv = (torch.randn(1, rows, K, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")

    def f():
        out, _ = compressed_attention(q, ck, cv, num_mem=1, block_size=32, stride=16, causal=True,
                                      scale=D ** -0.5, return_logits=False)
        return out
    return (q, ck, cv), f


BRANCHES = {"window": window_call, "compressed": compressed_call}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("branches", nargs="*", default=list(BRANCHES))
    ap.add_argument("--n", default="16384,65536")
    ap.add_argument("--out", default=".", help="folder for branch_timing.json")
    a = ap.parse_args()
    rows = []
    for name in a.branches:
        for n in [int(x) for x in a.n.split(",")]:
            inputs, fwd = BRANCHES[name](n)
            dout = torch.randn_like(fwd())

            def fwd_bwd():
                torch.autograd.grad(fwd(), inputs, dout)

            fwd_bwd()
            row = {"branch": name, "n": n, "fwd_ms": do_bench(fwd, quantiles=[0.5, 0.2, 0.8]),
                   "fwd_bwd_ms": do_bench(fwd_bwd, quantiles=[0.5, 0.2, 0.8]),
                   "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30}
            rows.append(row)
            print("branch", json.dumps(row), flush=True)
            del inputs, fwd, dout
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    from nsa_codegen.kernels import tuning
    for key, dec in tuning.decisions().items():  # tuned configs chosen on the first calls
        print("tuning", key, dec.get("source"), dec.get("config"), [round(t, 3) for t in dec.get("times_ms", [])])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "branch_timing.json").write_text(json.dumps(
        {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
