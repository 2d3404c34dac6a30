"""`make run`'s demo: one SparseAttention layer on CPU (reference path), forward and backward."""
from __future__ import annotations

import time

import torch


def main() -> int:
    from . import SparseAttention

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    attn = SparseAttention(
        dim=256, dim_head=64, heads=8, kv_heads=2, sliding_window_size=64, compress_block_size=16,
        compress_block_sliding_stride=8, selection_block_size=16, num_selected_blocks=4, causal=True,
    ).to(device)
    x = torch.randn(2, 512, 256, device=device, requires_grad=True)

    start = time.perf_counter()
    attn(x).square().mean().backward()  # the first call pays one-time set-up (lazy init, allocator)
    first_s = time.perf_counter() - start
    x.grad = None
    start = time.perf_counter()
    out = attn(x)
    forward_s = time.perf_counter() - start
    start = time.perf_counter()
    out.square().mean().backward()
    backward_s = time.perf_counter() - start

    print(f"SparseAttention on {device}: input {tuple(x.shape)} -> output {tuple(out.shape)}")
    print("  heads 8 (kv heads 2), compress 16/8, select 4 x 16, window 64, causal")
    print(f"  forward {forward_s * 1e3:.1f} ms, backward {backward_s * 1e3:.1f} ms "
          f"(second call; the first forward + backward took {first_s * 1e3:.0f} ms)")
    print(f"  paths: {getattr(attn, 'last_paths', 'unknown')}")

    cache = attn.init_cache(2, 501)
    with torch.no_grad():
        attn(x[:, :500].detach(), cache=cache)  # prefill
        step = attn(x[:, 500:501].detach(), cache=cache)  # one decoding step, in place
    err = (step - out[:, 500:501]).abs().max().item()
    print(f"  decoding one token after a 500-token prompt matches the parallel forward: max |diff| = {err:.2e}")
    print(f"  decoding paths: {attn.last_paths}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
