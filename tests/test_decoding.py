"""Incremental decoding (spec section 8): prompt -> (out, cache), then one token at a time; every
decoded output equals the parallel forward at that position (fp32, atol 1e-5).

Parameters that start at zero (memory rows, intra-block positions, the combine gate's weight) are
randomized first, so a wrong memory, window or gate in the decoding path cannot hide behind zeros.
The grid covers all three score mappings of spec 4.4 ((a) l' == s, (b) l' a multiple of s, (c) the
rest and everything interpolated), strides 2 and 4 with overlapping windows (l = 5, 8), selection
sizes 8 / 16 / 20, MHA and GQA with shared and unshared selection, 1 and 3 memory rows, and prompt
lengths 0, 1, 2, 5, 13 and 33 (longer than several compression and selection blocks).
"""
from __future__ import annotations

import pytest
import torch

from nsa_codegen import DecodeCache, SparseAttention

ATOL = 1e-5
DIM, DIM_HEAD, HEADS = 64, 16, 4


def make_module(*, kv_heads=2, share=True, l=5, s=2, sel=8, k=2, interpolated=False,
                diff_topk=False, window=3, num_mem=1, seed=0) -> SparseAttention:
    torch.manual_seed(seed)
    attn = SparseAttention(
        dim=DIM, dim_head=DIM_HEAD, heads=HEADS, kv_heads=kv_heads, causal=True,
        sliding_window_size=window, compress_block_size=l, compress_block_sliding_stride=s,
        selection_block_size=sel, num_selected_blocks=k, num_compressed_mem_kv=num_mem,
        query_heads_share_selected_kv=share, interpolated_importance_score=interpolated,
        use_diff_topk=diff_topk,
    )
    randomize_zero_init(attn)
    return attn


@torch.no_grad()
def randomize_zero_init(attn: SparseAttention):
    attn.compress_mem_kv.normal_(0.0, 1.0)
    attn.k_intrablock_positions.normal_(0.0, 0.5)
    attn.v_intrablock_positions.normal_(0.0, 0.5)
    gate = attn.to_strategy_combine[0]
    gate.weight.normal_(0.0, 0.3)
    gate.bias.normal_(0.0, 1.0)


def decode(attn: SparseAttention, x: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Outputs for all of x: the prompt in parallel, then one token at a time."""
    out, cache = attn(x[:, :prompt_len], return_cache=True)
    outs = [out]
    for i in range(prompt_len, x.shape[1]):
        step, cache = attn(x[:, i:i + 1], cache=cache, return_cache=True)
        assert step.shape == (x.shape[0], 1, DIM)
        outs.append(step)
    assert isinstance(cache, DecodeCache) and cache.seq_len == x.shape[1]
    return torch.cat(outs, dim=1)


def assert_decoding_matches(attn: SparseAttention, seq_len: int, prompt_len: int, batch: int = 2):
    x = torch.randn(batch, seq_len, DIM)
    with torch.no_grad():
        parallel = attn(x)
        decoded = decode(attn, x, prompt_len)
    err = (decoded - parallel).abs()
    worst = err.max().item()
    where = int(err.amax(dim=(0, 2)).argmax())
    assert worst <= ATOL, f"max |decoded - parallel| = {worst:.3e} at position {where}"
    assert parallel.abs().max() > 1e-2  # not a vacuous comparison


# (l, s, l') with the mapping each one exercises without / with interpolation
BLOCKS = [
    (5, 2, 8),    # (b) r=4          | (c) interpolated
    (5, 2, 16),   # (b) r=8          | (c)
    (5, 2, 20),   # (b) r=10         | (c)
    (5, 4, 8),    # (b) r=2          | (c)
    (5, 4, 16),   # (b) r=4          | (c)
    (5, 4, 20),   # (b) r=5          | (c)
    (4, 4, 4),    # (a) l' == s      | (a)
    (8, 4, 4),    # (a), overlapping | (a)
    (4, 2, 2),    # (a)              | (a)
    (8, 4, 3),    # (c) l' < s       | (c)
    (4, 4, 6),    # (c) not a multiple
]
HEAD_CFGS = [(4, True), (2, True), (2, False), (1, False)]  # (kv_heads, shared selection)


@pytest.mark.parametrize("l,s,sel", BLOCKS, ids=[f"l{l}_s{s}_sel{sel}" for l, s, sel in BLOCKS])
@pytest.mark.parametrize("interpolated", (False, True), ids=("plain", "interp"))
@pytest.mark.parametrize("kv_heads,share", HEAD_CFGS, ids=[f"kv{k}_{'shared' if s else 'unshared'}"
                                                           for k, s in HEAD_CFGS])
@pytest.mark.parametrize("prompt_len", (1, 13))
def test_decoding_matches_parallel(l, s, sel, interpolated, kv_heads, share, prompt_len):
    attn = make_module(kv_heads=kv_heads, share=share, l=l, s=s, sel=sel, k=2,
                       interpolated=interpolated, diff_topk=not share)
    assert_decoding_matches(attn, seq_len=48, prompt_len=prompt_len)


@pytest.mark.parametrize("prompt_len", (0, 1, 2, 5, 33))
@pytest.mark.parametrize("l,s,sel,interpolated", [(5, 2, 20, False), (5, 4, 16, True),
                                                   (8, 4, 3, False)])
def test_prompt_lengths(prompt_len, l, s, sel, interpolated):
    attn = make_module(kv_heads=2, share=False, l=l, s=s, sel=sel, k=3, interpolated=interpolated)
    assert_decoding_matches(attn, seq_len=56, prompt_len=prompt_len)


@pytest.mark.parametrize("k", (0, 1, 6))
@pytest.mark.parametrize("num_mem", (1, 3))
def test_num_selected_and_memory_rows(k, num_mem):
    """k = 0 is block-diagonal (5b); k = 6 exceeds the candidates for a while (kk = min(k, U))."""
    attn = make_module(kv_heads=2, share=True, l=4, s=2, sel=4, k=k, num_mem=num_mem)
    assert_decoding_matches(attn, seq_len=40, prompt_len=3)


@pytest.mark.parametrize("window", (1, 2, 9))
def test_sliding_window_sizes(window):
    attn = make_module(kv_heads=4, l=4, s=4, sel=8, window=window)
    assert_decoding_matches(attn, seq_len=30, prompt_len=4)


def test_decode_from_empty_prompt_matches_step_by_step_cache():
    """The cache after decoding equals the cache a longer prompt would have produced."""
    attn = make_module(kv_heads=2, share=False, l=5, s=2, sel=8, k=2, interpolated=True)
    x = torch.randn(2, 23, DIM)
    with torch.no_grad():
        _, cache = attn(x[:, :0], return_cache=True)
        for i in range(23):
            _, cache = attn(x[:, i:i + 1], cache=cache, return_cache=True)
        _, prompt_cache = attn(x, return_cache=True)
    for name, a, b in zip(DecodeCache._fields, cache, prompt_cache):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=name)


def test_cache_raw_rows_are_the_next_window():
    """Spec 8: the raw rows are [(n // s + 1) * s - l, n) of the unrotated keys, zero before 0."""
    attn = make_module(kv_heads=2, l=8, s=2, sel=8)
    x = torch.randn(1, 11, DIM)
    with torch.no_grad():
        _, cache = attn(x, return_cache=True)
        k = attn.to_qkv(attn.norm(x)).split(attn.qkv_split, dim=-1)[1].reshape(1, 11, 2, DIM_HEAD)
    start = (11 // 2 + 1) * 2 - 8  # 4
    torch.testing.assert_close(cache.raw_k, k[:, start:])
    _, short = attn(x[:, :3], return_cache=True)  # start = (1 + 1) * 2 - 8 = -4: four zero rows
    assert short.raw_k.shape[1] == 7 and (short.raw_k[:, :4] == 0).all()


def test_decoding_float64_is_tight():
    attn = make_module(kv_heads=2, l=4, s=2, sel=8).to(torch.float64)
    x = torch.randn(1, 20, DIM, dtype=torch.float64)
    with torch.no_grad():
        parallel = attn(x)
        decoded = decode(attn, x, 5)
    torch.testing.assert_close(decoded, parallel, atol=1e-10, rtol=0)


def test_decoding_with_grad_enabled_input():
    attn = make_module(kv_heads=2, l=4, s=2, sel=8)
    x = torch.randn(1, 12, DIM, requires_grad=True)
    parallel = attn(x)
    decoded = decode(attn, x, 4)
    torch.testing.assert_close(decoded, parallel.detach(), atol=ATOL, rtol=0)
