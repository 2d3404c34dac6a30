"""Issue 4 figures on the H200: one SparseAttention layer forward+backward at n = 16k, 32k, 64k
(b=1, H=64, K=4, d=128, l=32, s=16, l'=64, k=16, W=512, bf16): peak allocated memory (linear in n?)
and time, beside dense causal SDPA (flash, cuDNN) on the same q/k/v sizes in the same run.
Writes $OUT/layer_memory.json and prints a table last."""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

sys.path.insert(0, os.getcwd())
from nsa_codegen import SparseAttention  # noqa: E402

H, K, D, DIM = 64, 4, 128, 1024
SIZES = [int(s) for s in os.environ.get("SIZES", "16384,32768,65536").split(",")]


def layer():
    return SparseAttention(
        dim=DIM, dim_head=D, heads=H, kv_heads=K, causal=True, sliding_window_size=512,
        compress_block_size=32, compress_block_sliding_stride=16, selection_block_size=64,
        num_selected_blocks=16).cuda().to(torch.bfloat16)


def measure_layer(attn, n):
    x = torch.randn(1, n, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    attn(x).sum().backward()  # compile + warm
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = attn(x)
    out.sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    fwd = do_bench(lambda: attn(x), warmup=25, rep=200, return_mode="median")

    def fwd_bwd():
        x.grad = None
        attn(x).sum().backward()

    fwdbwd = do_bench(fwd_bwd, warmup=25, rep=400, return_mode="median")
    return dict(peak_bytes=peak, fwd_ms=fwd, fwdbwd_ms=fwdbwd, paths=dict(attn.last_paths))


def measure_sdpa(n, backend):
    q = torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with sdpa_kernel(backend):
        f = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        g = torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16)
        fwd = do_bench(f, warmup=10, rep=200, return_mode="median")
        fwdbwd = do_bench(lambda: f().backward(g), warmup=10, rep=300, return_mode="median")
    return dict(fwd_ms=fwd, fwdbwd_ms=fwdbwd)


def main():
    results = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                   triton=__import__("triton").__version__, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   config=dict(b=1, H=H, K=K, d=D, dim=DIM, l=32, s=16, l_sel=64, k=16, W=512, dtype="bf16"),
                   rows=[])
    attn = layer()
    for n in SIZES:
        row = dict(n=n)
        try:
            row["layer"] = measure_layer(attn, n)
        except Exception as exc:  # report, never drop
            row["layer"] = dict(error=f"{type(exc).__name__}: {exc}"[:400])
        for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                row[name] = measure_sdpa(n, backend)
            except Exception as exc:
                row[name] = dict(error=f"{type(exc).__name__}: {exc}"[:400])
        results["rows"].append(row)
        torch.cuda.empty_cache()
    out_dir = os.environ.get("OUT", ".")
    with open(os.path.join(out_dir, "layer_memory.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"{'n':>6} {'peak GiB':>9} {'GiB/8k':>7} {'fwd ms':>8} {'f+b ms':>8} {'flash f/f+b':>14} {'cudnn f/f+b':>14}  paths")
    for row in results["rows"]:
        lay = row["layer"]
        if "error" in lay:
            print(f"{row['n']:>6} layer error: {lay['error']}")
            continue
        fl, cu = row["sdpa_flash"], row["sdpa_cudnn"]
        fmt = lambda r: f"{r['fwd_ms']:.1f}/{r['fwdbwd_ms']:.1f}" if "fwd_ms" in r else "error"  # noqa: E731
        print(f"{row['n']:>6} {lay['peak_bytes'] / 2**30:>9.2f} {lay['peak_bytes'] / 2**30 * 8192 / row['n']:>7.3f} "
              f"{lay['fwd_ms']:>8.2f} {lay['fwdbwd_ms']:>8.2f} {fmt(fl):>14} {fmt(cu):>14}  {lay['paths']}")


if __name__ == "__main__":
    main()
