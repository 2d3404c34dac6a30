"""Module-level GPU lane: the same weights on CPU (reference) and on CUDA (generated kernels).

The numerics rule (conftest.py), for the output and every parameter/input gradient:
    max|cuda_kernels(lowp) - ref32| <= 2 * max|ref_lowp - ref32| + 1e-5
where ref32 is the fp32 reference and ref_lowp the same reference computed in the kernels' dtype on
the same device (use_triton_kernel=False), with two refinements, both measured (issue 4):

- Block selection is discrete. The fused top-k kernel scores in fp32 from the low-precision q and ck,
  the low-precision reference scores in low precision: at a near-tie the two low-precision paths can pick
  different blocks, and one of them then differs from ref32 by a whole block's contribution (H200, fp16,
  causal, diff-topk, unshared, l' = 8: output 0.11 against ref_lowp's 0.037). So the kernel run's
  selection is recorded; where its valid blocks differ from ref32's, the test first checks that every
  differing row is a near-tie (each block the kernel picked has a ref32 probability within
  2 * max|p_lowp - p32| of ref32's k-th largest), then reruns ref32 and ref_lowp on the kernel's own
  selection (the reference's own probabilities at those blocks) and applies the rule to those.
- Gradients are stored in the low-precision dtype (parameters and input), so the kernel and the reference
  both end on a bf16/fp16 rounding of the same sum: one unit in the last place of that dtype at the
  element's magnitude is allowed on top, elementwise (bf16 compress_mem_kv: the kernel differs from ref_lowp by exactly
  one ulp, 4.9e-4 at |g| = 0.067: 1.9 ulp from ref32 against ref_lowp's 0.9 ulp).
"""
from __future__ import annotations

import copy
import itertools
import os
import random

import pytest
import torch

from conftest import assert_numerics
from nsa_codegen import SparseAttention, reference

pytestmark = pytest.mark.gpu
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SEED_GRID = list(itertools.product(
    (False, True),  # use_diff_topk
    (False, True),  # causal
    (1, 4, 31, 32, 120),  # seq_len
    (8, 4),  # kv_heads
    (8, 4, 2),  # selection_block_size
    (0, 2),  # num_selected
    (False, True),  # query_heads_share_selected_kv
    (False, True),  # interpolated_importance_score
))
# A fixed random sample of NSA_GPU_GRID_SAMPLE points (default 64; every value of every axis occurs,
# checked below); NSA_GPU_GRID_SAMPLE=960 runs the whole grid.
SEED_GRID = random.Random(0).sample(SEED_GRID, min(len(SEED_GRID), int(os.environ.get("NSA_GPU_GRID_SAMPLE", "64"))))
assert all(len({p[i] for p in SEED_GRID}) == n for i, n in enumerate((2, 2, 5, 2, 3, 2, 2, 2))), "sample misses an axis value"


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Zero-initialised parameters (memory rows, positions, gate weights) must not hide bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen).to(p.device)  # CPU generator: same on any device
            if "norm" in name:
                p.copy_(1 + 0.1 * noise)
            elif "rotary" not in name:
                p.copy_(p + 0.05 * noise)


class _SelectionProbe:
    """Stands in for `module._select` during one forward: records the selection (block_idx, block_valid);
    on the reference path also the dense probabilities of every candidate (b, n, Hs, U). With `force`
    ((block_idx, block_valid) of another run), returns those blocks with *this* run's own probabilities
    at them (so use_diff_topk gradients flow exactly as the reference computes them)."""

    def __init__(self, module, force=None):
        self.module, self.force = module, force
        self.selection = self.p_full = None

    def __call__(self, q, ck_all, query_offset=0):
        m = self.module
        idx, valid, values = type(m)._select(m, q, ck_all, query_offset)
        if idx.shape[-1] and not m.use_triton_kernel:  # reference path: every candidate's probability
            kw = dict(num_mem=m.num_mem_compress_kv, compress_block_size=m.compress_block_size,
                      stride=m.compress_block_sliding_stride, selection_block_size=m.selection_block_size,
                      causal=m.causal, share=m.query_heads_share_selected_kv, scale=m.scale,
                      interpolated=m.interpolated_importance_score, query_offset=query_offset)
            U = reference.num_candidates(query_offset + q.shape[1], ck_all.shape[1] - kw["num_mem"], kw["stride"],
                                         kw["selection_block_size"], kw["interpolated"])
            all_idx, _, all_val = reference.select_topk(q, ck_all, num_selected=U, **kw)
            self.p_full = torch.zeros_like(all_val).scatter(-1, all_idx, all_val)
            if self.force is not None:
                f_idx, f_valid = (t.to(idx.device) for t in self.force)
                idx, valid = f_idx.long(), f_valid
                values = self.p_full.gather(-1, idx.clamp(0, U - 1))  # invalid entries: any index
        self.selection = (idx.detach().long().cpu(), valid.detach().cpu())
        return idx, valid, values


def _run(module, x, use_kernels: bool, force=None):
    module.use_triton_kernel = use_kernels
    probe = module._select = _SelectionProbe(module, force)
    try:
        x = x.detach().clone().requires_grad_(True)
        out = module(x)
        grad_out = torch.ones_like(out) / out.numel() ** 0.5  # deterministic across devices
        out.backward(grad_out)
    finally:
        del module._select
    grads = {name: p.grad.detach().float().cpu() for name, p in module.named_parameters() if p.grad is not None}
    grads["input"] = x.grad.detach().float().cpu()
    paths = dict(getattr(module, "last_paths", {}))
    paths["_probe"] = probe
    return out.detach().float().cpu(), grads, paths


def _valid_sets(selection):
    """(b, n, Hs, kk) -> the sorted valid block indices per row (invalid entries as -1)."""
    idx, valid = selection
    return torch.where(valid, idx, torch.full_like(idx, -1)).sort(-1).values


def _selection_flips(probe_k, probe_32, probe_l):
    """Rows where the kernel's valid blocks differ from ref32's; asserts each one is a near-tie.
    Returns the number of differing rows."""
    if probe_k.selection is None or probe_32.selection is None or probe_k.selection[0].shape[-1] == 0:
        return 0
    sk, s32 = _valid_sets(probe_k.selection), _valid_sets(probe_32.selection)
    assert sk.shape == s32.shape, (sk.shape, s32.shape)
    rows = (sk != s32).any(-1)
    if not rows.any():
        return 0
    p32 = probe_32.p_full.detach().float().cpu()
    pl = probe_l.p_full.detach().float().cpu()
    tol = 2 * (pl - p32).abs().max().item() + 1e-6
    kth = p32.topk(sk.shape[-1], dim=-1).values[..., -1:]  # ref32's k-th largest probability
    idx_k, valid_k = probe_k.selection
    p_at_k = p32.gather(-1, idx_k.clamp(0, p32.shape[-1] - 1))
    short = torch.where(valid_k, kth - p_at_k, torch.zeros_like(p_at_k))[rows]
    assert short.max().item() <= tol, (
        f"selection differs from ref32 in {int(rows.sum())} rows and not by a near-tie: a chosen block's "
        f"ref32 probability is {short.max().item():.3e} below the k-th largest (tolerance {tol:.3e})")
    return int(rows.sum())


def _compare_runs(ref32_module, ref32_x, low_module, low_x, dtype):
    """Runs ref32, ref_lowp and the kernels, handles selection flips, applies the rule; returns paths."""
    out32, grads32, paths32 = _run(ref32_module, ref32_x, use_kernels=False)
    for p in low_module.parameters():
        p.grad = None
    out_l, grads_l, paths_l = _run(low_module, low_x, use_kernels=False)
    for p in low_module.parameters():
        p.grad = None
    out_k, grads_k, paths = _run(low_module, low_x, use_kernels=True)
    probe_k = paths.pop("_probe")
    assert "triton" in paths.values(), f"no branch ran on generated kernels: {paths}"
    flips = _selection_flips(probe_k, paths32["_probe"], paths_l["_probe"])
    if flips:  # near-tie: compare against both references run on the kernel's own selection
        for p in ref32_module.parameters():
            p.grad = None
        out32, grads32, _ = _run(ref32_module, ref32_x, use_kernels=False, force=probe_k.selection)
        for p in low_module.parameters():
            p.grad = None
        out_l, grads_l, _ = _run(low_module, low_x, use_kernels=False, force=probe_k.selection)
    assert_numerics("output", out_k, out32, out_l)
    assert grads_k.keys() == grads32.keys() == grads_l.keys()
    for name in grads32:
        assert_numerics(f"grad {name}", grads_k[name], grads32[name], grads_l[name], ulp_dtype=dtype)
    paths["selection_flips"] = flips
    return paths


def _compare(attn_cpu, x, dtype):
    for p in attn_cpu.parameters():
        p.grad = None
    cuda_module = copy.deepcopy(attn_cpu).cuda().to(dtype)
    return _compare_runs(attn_cpu, x, cuda_module, x.cuda().to(dtype), dtype)


@cuda
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bf16", "fp16"))
@pytest.mark.parametrize("diff_topk, causal, seq_len, kv_heads, sel_block, num_sel, share, interp", SEED_GRID)
def test_seed_grid_cuda_matches_cpu_reference(diff_topk, causal, seq_len, kv_heads, sel_block, num_sel,
                                              share, interp, dtype):
    torch.manual_seed(seq_len * 7 + sel_block)
    attn = SparseAttention(
        dim=512, dim_head=64, heads=8, kv_heads=kv_heads, causal=causal, sliding_window_size=2,
        compress_block_size=4, selection_block_size=sel_block, num_selected_blocks=num_sel,
        use_diff_topk=diff_topk, query_heads_share_selected_kv=share,
        interpolated_importance_score=interp)
    _randomize(attn, seed=seq_len)
    _compare(attn, torch.randn(2, seq_len, 512), dtype)


LONG_GRID = [  # (n, heads, kv_heads, causal): G in {1, 4, 16}
    (2048, 16, 16, True), (2048, 16, 4, True), (2048, 16, 1, True),
    (8192, 16, 1, True), (8192, 16, 4, False),
]


@cuda
@pytest.mark.parametrize("n, heads, kv_heads, causal", LONG_GRID)
def test_long_sequences_cuda_matches_reference(n, heads, kv_heads, causal):
    """Long n: ref32 runs on CUDA too (use_triton_kernel=False) — the CPU would take minutes."""
    torch.manual_seed(n + kv_heads)
    attn = SparseAttention(
        dim=256, dim_head=64, heads=heads, kv_heads=kv_heads, causal=causal, sliding_window_size=128,
        compress_block_size=32, compress_block_sliding_stride=16, selection_block_size=64,
        num_selected_blocks=8).cuda()
    _randomize(attn, seed=n)
    _compare_on_cuda(attn, torch.randn(1, n, 256, device="cuda"), torch.bfloat16)


def _compare_on_cuda(attn32, x, dtype):
    for p in attn32.parameters():
        p.grad = None
    low = copy.deepcopy(attn32).to(dtype)
    return _compare_runs(attn32, x, low, x.to(dtype), dtype)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_and_backward_never_wait_for_the_host(dtype):
    """No host synchronisation in a warm forward + backward (the first call may tune, which times
    kernels): `torch.cuda.set_sync_debug_mode("error")` raises on any synchronising call."""
    torch.manual_seed(0)
    attn = SparseAttention(dim=256, dim_head=64, heads=8, kv_heads=2, causal=True, sliding_window_size=64,
                           compress_block_size=16, compress_block_sliding_stride=8, selection_block_size=16,
                           num_selected_blocks=4).cuda().to(dtype)
    x = torch.randn(2, 1000, 256, device="cuda", dtype=dtype, requires_grad=True)
    attn(x).float().sum().backward()  # warm: compile, tune, fill the in-process memo
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = attn(x)
        out.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert set(attn.last_paths.values()) == {"triton"}, attn.last_paths
