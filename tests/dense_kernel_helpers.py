"""Helpers shared by the dense-tile kernel tests (sliding window: test_window_kernels.py, compressed
attention: test_compressed_kernels.py): the numerics rule, strided inputs, NaN-poisoned outputs and the
GPU lane's error report."""
from __future__ import annotations

import json
import os

import pytest
import torch

from nsa_codegen.kernels import window as ops_window


def gpu_report(record: dict) -> None:
    """GPU lane: append one JSON line per result to $NSA_TEST_REPORT_DIR (or $OUT) /dense_kernels_gpu.jsonl,
    so the worst errors per family / dtype and the resource comparison survive pytest's capture."""
    root = os.environ.get("NSA_TEST_REPORT_DIR") or os.environ.get("OUT")
    if root:
        with open(os.path.join(root, "dense_kernels_gpu.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def assert_close(name, got, ref32, ref_low, dtype):
    """design.md: fp32 -> max|got - ref32| <= 1e-4 relative (unit floor); else
    <= 2 * max|ref_low - ref32| + 1e-5. Prints the worst mismatch on failure."""
    got, ref32 = got.float(), ref32.float()
    assert not torch.isnan(got).any(), f"{name}: NaN in the output (an element left unwritten?)"
    diff = (got - ref32).abs()
    err = diff.max().item() if diff.numel() else 0.0
    if dtype == torch.float32:
        tol = 1e-4 * max(ref32.abs().max().item() if ref32.numel() else 0.0, 1.0)
    else:
        tol = 2 * (ref_low.float() - ref32).abs().max().item() + 1e-5
    if err > tol:
        idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise AssertionError(
            f"{name}: max err {err:.3e} > tol {tol:.3e} at {idx}: got {got[idx].item():.6g}, ref {ref32[idx].item():.6g}"
        )
    return err


@pytest.fixture
def poison(monkeypatch):
    """Every kernel output starts as NaN, so an element the kernels skip shows up (both families
    allocate through ops_window.alloc_output)."""

    def alloc(shape, device, dtype):
        return torch.full(tuple(shape), float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(ops_window, "alloc_output", alloc)


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
        assert_close(name, got, ref, ref, torch.float32)
    dk = grads[1]
    row_sum = dk.sum(1).abs().max().item()
    assert row_sum <= 1e-5 * dk.abs().sum(1).max().item(), row_sum
