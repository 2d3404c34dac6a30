"""Decoding from a preallocated cache on one CUDA GPU: the decode kernels alone (sliding window, compressed
rows, selected blocks; the default split count against one split per sequence) and a whole
SparseAttention decoding step (eager, and replayed from a CUDA graph), at several context lengths and
batch sizes. The bench shapes: H = 64, K = 4 (G = 16), d = 128, l = 32, s = 16, l' = 64, k = 16, W = 512,
bf16. The caches are filled with random rows (no prefill): the time of a step does not depend on them.

    python3 benchmarks/profile/decode_timing.py [--contexts 4096,16384,65536] [--batches 1,8] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import torch  # noqa: E402

from nsa_codegen import SparseAttention  # noqa: E402
from nsa_codegen.kernels import decode  # noqa: E402

H, K, D, L, S, SEL, TOPK, W = 64, 4, 128, 32, 16, 64, 16, 512
DIM = 2048


def median_ms(fn, iters: int = 30, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def filled_cache(attn, b: int, n: int, steps: int):
    cache = attn.init_cache(b, n + steps)
    for t in (cache.k, cache.v, cache.ck, cache.cv, cache.raw_k, cache.raw_v):
        t.normal_()
    cache.lengths.fill_(n)
    cache.seq_len = n
    return cache


def kernels_alone(b: int, n: int) -> dict:
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(b, H, D, device=dev, dtype=dt)
    k, v = (torch.randn(b, n, K, D, device=dev, dtype=dt) for _ in range(2))
    ck, cv = (torch.randn(b, 1 + n // S, K, D, device=dev, dtype=dt) for _ in range(2))
    t = torch.full((b,), n - 1, device=dev)
    idx = torch.stack([torch.randperm(max(1, (n - 1) // SEL), device=dev)[:TOPK] for _ in range(b * K)]).view(b, K, -1)
    valid = torch.ones(idx.shape, dtype=torch.bool, device=dev)
    calls = {
        "window": lambda s: decode.decode_range_attention_launch(q, k, v, (t - W).clamp(min=0), t + 1, max_keys=W + 1,
                                                                 scale=D ** -0.5, num_splits=s),
        "compressed": lambda s: decode.decode_range_attention_launch(q, ck, cv, torch.zeros_like(t), 1 + t // S,
                                                                     max_keys=ck.shape[1], scale=D ** -0.5,
                                                                     num_splits=s),
        "selected": lambda s: decode.decode_selected_attention_launch(q, k, v, idx, valid, t, block_size=SEL,
                                                                      scale=D ** -0.5, num_splits=s),
    }
    splits = {"window": decode.range_splits(q, k, W + 1), "compressed": decode.range_splits(q, ck, ck.shape[1]),
              "selected": decode.selected_splits(q, idx, SEL)}
    return {name: {"splits": splits[name], "ms": median_ms(lambda: fn(None)), "one_split_ms": median_ms(lambda: fn(1))}
            for name, fn in calls.items()}


def module_step(b: int, n: int) -> dict:
    torch.manual_seed(0)
    attn = SparseAttention(dim=DIM, dim_head=D, heads=H, kv_heads=K, causal=True, sliding_window_size=W,
                           compress_block_size=L, compress_block_sliding_stride=S, selection_block_size=SEL,
                           num_selected_blocks=TOPK).cuda().to(torch.bfloat16)
    x = torch.randn(b, 1, DIM, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager_cache = filled_cache(attn, b, n, 200)
        eager = median_ms(lambda: attn(x, cache=eager_cache), iters=30, warmup=5)
        graph_cache = filled_cache(attn, b, n, 200)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            attn(x, cache=filled_cache(attn, b, n, 4))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            attn(x, cache=graph_cache)
        replay = median_ms(graph.replay, iters=30, warmup=5)
    return {"eager_ms": eager, "graph_ms": replay, "paths": dict(attn.last_paths)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="4096,16384,65536")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for b in map(int, args.batches.split(",")):
        for n in map(int, args.contexts.split(",")):
            row = {"batch": b, "context": n, "kernels": kernels_alone(b, n), "step": module_step(b, n)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out) / f"decode_timing_{torch.cuda.get_device_name().replace(' ', '_')}.json"
    out.write_text(json.dumps({"env": {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
                                       "triton": __import__("triton").__version__,
                                       "NSA_CODEGEN_TUNE": os.environ.get("NSA_CODEGEN_TUNE")},
                               "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
