"""Incremental decoding (spec section 8): prompt -> (out, cache), then one token at a time; every
decoded output equals the parallel forward at that position (fp32, atol 1e-5).

Parameters that start at zero (memory rows, intra-block positions, the combine gate's weight) are
randomized first, so a wrong memory, window or gate in the decoding path cannot hide behind zeros.
The grid covers all three score mappings of spec 4.4 ((a) l' == s, (b) l' a multiple of s, (c) the
rest and everything interpolated), strides 2 and 4 with overlapping windows (l = 5, 8), selection
sizes 8 / 16 / 20, MHA and GQA with shared and unshared selection, 1 and 3 memory rows, and prompt
lengths 0, 1, 2, 5, 13 and 33 (longer than several compression and selection blocks).

The caches are preallocated (`StaticCache`): the tests of the last section check per-sequence lengths
(a batch of prompts of different lengths), several tokens per call, capacity and growth, and what a
CUDA graph needs of a step (static shapes and addresses, no host synchronization).
"""
from __future__ import annotations

import pytest
import torch

from nsa_codegen import DecodeCache, SparseAttention, StaticCache

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


def _written(cache: StaticCache, n: int, s: int, M: int) -> dict:
    """What a cache of n tokens per sequence holds: rows the steps read, by buffer."""
    return {"k": cache.k[:, :n], "v": cache.v[:, :n], "ck": cache.ck[:, :M + n // s],
            "cv": cache.cv[:, :M + n // s], "raw_k": cache.raw_k, "raw_v": cache.raw_v,
            "lengths": cache.lengths}


def test_decode_from_empty_prompt_matches_step_by_step_cache():
    """The cache after decoding equals the cache a prompt of the same tokens gives (every row a step reads)."""
    attn = make_module(kv_heads=2, share=False, l=5, s=2, sel=8, k=2, interpolated=True)
    x = torch.randn(2, 23, DIM)
    with torch.no_grad():
        _, cache = attn(x[:, :0], return_cache=True)
        for i in range(23):
            _, cache = attn(x[:, i:i + 1], cache=cache, return_cache=True)
        _, prompt_cache = attn(x, return_cache=True)
    assert cache.seq_len == prompt_cache.seq_len == 23
    decoded, prompted = _written(cache, 23, 2, 1), _written(prompt_cache, 23, 2, 1)
    for name in decoded:
        torch.testing.assert_close(decoded[name], prompted[name], atol=ATOL, rtol=0, msg=name)


def test_cache_raw_rows_are_the_next_window():
    """Spec 8: the raw rows are the unrotated keys of the last l tokens, token t in row t % l, zero rows for
    positions before 0."""
    attn = make_module(kv_heads=2, l=8, s=2, sel=8)
    x = torch.randn(1, 11, DIM)
    with torch.no_grad():
        _, cache = attn(x, return_cache=True)
        k = attn.to_qkv(attn.norm(x)).split(attn.qkv_split, dim=-1)[1].reshape(1, 11, 2, DIM_HEAD)
        for t in range(11 - 8, 11):
            torch.testing.assert_close(cache.raw_k[:, t % 8], k[:, t])
        _, short = attn(x[:, :3], return_cache=True)  # tokens -5..2: five zero rows
    for t in range(-5, 3):
        want = torch.zeros_like(k[:, 0]) if t < 0 else k[:, t]
        torch.testing.assert_close(short.raw_k[:, t % 8], want)


# --------------------------------------------------------------------------------------------------
# the preallocated cache: init_cache, per-sequence lengths, static shapes, no host synchronization


STATIC_CFGS = [  # (l, s, l', interpolated, shared selection): the three mappings of spec 4.4
    (5, 2, 8, False, True),   # (b)
    (4, 4, 4, False, False),  # (a), unshared
    (8, 4, 3, False, True),   # (c) l' < s
    (5, 4, 16, True, False),  # (c) interpolated
]
STATIC_IDS = [f"l{l}_s{s}_sel{sel}{'_interp' if i else ''}_{'shared' if sh else 'unshared'}"
              for l, s, sel, i, sh in STATIC_CFGS]


def ragged_decode(attn, streams, lengths, capacity):
    """Sequence i: a prompt of lengths[i] tokens of streams[i] (padded to the longest with other tokens),
    then its following tokens one step at a time. Returns (outputs per sequence (n_i, DIM), cache)."""
    b, total = streams.shape[:2]
    n = max(lengths)
    steps = total - n
    pad = torch.randn(b, n, DIM)
    prompt = torch.stack([torch.cat((streams[i, :lengths[i]], pad[i, lengths[i]:])) for i in range(b)])
    cache = attn.init_cache(b, capacity)
    outs = [[] for _ in range(b)]
    with torch.no_grad():
        out = attn(prompt, cache=cache, lengths=torch.tensor(lengths))
        for i in range(b):
            outs[i].append(out[i, :lengths[i]])
        for j in range(steps):
            token = torch.stack([streams[i, lengths[i] + j] for i in range(b)])[:, None]
            step = attn(token, cache=cache)
            for i in range(b):
                outs[i].append(step[i])
    return [torch.cat(o) for o in outs], cache


@pytest.mark.parametrize("l,s,sel,interpolated,share", STATIC_CFGS, ids=STATIC_IDS)
@pytest.mark.parametrize("lengths", [(1, 1), (5, 17), (16, 3)], ids=["1_1", "5_17", "16_3"])
def test_static_cache_ragged_batch_matches_parallel(l, s, sel, interpolated, share, lengths):
    """Batch 2 with different prompt lengths (per-sequence lengths): every output of each sequence, prompt
    and decoded, equals the parallel forward of that sequence alone; decoding crosses compression windows,
    selection blocks and the sliding window."""
    attn = make_module(kv_heads=2, share=share, l=l, s=s, sel=sel, k=2, interpolated=interpolated,
                       diff_topk=not share)
    total = 40
    streams = torch.randn(2, total, DIM)
    outs, cache = ragged_decode(attn, streams, list(lengths), capacity=max(lengths) + total - max(lengths))
    assert cache.seq_len == total and cache.max_seq_len == total
    steps = total - max(lengths)
    assert cache.lengths.tolist() == [n + steps for n in lengths]
    for i, n in enumerate(lengths):
        with torch.no_grad():
            parallel = attn(streams[i:i + 1, :n + steps])[0]
        err = (outs[i] - parallel).abs().amax(-1)
        assert err.max() <= ATOL, f"sequence {i}: max |decoded - parallel| = {err.max():.3e} at {int(err.argmax())}"


def test_static_cache_with_fixed_lengths_equals_growable_cache():
    """init_cache + prefill + steps gives what forward(..., return_cache=True) gives, with k = 0 (5b) too."""
    for k in (0, 3):
        attn = make_module(kv_heads=1, l=4, s=2, sel=4, k=k)
        x = torch.randn(2, 30, DIM)
        with torch.no_grad():
            cache = attn.init_cache(2, 30)
            static = torch.cat([attn(x[:, :9], cache=cache)] + [attn(x[:, i:i + 1], cache=cache)
                                                                 for i in range(9, 30)], dim=1)
        torch.testing.assert_close(static, decode(attn, x, 9), atol=ATOL, rtol=0)


def test_capacity_shorter_than_one_stride():
    """max_seq_len < s: the cache has no compressed row, no block ever closes."""
    attn = make_module(kv_heads=2, l=8, s=4, sel=4)
    x = torch.randn(2, 3, DIM)
    with torch.no_grad():
        cache = attn.init_cache(2, 3)
        assert cache.ck.shape[1] == 1
        out = torch.cat((attn(x[:, :1], cache=cache), attn(x[:, 1:], cache=cache)), 1)
        torch.testing.assert_close(out, attn(x), atol=ATOL, rtol=0)


def test_several_tokens_per_call_equal_single_steps():
    attn = make_module(kv_heads=2, l=5, s=2, sel=8)
    x = torch.randn(2, 25, DIM)
    with torch.no_grad():
        parallel = attn(x)
        cache = attn.init_cache(2, 25)
        out = torch.cat((attn(x[:, :6], cache=cache), attn(x[:, 6:9], cache=cache), attn(x[:, 9:25], cache=cache)), 1)
    assert cache.seq_len == 25
    torch.testing.assert_close(out, parallel, atol=ATOL, rtol=0)


def _step_tensors(cache):
    return [cache.k, cache.v, cache.ck, cache.cv, cache.raw_k, cache.raw_v, cache.lengths]


SYNCING = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique",
           "masked_select")


@pytest.mark.parametrize("route", ["reference", "ops"])
def test_decoding_step_is_static_and_never_syncs(monkeypatch, route):
    """What CUDA-graph capture needs, checked on CPU: across steps the cache's tensors keep their addresses
    and shapes, every output has the same shape, and a step never reads a tensor's value on the host
    (the host-reading Tensor methods and data-dependent-shape ops raise while the steps run). "ops": the
    decode ops routed as on CUDA (torch.ops.nsa.*, whose CPU kernel is the reference), split choice
    included."""
    if route == "ops":
        from nsa_codegen.kernels import decode as decode_ops

        monkeypatch.setattr(decode_ops, "route", lambda x, use_kernels=True: "triton")
    attn = make_module(kv_heads=2, share=False, l=5, s=2, sel=3, k=2, interpolated=True)
    x = torch.randn(2, 30, DIM)
    with torch.no_grad():
        parallel = attn(x)
    cache = attn.init_cache(2, 30)
    with torch.no_grad():
        first = attn(x[:, :4], cache=cache, lengths=torch.tensor([4, 2]))
    ptrs = [t.data_ptr() for t in _step_tensors(cache)]
    shapes = [t.shape for t in _step_tensors(cache)]

    def forbidden(name):
        def call(*args, **kwargs):
            raise AssertionError(f"a decoding step called {name}: a host synchronization")
        return call

    for name in SYNCING:
        monkeypatch.setattr(torch.Tensor, name, forbidden(f"Tensor.{name}"))
    for name in ("nonzero", "unique", "masked_select", "repeat_interleave"):
        monkeypatch.setattr(torch, name, forbidden(f"torch.{name}"))
    outs = []
    with torch.no_grad():
        for i in range(4, 30):
            outs.append(attn(x[:, i:i + 1], cache=cache))
            assert [t.data_ptr() for t in _step_tensors(cache)] == ptrs
            assert [t.shape for t in _step_tensors(cache)] == shapes
    monkeypatch.undo()
    want = "triton" if route == "ops" else "reference"
    assert attn.last_paths == {"compressed": want, "topk": "reference", "selected": want, "sliding": want,
                               "combine": "reference"}
    assert {o.shape for o in outs} == {(2, 1, DIM)}
    # sequence 0 continued its 4 prompt tokens; compare it with the parallel forward
    torch.testing.assert_close(torch.cat([first[:1]] + [o[:1] for o in outs], 1), parallel[:1], atol=ATOL, rtol=0)
    assert cache.lengths.tolist() == [30, 28]


def test_decoding_step_has_no_data_dependent_op_under_fake_tensors():
    """Under FakeTensorMode every value-dependent operation (item, nonzero, a data-dependent shape) raises:
    the prefill and the steps run through, and their shapes are static."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for l, s, sel, interpolated, share in STATIC_CFGS:
        attn = make_module(kv_heads=2, share=share, l=l, s=s, sel=sel, k=2, interpolated=interpolated)
        with FakeTensorMode(allow_non_fake_inputs=True):
            cache = attn.init_cache(2, 24)
            attn(torch.randn(2, 7, DIM), cache=cache)
            for _ in range(3):
                assert attn(torch.randn(2, 1, DIM), cache=cache).shape == (2, 1, DIM)
        assert cache.seq_len == 10


def test_static_cache_errors():
    attn = make_module(kv_heads=2, l=4, s=2, sel=4)
    cache = attn.init_cache(2, 6)
    with torch.no_grad():
        attn(torch.randn(2, 5, DIM), cache=cache)
        attn(torch.randn(2, 1, DIM), cache=cache)
        with pytest.raises(ValueError, match=r"cache is full: 6 of max_seq_len=6 .*init_cache\(batch, max_seq_len >= 7\)"):
            attn(torch.randn(2, 1, DIM), cache=cache)
        with pytest.raises(ValueError, match="lengths is only allowed with a prefill"):
            attn(torch.randn(2, 1, DIM), cache=cache, lengths=torch.tensor([1, 1]))
        cache.reset()
        assert cache.seq_len == 0 and cache.lengths.tolist() == [0, 0]
        with pytest.raises(ValueError, match=r"lengths must lie in \[0, 3\]"):
            attn(torch.randn(2, 3, DIM), cache=cache, lengths=torch.tensor([1, 4]))
        with pytest.raises(ValueError, match=r"lengths must be an integer tensor of shape \(batch,\) = \(2,\)"):
            attn(torch.randn(2, 3, DIM), cache=cache, lengths=[1, 2])
        with pytest.raises(ValueError, match="lengths is only used to prefill a cache"):
            attn(torch.randn(2, 3, DIM), lengths=torch.tensor([1, 2]))
        with pytest.raises(ValueError, match="cache was made for batch 2, inp has batch 3"):
            attn(torch.randn(3, 1, DIM), cache=cache)
        other = make_module(kv_heads=4, l=4, s=2, sel=4)
        with pytest.raises(ValueError, match="was the cache made by another module"):
            other(torch.randn(2, 1, DIM), cache=cache)
        with pytest.raises(ValueError, match="cache is torch.float32 on cpu, but this input projects to torch.float64"):
            attn.double()(torch.randn(2, 1, DIM, dtype=torch.float64), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len must be an int >= 1"):
        attn.init_cache(2, 0)
    with pytest.raises(ValueError, match="batch must be an int >= 1"):
        attn.init_cache(1.5, 8)
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        attn.init_cache(1, 8, dtype=torch.int32)
    noncausal = SparseAttention(dim=DIM, dim_head=DIM_HEAD, heads=HEADS, sliding_window_size=2, compress_block_size=4,
                                selection_block_size=4, num_selected_blocks=1)
    with pytest.raises(ValueError, match="init_cache is only allowed on a causal module"):
        noncausal.init_cache(1, 8)


def test_growable_cache_doubles_and_init_cache_never_reallocates():
    attn = make_module(kv_heads=2, l=4, s=2, sel=4)
    x = torch.randn(1, 150, DIM)
    with torch.no_grad():
        parallel = attn(x)
        out, cache = attn(x[:, :40], return_cache=True)
        assert cache.growable and cache.max_seq_len == 80
        steps = [attn(x[:, i:i + 1], cache=cache) for i in range(40, 150)]
    assert cache.max_seq_len == 160 and cache.ck.shape[1] == 1 + 80
    torch.testing.assert_close(torch.cat([out] + steps, 1), parallel, atol=ATOL, rtol=0)
    fixed = attn.init_cache(1, 150)
    assert not fixed.growable and fixed.max_seq_len == 150 and fixed.k.shape == (1, 150, 2, DIM_HEAD)


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
