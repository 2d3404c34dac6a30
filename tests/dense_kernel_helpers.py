"""Helpers shared by the dense-tile kernel tests (sliding window: test_window_kernels.py, compressed
attention: test_compressed_kernels.py; the launch recorder and the report also by test_combine_kernels.py):
strided inputs, the launch recorder, the exact-delta check of the backward and the
GPU lane's error report. The numerics rule and the poison fixture are in conftest.py."""
from __future__ import annotations

import json
import os

import torch

from conftest import assert_numerics


class LaunchRecorder:
    """A `wrap` for the launchers' internals that launches normally and keeps (kernel name, kwargs, compiled
    kernel) of each launch, so a GPU test can read the compiled kernels' registers, spills and shared memory."""

    def __init__(self):
        self.launched = []

    def __call__(self, kernel):
        recorder = self

        class _Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    compiled = kernel[grid](*args, **kwargs)
                    name = kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel)
                    recorder.launched.append((name, kwargs, compiled))
                    return compiled

                return launch

        return _Grid()


def gpu_report(record: dict) -> None:
    """GPU lane: append one JSON line per result to $NSA_TEST_REPORT_DIR (or $OUT) /dense_kernels_gpu.jsonl,
    so the worst errors per family / dtype and the resource comparison survive pytest's capture."""
    root = os.environ.get("NSA_TEST_REPORT_DIR") or os.environ.get("OUT")
    if root:
        with open(os.path.join(root, "dense_kernels_gpu.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def make_inputs(b, nq, nk, H, K, d, dtype, device, seed):
    """q, k, v (k, v: nk rows; compressed rows for the compressed family) as strided views of packed
    tensors (last dim contiguous, nothing copied); dout strided too."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(b, nq, H + 1, d, generator=g)[:, :, :H].to(device=device, dtype=dtype)
    kv = torch.randn(b, nk, 2 * K, d, generator=g).to(device=device, dtype=dtype)
    k, v = kv[:, :, :K], kv[:, :, K:]
    dout = torch.randn(b, H, nq, d, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    return q, k, v, dout


def assert_backward_uses_exact_delta(fwd_launch, bwd_launch, q, k, v, dout, ref_grads, names, **kw):
    """Backward given an output off by 1% (as a 16-bit O is off by up to 2^-9): the fp32 gradients still
    equal the reference's `ref_grads` (dq, dk, dv) and every column of dk sums over its key rows to 0
    (adding one vector to every key row leaves the softmax unchanged). A kernel using FlashAttention's
    delta = rowsum(dO * O) fails the second check: its dk rows sum to -scale * sum_i (delta err)_i q_i."""
    out, lse = fwd_launch(q, k, v, **kw)
    wrong = out * (1 + 0.01 * torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    grads = bwd_launch(q, k, v, wrong, lse, dout, **kw)
    for name, got, ref in zip(names, grads, ref_grads):
        assert_numerics(name, got, ref)
    dk = grads[1]
    row_sum = dk.sum(1).abs().max().item()
    assert row_sum <= 1e-5 * dk.abs().sum(1).max().item(), row_sum
