"""The selection inversion behind the selected-attention dk/dv kernel (`ops.dkv_schedule`) and the
kernel's multi-segment path.

The benchmark shapes cut a popular key block's query list into several segments whose partial dk/dv
meet by atomics; the variant tests' small shapes never do (a block is selected by fewer entries than
one segment holds). Here the schedule is checked as a data structure, and the kernel is run with
one-entry segments, against its own single-segment result and the reference.
"""
from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from nsa_codegen import cache, dispatch, ops, reference  # noqa: E402

from test_select_kernels import make_inputs  # noqa: E402


def _selection(b, n, hs, kk, block_size, causal, seed):
    inp = make_inputs(b=b, n=n, H=hs, K=hs, d=16, block_size=block_size, kk=kk, causal=causal,
                      dtype=torch.float32, seed=seed)
    return inp["block_idx"], inp["block_valid"]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("segment", [1, 3, 64])
@pytest.mark.parametrize("n,block_size,kk", [(57, 8, 3), (200, 16, 5), (9, 4, 0), (5, 8, 2)])
def test_schedule_covers_every_valid_entry_once(n, block_size, kk, segment, causal):
    b, hs = 2, 3
    idx, valid = _selection(b, n, hs, kk, block_size, causal, seed=n + kk)
    entries, segments = ops.dkv_schedule(idx, valid, n, block_size, causal, segment)
    nblk = -(-n // block_size)
    assert entries.dtype == segments.dtype == torch.int32
    assert segments.shape == (b * hs, -(-(n * kk) // segment) + nblk, 4)
    for bh in range(b * hs):
        bi, h = divmod(bh, hs)
        want = {(t, s) for t in range(n) for s in range(kk)
                if valid[bi, t, h, s] and 0 <= int(idx[bi, t, h, s]) < nblk}
        seen, firsts = [], {}
        per_block = {j: 0 for j in range(nblk)}
        for blk, start, end, first in segments[bh].tolist():
            if blk < 0:
                continue
            assert 0 < end - start <= segment or (end == start and causal), (blk, start, end)
            per_block[blk] += 1
            firsts[blk] = firsts.get(blk, 0) + first
            for e in entries[bh, start:end].tolist():
                t, s = divmod(e, kk)
                assert int(idx[bi, t, h, s]) == blk and bool(valid[bi, t, h, s])
                seen.append((t, s))
        assert sorted(seen) == sorted(want), "every valid (token, slot) exactly once"
        for j in range(nblk):
            count = sum(1 for t, s in want if int(idx[bi, t, h, s]) == j)
            expected = -(-count // segment)
            if causal:
                expected = max(expected, 1)  # the own-block queries need a program even when unselected
            assert per_block[j] == expected, (j, count)
            assert firsts.get(j, 0) == (1 if expected else 0)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not CUDA, reason="needs the interpreter or CUDA")
@pytest.mark.parametrize("block_size,H,K,shared,causal", [
    (16, 16, 1, True, True),    # G = 16, one token per step
    (8, 4, 2, False, False),    # unshared, gathered small blocks
    (20, 8, 2, True, True),     # masked 32-wide tile, G = 4
])
def test_dkv_kernel_with_one_entry_segments(block_size, H, K, shared, causal):
    """Every entry its own segment: many programs per key block, meeting by atomics."""
    dev = "cuda" if CUDA else "cpu"
    n, d, kk = 61, 32, 3
    inp = make_inputs(n=n, H=H, K=K, d=d, block_size=block_size, kk=kk, shared=shared, causal=causal,
                      dtype=torch.float32, device=dev, seed=block_size + H)
    q, k, v, idx, valid, g = (inp[x] for x in ("q", "k", "v", "block_idx", "block_valid", "gates"))
    kw = dict(block_size=block_size, causal=causal, scale=d ** -0.5)
    out, lse = ops.selected_attention_fwd_launch(q, k, v, idx, valid, g, **kw)
    dout = torch.randn_like(out)
    _, dk1, dv1, _ = ops.selected_attention_bwd_launch(q, k, v, idx, valid, g, out, lse, dout, **kw)

    module = cache.load_variant(dispatch.select_specs(q, k, idx, block_size=block_size, causal=causal)[1])
    entries, segments = ops.dkv_schedule(idx, valid, n, block_size, causal, 1)
    assert int((segments[..., 0] >= 0).sum()) > -(-n // block_size) * idx.shape[2], "several segments per block"
    delta = (dout * out).sum(-1)
    dk = torch.zeros(k.shape, device=dev)
    dv = torch.zeros(v.shape, device=dev)
    ops._launch_dkv(module, ops._no_wrap, q, k, v, g, g.stride(), True, dout, lse, delta, dk, dv, entries,
                    segments, idx.shape[2], kk, kw["scale"], num_warps=4, num_stages=1)
    torch.testing.assert_close(dk, dk1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dv, dv1, rtol=1e-5, atol=1e-5)

    qr, kr, vr = (t.detach().requires_grad_() for t in (q, k, v))
    o = reference.selected_attention(qr, kr, vr, idx, valid, g, **kw)
    ref_dk, ref_dv = torch.autograd.grad(o, (kr, vr), dout)
    torch.testing.assert_close(dk, ref_dk, rtol=1e-4, atol=1e-4 * ref_dk.abs().max().item())
    torch.testing.assert_close(dv, ref_dv, rtol=1e-4, atol=1e-4 * ref_dv.abs().max().item())
