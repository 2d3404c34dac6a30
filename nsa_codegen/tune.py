"""`python -m nsa_codegen tune`: tune the kernels of common layer shapes ahead of time on this GPU.

Runs one forward + backward of `SparseAttention` per (preset, length, dtype): every tuned kernel it
launches is benchmarked once and its winner kept in the user tuning table (see `kernels.tuning`), so a
later first call at those shapes only compiles. `--shipped` also merges this GPU's winners into the
table the package ships (`nsa_codegen/kernels/tuning_shipped.json`), which is how that file is made.
"""
from __future__ import annotations

import json
import sys
import time

PRESETS = {
    # the README's example layer
    "readme": dict(dim=512, dim_head=64, heads=8, kv_heads=2, sliding_window_size=64, compress_block_size=16,
                   compress_block_sliding_stride=8, selection_block_size=16, num_selected_blocks=4),
    # examples/train_lm.py at its GPU size
    "lm": dict(dim=512, dim_head=64, heads=8, kv_heads=2, sliding_window_size=512, compress_block_size=32,
               compress_block_sliding_stride=16, selection_block_size=64, num_selected_blocks=16),
    # the benchmark's layer (benchmarks/bench.py CONFIG): H = 64, K = 4, d = 128
    "bench": dict(dim=1024, dim_head=128, heads=64, kv_heads=4, sliding_window_size=512, compress_block_size=32,
                  compress_block_sliding_stride=16, selection_block_size=64, num_selected_blocks=16),
}
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def run(presets, lengths, dtypes, shipped: bool) -> int:
    import torch

    from . import SparseAttention
    from .kernels import tuning

    if not torch.cuda.is_available():
        print("tune needs a CUDA GPU (it times the kernels on it)", file=sys.stderr)
        return 2
    for name in presets:
        for dtype_name in dtypes:
            dtype = getattr(torch, DTYPES[dtype_name])
            torch.manual_seed(0)
            layer = SparseAttention(**PRESETS[name], causal=True).cuda().to(dtype)
            for n in lengths:
                x = torch.randn(1, n, layer.dim, device="cuda", dtype=dtype, requires_grad=True)
                start = time.perf_counter()
                layer(x).sum().backward()
                torch.cuda.synchronize()
                print(f"{name} {dtype_name} n={n}: {time.perf_counter() - start:.1f} s")
    decisions = tuning.decisions()
    print(f"{sum(d['source'] == 'benchmark' for d in decisions.values())} kernels tuned, "
          f"{sum(d['source'] != 'benchmark' for d in decisions.values())} already known; table: {tuning.table_path()}")
    if shipped:
        added = merge_into_shipped(tuning.load_table(), torch.cuda.get_device_name())
        print(f"{added} entries merged into {tuning.shipped_table_path()}")
    return 0


def merge_into_shipped(entries: dict, gpu: str) -> int:
    """Copy `gpu`'s entries of a user table into the shipped table (keys without the Triton version)."""
    from .kernels import tuning

    path = tuning.shipped_table_path()
    shipped = dict(tuning.load_table(path))
    added = 0
    for key, entry in entries.items():
        if entry.get("key", {}).get("gpu") != gpu:
            continue
        slim = {k: entry[k] for k in ("config", "candidates_sha", "times_ms", "key", "torch", "measured_at")
                if k in entry}
        shipped[tuning.shipped_key(tuning.TuneKey(**entry["key"]))] = slim
        added += 1
    tuning._atomic_write(path, json.dumps({"format": tuning.TABLE_FORMAT, "entries": shipped}, indent=1,
                                          sort_keys=True) + "\n")
    tuning.reset()
    return added
