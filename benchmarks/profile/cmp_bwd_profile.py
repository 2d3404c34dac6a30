"""Where the compressed-attention backward spends its time on a CUDA GPU: device time per kernel
(dq_kernel, dkdv_kernel, the rest) under each tile config of the variant that fits d = 128, at the bench
shape (b=1, H=64, K=4, d=128, l=32, s=16, M=1, causal, bf16), via torch.profiler. For the default config
also the effect of the dkdv query chunks (kernels.compressed.DKDV_MAX_CHUNKS forced to 1). Prints one
JSON line per row; writes DIR/cmp_bwd_profile.json.

    python3 benchmarks/profile/cmp_bwd_profile.py [n] [--out DIR]      (n: default 65536)
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from nsa_codegen.codegen import cache  # noqa: E402
from nsa_codegen.kernels import compressed  # noqa: E402


def kernel_ms(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = "dq_kernel" if "dq_kernel" in e.name else "dkdv_kernel" if "dkdv_kernel" in e.name else "other"
            per[name] += e.device_time / 1000 / reps
    return {k: round(v, 3) for k, v in per.items()}


def main(n, out_dir):
    H, K, d = 64, 4, 128
    q = torch.randn(1, n, H, d, device="cuda", dtype=torch.bfloat16)
    ck, cv = (torch.randn(1, 1 + n // 16, K, d, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    kw = dict(num_mem=1, block_size=32, stride=16, causal=True, scale=d ** -0.5)
    out, lse = compressed.compressed_attention_fwd_launch(q, ck, cv, **kw)
    dout = torch.randn_like(out)
    module = cache.load_variant(compressed.variant_specs(q, ck, True)[1])
    rows = []
    max_default = compressed.DKDV_MAX_CHUNKS
    configs = [c for c in module.CONFIGS if c.get("max_d16", 256) >= d]
    for i, c in enumerate(configs):
        cfg = {k: c[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}
        for max_chunks in ((max_default, 1) if i == 0 else (max_default,)):
            compressed.DKDV_MAX_CHUNKS = max_chunks
            try:
                ms = kernel_ms(lambda: compressed.compressed_attention_bwd_launch(
                    q, ck, cv, out, lse, dout, config=cfg, **kw))
            except Exception as exc:  # noqa: BLE001
                ms = {"error": repr(exc)[:200]}
            row = {"n": n, "config": cfg, "max_chunks": max_chunks, "default": i == 0, **ms}
            rows.append(row)
            print("cmp_bwd", json.dumps(row), flush=True)
    compressed.DKDV_MAX_CHUNKS = max_default
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cmp_bwd_profile.json").write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("n", nargs="?", type=int, default=65536)
    ap.add_argument("--out", default=".", help="folder for cmp_bwd_profile.json")
    a = ap.parse_args()
    main(a.n, a.out)
