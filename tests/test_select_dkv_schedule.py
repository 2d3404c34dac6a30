"""The selection inversion behind the selected-attention dk/dv kernel (`selected.dkv_schedule`) and the
kernel's multi-segment path.

The benchmark shapes cut a popular key block's query list into several segments whose partial dk/dv
meet by atomics; the variant tests' small shapes never do (a block is selected by fewer entries than
one segment holds). Here the schedule is checked as a data structure, and the kernel is run with
one-entry segments, against its own single-segment result and the reference.
"""
from __future__ import annotations

import pytest
import torch

from conftest import CUDA, INTERPRET
from nsa_codegen import reference
from nsa_codegen.codegen import cache
from nsa_codegen.kernels import _launch, dense, selected
from test_select_kernels import make_inputs

runs_kernels = pytest.mark.skipif(not INTERPRET and not CUDA, reason="needs the interpreter or CUDA")
pytestmark = pytest.mark.usefixtures("poison")  # every launcher allocation starts as NaN / a sentinel


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
    if segment == 3:
        idx = idx.to(torch.int32)  # int32 indices too; and the caller's tensors are never written
    before = idx.clone(), valid.clone()
    entries, segments = selected.dkv_schedule(idx, valid, n, block_size, causal, segment)
    assert torch.equal(idx, before[0]) and torch.equal(valid, before[1])
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


@runs_kernels
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
    out, lse = selected.selected_attention_fwd_launch(q, k, v, idx, valid, g, **kw)
    dout = torch.randn_like(out)
    _, dk1, dv1, _ = selected.selected_attention_bwd_launch(q, k, v, idx, valid, g, out, lse, dout, **kw)

    module = cache.load_variant(selected.variant_specs(q, k, idx, block_size=block_size, causal=causal)[1])
    entries, segments = selected.dkv_schedule(idx, valid, n, block_size, causal, 1)
    assert int((segments[..., 0] >= 0).sum()) > -(-n // block_size) * idx.shape[2], "several segments per block"
    delta = (dout * out).sum(-1)
    dk = torch.zeros(k.shape, device=dev)
    dv = torch.zeros(v.shape, device=dev)
    selected._launch_dkv(module, _launch.no_wrap, q, k, v, g, g.stride(), True, dout, lse, delta, dk, dv, entries,
                    segments, idx.shape[2], kk, kw["scale"], num_warps=4, num_stages=1)
    torch.testing.assert_close(dk, dk1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dv, dv1, rtol=1e-5, atol=1e-5)

    qr, kr, vr = (t.detach().requires_grad_() for t in (q, k, v))
    o = reference.selected_attention(qr, kr, vr, idx, valid, g, **kw)
    ref_dk, ref_dv = torch.autograd.grad(o, (kr, vr), dout)
    torch.testing.assert_close(dk, ref_dk, rtol=1e-4, atol=1e-4 * ref_dk.abs().max().item())
    torch.testing.assert_close(dv, ref_dv, rtol=1e-4, atol=1e-4 * ref_dv.abs().max().item())


@pytest.mark.parametrize("which", ["q_stride", "k_shape"])
def test_kernels_refuse_int32_overflowing_extents(which):
    """Offsets within a batch element are int32 in the select / window / compressed kernels: a tensor
    spanning 2**31 elements per batch element is refused before any launch (meta tensors: no memory)."""
    from nsa_codegen.kernels import checks

    if not INTERPRET:
        pytest.skip("meta tensors reach the launch checks only under the interpreter")
    n, H, K, d, l = 4, 2, 1, 16, 4
    meta = dict(device="meta", dtype=torch.float32)
    if which == "q_stride":  # a view whose token stride is 2**30 elements (e.g. inside a huge fused buffer)
        q = torch.empty_strided((1, n, H, d), (n * 2 ** 30, 2 ** 30, d, 1), **meta)
        k = torch.empty((1, n, K, d), **meta)
    else:  # n * K * d >= 2**31
        n = 2 ** 31 // (K * d)
        q = torch.empty((1, n, K, d), **meta)
        k = torch.empty((1, n, K, d), **meta)
    v = torch.empty_like(k)
    idx = torch.zeros((1, q.shape[1], K, 1), dtype=torch.int64, device="meta")
    valid = torch.ones((1, q.shape[1], K, 1), dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="int32 offsets"):
        selected.selected_attention_fwd_launch(q, k, v, idx, valid, block_size=l, causal=True, scale=0.25)
    with pytest.raises(ValueError, match="int32 offsets"):
        dense.check_launch(q, k, "nsa_codegen.kernels.window.sliding_window_attention")
    checks.require_int32_extent("x", ok=torch.empty((2, 8, 4, 16), **meta))  # small: accepted


@runs_kernels
@pytest.mark.parametrize("block_size,H,K,shared", [(16, 16, 1, True), (8, 4, 2, False), (4, 8, 1, True)])
def test_out_of_range_valid_ids_are_ignored_not_read(block_size, H, K, shared):
    """Valid slots holding ids outside [0, cdiv(n, l')) (outside the contract) must not make a kernel
    read outside K / V: they count as invalid, forward and backward."""
    dev = "cuda" if CUDA else "cpu"
    n, d, kk = 45, 32, 3
    inp = make_inputs(n=n, H=H, K=K, d=d, block_size=block_size, kk=kk, shared=shared, causal=True,
                      dtype=torch.float32, device=dev, seed=3)
    q, k, v, idx, valid, g = (inp[x] for x in ("q", "k", "v", "block_idx", "block_valid", "gates"))
    bad = torch.zeros_like(valid)
    bad[:, 20:, :, 0] = True  # slot 0 of every later token: -3 or far past the end, marked valid
    idx = torch.where(bad, torch.where(torch.arange(n, device=dev)[None, :, None, None] % 2 == 0, -3, 10 ** 6), idx)
    valid_bad = valid | bad
    kw = dict(block_size=block_size, causal=True, scale=d ** -0.5)
    out, lse = selected.selected_attention_fwd_launch(q, k, v, idx, valid_bad, g, **kw)
    dout = torch.randn_like(out)
    grads = selected.selected_attention_bwd_launch(q, k, v, idx, valid_bad, g, out, lse, dout, **kw)
    qr, kr, vr, gr = (t.detach().requires_grad_() for t in (q, k, v, g))
    ref = reference.selected_attention(qr, kr, vr, torch.where(bad, 0, idx), valid & ~bad, gr, **kw)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr, gr), dout)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for name, got, want in zip(("dq", "dk", "dv", "dgates"), grads, ref_grads):
        if name == "dgates":
            got, want = got.masked_fill(bad, 0), want.masked_fill(bad, 0)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item(), msg=name)


@runs_kernels
def test_duplicate_valid_ids_stay_inside_their_row():
    """A duplicated valid id in one token's row is outside the contract (results for that token are
    undefined), but the packed backward must not write another token's d(gates): it used to store to
    the sum of the matching slots (slots 2 + 3 -> slot 5, past a row of 4)."""
    dev = "cuda" if CUDA else "cpu"
    n, d, kk, l, t = 64, 32, 4, 8, 41
    inp = make_inputs(n=n, H=8, K=2, d=d, block_size=l, kk=kk, causal=True, dtype=torch.float32, device=dev,
                      seed=11, p_valid=1.0)
    q, k, v, idx, valid, g = (inp[x] for x in ("q", "k", "v", "block_idx", "block_valid", "gates"))
    kw = dict(block_size=l, causal=True, scale=d ** -0.5)
    dup = idx.clone()
    dup[0, t, :, 3] = dup[0, t, :, 2]  # slots 2 and 3 of token t: the same block, both valid
    clean_valid = valid.clone()
    clean_valid[0, t, :, 3] = False
    results = []
    for ids, ok in ((dup, valid), (dup, clean_valid)):
        out, lse = selected.selected_attention_fwd_launch(q, k, v, ids, ok, g, **kw)
        dout = torch.ones_like(out)
        results.append(selected.selected_attention_bwd_launch(q, k, v, ids, ok, g, out, lse, dout, **kw)[3])
    others = torch.ones(n, dtype=torch.bool, device=dev)
    others[t] = False
    torch.testing.assert_close(results[0][:, others], results[1][:, others], rtol=1e-5, atol=1e-6)


@runs_kernels
def test_deterministic_mode_is_told_about_the_atomics():
    """torch.use_deterministic_algorithms(True) raises for the selected backward (fp32 atomics in dk/dv),
    warns with warn_only=True, as PyTorch's own nondeterministic kernels do."""
    dev = "cuda" if CUDA else "cpu"
    inp = make_inputs(n=20, H=2, K=1, d=16, block_size=4, kk=2, causal=True, dtype=torch.float32, device=dev)
    q, k, v, idx, valid, g = (inp[x] for x in ("q", "k", "v", "block_idx", "block_valid", "gates"))
    kw = dict(block_size=4, causal=True, scale=0.25)
    out, lse = selected.selected_attention_fwd_launch(q, k, v, idx, valid, g, **kw)
    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="not deterministic.*atomics"):
            selected.selected_attention_bwd_launch(q, k, v, idx, valid, g, out, lse, torch.ones_like(out), **kw)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="not deterministic"):
            selected.selected_attention_bwd_launch(q, k, v, idx, valid, g, out, lse, torch.ones_like(out), **kw)
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)
