"""Time the sliding-window branch alone (forward and forward+backward) on the GPU, bench settings:
b=1, H=64, K=4, d=128, W=512, causal, bf16. Used to compare a pending window-kernel change against main
(run it on the checkout and through scripts/gpu_pending_check.sh). Writes $OUT/window_timing.json.

    python3 scripts/gpu_window_timing.py [n ...]     (default 16384 65536)
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from nsa_codegen.ops_window import sliding_window_attention  # noqa: E402


def main(ns):
    H, K, d, W = 64, 4, 128, 512
    rows = []
    for n in ns:
        q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for h in (H, K, K))
        dout = torch.randn(1, n, H, d, device="cuda", dtype=torch.bfloat16)

        def fwd():
            return sliding_window_attention(q, k, v, window=W, causal=True, scale=d ** -0.5)

        def fwd_bwd():
            torch.autograd.grad(fwd(), (q, k, v), dout)

        row = {"n": n, "fwd_ms": do_bench(fwd, quantiles=[0.5, 0.2, 0.8]),
               "fwd_bwd_ms": do_bench(fwd_bwd, quantiles=[0.5, 0.2, 0.8])}
        rows.append(row)
        print("window", json.dumps(row), flush=True)
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    (out / "window_timing.json").write_text(json.dumps(
        {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
         "rows": rows}, indent=1))


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [16384, 65536])
