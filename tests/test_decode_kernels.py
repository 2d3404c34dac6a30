"""Decoding kernels (templates/decode_fwd.py.j2, nsa_codegen/kernels/decode.py): one query token per
sequence over per-sequence key sets, split over programs (flash-decoding) and combined.

Interpreter lane (CPU, TRITON_INTERPRET=1, fp32 + fp16, small shapes): the range kernel (sliding-window
and compressed-row ranges) and the selected kernel (shared and unshared selections, invalid / negative /
own / later block ids, no slot at all) against nsa_codegen.reference under the numerics rule (conftest.py),
for G in {1, 2, 4, 8, 16} (and 3), several split counts, different lengths per sequence (empty ranges,
memory rows only), outputs and scratch poisoned before the launch; the split choice; argument errors;
the ops' CPU path; the module's decoding steps on the kernels against the parallel forward; the
resource model and the rendered sources. GPU lane (`pytest -m gpu`): the same comparison in bf16 / fp16
at long contexts, `opcheck`, and a decoding step captured in a CUDA graph and replayed.
"""
from __future__ import annotations

import pytest
import torch

from conftest import assert_numerics, interpreter_lane as interpreter, needs_cuda
from nsa_codegen import reference
from nsa_codegen.codegen.spec import VariantSpec
from nsa_codegen.kernels import decode

SMALL_TILES = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 1}  # many key tiles on short buffers
GROUPS = (1, 2, 4, 8, 16)


def make_kv(b, n, H, K, d, dtype, device="cpu", seed=0):
    """q (b, H, d) and k, v (b, n, K, d), k and v strided views of one packed buffer (as a cache's are not,
    but a caller's may be)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, H, d, generator=g).to(device=device, dtype=dtype)
    kv = torch.randn(b, n, 2 * K, d, generator=g).to(device=device, dtype=dtype)
    return q, kv[:, :, :K], kv[:, :, K:]


def check_range(q, k, v, lo, hi, max_keys, *, splits, config=SMALL_TILES, rel_slack=0.0):
    scale = q.shape[-1] ** -0.5
    out, lse = decode.decode_range_attention_launch(q, k, v, lo, hi, max_keys=max_keys, scale=scale,
                                                    num_splits=splits, config=config)
    args = (lo, hi)
    ref32, lse32 = reference.decode_range_attention(q.float(), k.float(), v.float(), *args, max_keys=max_keys,
                                                    scale=scale)
    low = None
    if q.dtype != torch.float32:
        low = reference.decode_range_attention(q, k, v, *args, max_keys=max_keys, scale=scale)[0]
    assert out.dtype == q.dtype
    assert_numerics("out", out, ref32, low, rel_slack=rel_slack)
    check_lse(lse, lse32)
    return out, lse


def check_selected(q, k, v, idx, valid, pos, block_size, *, splits, config=SMALL_TILES, rel_slack=0.0):
    scale = q.shape[-1] ** -0.5
    kw = dict(block_size=block_size, scale=scale)
    out, lse = decode.decode_selected_attention_launch(q, k, v, idx, valid, pos, num_splits=splits, config=config,
                                                       **kw)
    ref32, lse32 = reference.decode_selected_attention(q.float(), k.float(), v.float(), idx, valid, pos, **kw)
    low = None if q.dtype == torch.float32 else reference.decode_selected_attention(q, k, v, idx, valid, pos, **kw)[0]
    assert_numerics("out", out, ref32, low, rel_slack=rel_slack)
    check_lse(lse, lse32)
    return out, lse


def check_lse(lse, lse32):
    assert lse.dtype == torch.float32 and not torch.isnan(lse).any(), "lse: NaN (an element left unwritten?)"
    finite = torch.isfinite(lse32)
    assert torch.equal(torch.isfinite(lse), finite)
    if finite.any():
        assert (lse[finite] - lse32[finite]).abs().max().item() <= 1e-3


# ----------------------------------------------------------------------------------------------------
# interpreter lane: the range kernel


@interpreter
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("splits", [1, 5])
@pytest.mark.parametrize("group", GROUPS)
def test_range_window_per_sequence(group, splits, dtype):
    """Sliding windows at different positions per sequence: [t - W, t] clipped at 0, W + 1 = 21 keys at most,
    one sequence at position 0 (a single key) and one whose window starts mid-buffer."""
    b, n, K, d, W = 3, 60, 2, 32, 20
    q, k, v = make_kv(b, n, group * K, K, d, dtype, seed=group * 10 + splits)
    t = torch.tensor([0, 33, 59])
    check_range(q, k, v, (t - W).clamp(min=0), t + 1, W + 1, splits=splits)


@interpreter
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("splits", [3])
@pytest.mark.parametrize("group", GROUPS)
def test_range_compressed_rows_and_empty(group, splits, dtype):
    """Compressed rows [0, M + c) with c = 0 (the memory rows alone), 5 and the whole buffer, and an empty
    range (no key: out 0, lse -inf)."""
    b, rows, K, d, M = 4, 40, 2, 32, 2
    q, k, v = make_kv(b, rows, group * K, K, d, dtype, seed=group + 100 * splits)
    c = torch.tensor([0, 5, rows - M, 0])
    lo = torch.zeros(4, dtype=torch.int32)
    hi = (M + c).to(torch.int32)
    hi[3] = 0
    out, lse = check_range(q, k, v, lo, hi, rows, splits=splits)
    assert (out[3] == 0).all() and torch.isinf(lse[3]).all()


@interpreter
@pytest.mark.usefixtures("poison")
def test_range_bounds_are_clipped():
    """lo < 0, hi past the buffer, a range longer than max_keys, lo past the buffer; and the launcher's own
    config and split choice."""
    q, k, v = make_kv(5, 50, 8, 2, 64, torch.float32, seed=3)
    lo = torch.tensor([-10, 40, 0, 60, 10])
    hi = torch.tensor([5, 80, 50, 70, 10])
    check_range(q, k, v, lo, hi, 30, splits=4)
    check_range(q, k, v, lo, hi, 30, splits=None, config=None)


@interpreter
@pytest.mark.usefixtures("poison")
def test_range_group_not_power_of_two_and_head_dim_padding():
    """G = 3 leaves padding rows; d = 40 pads to a 64-wide tile."""
    q, k, v = make_kv(2, 45, 6, 2, 40, torch.float32, seed=4)
    check_range(q, k, v, torch.tensor([3, 0]), torch.tensor([44, 45]), 45, splits=3)


# ----------------------------------------------------------------------------------------------------
# interpreter lane: the selected kernel


def random_selection(b, hs, kk, n, block_size, pos, seed):
    """Slots with distinct valid ids mostly before each query's own block, plus invalid slots and valid
    ones the rule ignores (negative, the own block, later blocks, past the buffer)."""
    g = torch.Generator().manual_seed(seed)
    nblk = -(-n // block_size)
    idx = torch.stack([torch.stack([torch.randperm(nblk + 2, generator=g)[:kk] - 1 for _ in range(hs)])
                       for _ in range(b)])
    valid = torch.rand(b, hs, kk, generator=g) < 0.8
    if kk:
        own = pos // block_size
        idx[:, 0, 0] = own  # a valid own block: ignored (it enters as the own block)
        valid[:, 0, 0] = True
    return idx, valid


@interpreter
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("group", GROUPS)
def test_selected_shared(group, splits, dtype):
    b, n, K, d, block, kk = 3, 64, 2, 32, 8, 4
    q, k, v = make_kv(b, n, group * K, K, d, dtype, seed=group + splits)
    pos = torch.tensor([2, 37, 63])
    idx, valid = random_selection(b, K, kk, n, block, pos, seed=group)
    check_selected(q, k, v, idx, valid, pos, block, splits=splits)


@interpreter
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("group", [2, 4])
def test_selected_unshared(group, dtype):
    """Every query head its own selection (Hs = H): the g1 variant, kv head h // G."""
    b, n, K, d, block, kk = 2, 80, 2, 32, 16, 3
    q, k, v = make_kv(b, n, group * K, K, d, dtype, seed=group)
    pos = torch.tensor([50, 79])
    idx, valid = random_selection(b, group * K, kk, n, block, pos, seed=group + 7)
    check_selected(q, k, v, idx.to(torch.int32), valid, pos.to(torch.int32), block, splits=2)


@interpreter
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("block", [20, 64])
def test_selected_block_sizes_and_no_slot(block):
    """l' = 20 (not a power of two: tiles masked inside a block) and 64 (several tiles per block); kk = 0 (the
    own block alone, 5b) with more splits than slots; the default config and split choice."""
    b, n, K, d = 3, 150, 1, 32
    q, k, v = make_kv(b, n, 4, K, d, torch.float32, seed=block)
    pos = torch.tensor([0, 70, 149])
    idx, valid = random_selection(b, K, 3, n, block, pos, seed=block)
    check_selected(q, k, v, idx, valid, pos, block, splits=3)
    check_selected(q, k, v, idx, valid, pos, block, splits=None, config=None)
    empty_idx, empty_valid = idx[..., :0], valid[..., :0]
    check_selected(q, k, v, empty_idx, empty_valid, pos, block, splits=4)


# ----------------------------------------------------------------------------------------------------
# split choice, argument errors, the ops' CPU path


def test_choose_splits():
    assert decode.choose_splits(0, 8, 132) == 1
    assert decode.choose_splits(100, 8, 132) == 1  # below one split's worth of keys
    assert decode.choose_splits(64 * 1024, 8, 132) == 33  # one sequence of 8 kv heads: two waves over 132 SMs
    assert decode.choose_splits(64 * 1024, 512, 132) == 1  # a large batch fills the GPU alone
    assert decode.choose_splits(10 ** 7, 1, 132) == decode.MAX_SPLITS
    q, k = torch.empty(1, 16, 64), torch.empty(1, 65536, 2, 64)
    assert decode.range_splits(q, k, 513) == 3 and decode.range_splits(q, k, 10 ** 6) == decode.MAX_SPLITS
    idx = torch.empty(1, 2, 16, dtype=torch.long)
    assert decode.selected_splits(q, idx, 64) == 5  # (16 + 1) * 64 keys


def _range_args(dtype=torch.float16):
    q, k, v = make_kv(2, 10, 4, 2, 16, dtype)
    return dict(q=q, k=k, v=v, lo=torch.tensor([0, 1]), hi=torch.tensor([3, 9]), max_keys=10, scale=0.25)


def _bad_range_args():
    cases = []

    def case(word, **change):
        cases.append(pytest.param({**_range_args(), **change}, word, id=word.replace(" ", "_")))

    case("q must be 3-D", q=torch.randn(2, 1, 4, 16, dtype=torch.float16))
    case("k must be 4-D", k=torch.randn(2, 10, 16, dtype=torch.float16))
    case("share one dtype", q=torch.randn(2, 4, 16))
    case("mismatched heads", q=torch.randn(2, 3, 16, dtype=torch.float16))
    case("to match q", q=torch.randn(3, 4, 16, dtype=torch.float16))
    case("lo dtype must be torch.int32 or torch.int64", lo=torch.tensor([0.0, 1.0]))
    case(r"hi must have shape \(b,\)", hi=torch.tensor([3, 9, 1]))
    case("max_keys must be an int >= 0", max_keys=-1)
    case("scale must be a Python float", scale="x")
    case("num_splits must be an int", num_splits=0)
    case(r"num_splits must be an int in \[1, 128\]", num_splits=129)
    case("torch.Tensor", lo=[0, 1])
    return cases


@pytest.mark.parametrize("args, word", _bad_range_args())
def test_range_validation_errors(args, word):
    with pytest.raises((ValueError, TypeError), match=word):
        decode.decode_range_attention_launch(**args)
    with pytest.raises((ValueError, TypeError), match=word):
        decode.decode_range_attention(**args)


def _selected_args():
    q, k, v = make_kv(2, 32, 4, 2, 16, torch.float16)
    return dict(q=q, k=k, v=v, block_idx=torch.zeros(2, 2, 3, dtype=torch.long),
                block_valid=torch.ones(2, 2, 3, dtype=torch.bool), positions=torch.tensor([5, 30]), block_size=8,
                scale=0.25)


@pytest.mark.parametrize("change, word", [
    (dict(block_idx=torch.zeros(2, 3, 3, dtype=torch.long), block_valid=torch.ones(2, 3, 3, dtype=torch.bool)),
     "Hs = K = 2"),
    (dict(block_idx=torch.zeros(2, 2, 3)), "block_idx dtype must be torch.int32 or torch.int64"),
    (dict(block_valid=torch.ones(2, 2, 3, dtype=torch.int32)), "block_valid dtype must be torch.bool"),
    (dict(block_valid=torch.ones(2, 2, 4, dtype=torch.bool)), "block_valid must have shape"),
    (dict(positions=torch.tensor([[5, 30]])), r"positions must have shape \(b,\)"),
    (dict(block_size=0), "block_size must be a positive int"),
], ids=["selection heads", "idx dtype", "valid dtype", "valid shape", "positions shape", "block_size"])
def test_selected_validation_errors(change, word):
    args = {**_selected_args(), **change}
    with pytest.raises((ValueError, TypeError), match=word):
        decode.decode_selected_attention_launch(**args)
    with pytest.raises((ValueError, TypeError), match=word):
        decode.decode_selected_attention(**args)


def test_kernel_limits_name_the_reference_path():
    """Head dims and dtypes only the kernels refuse: the launchers say so; the public functions on CPU run
    the reference, which takes them."""
    q, k, v = make_kv(2, 10, 4, 2, 12, torch.float64)
    args = dict(q=q, k=k, v=v, lo=torch.tensor([0, 1]), hi=torch.tensor([3, 9]), max_keys=10, scale=0.25)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 for the Triton kernels"):
        decode.decode_range_attention_launch(**args)
    with pytest.raises(ValueError, match="unsupported head dim d=12"):
        decode.decode_range_attention_launch(**{**args, **dict(zip("qkv", (t.float() for t in (q, k, v))))})
    torch.testing.assert_close(decode.decode_range_attention(**args),
                               reference.decode_range_attention(**args)[0], rtol=0, atol=0)


def test_launcher_rejects_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensors"):
        decode.decode_range_attention_launch(**_range_args(torch.float32))


def test_ops_cpu_path_is_the_reference_and_reports_it():
    args = _range_args(torch.float32)
    got = torch.ops.nsa.decode_range_attention(*(args[n] for n in ("q", "k", "v", "lo", "hi")), 10, 0.25, 2)
    want = reference.decode_range_attention(**args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    sel = _selected_args()
    sel = {n: (t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in sel.items()}
    got = torch.ops.nsa.decode_selected_attention(*(sel[n] for n in ("q", "k", "v", "block_idx", "block_valid",
                                                                     "positions")), 8, 0.25, 3)
    want = reference.decode_selected_attention(**sel)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    paths = {}
    decode.decode_range_attention(**args, paths=paths, branch="sliding")
    decode.decode_selected_attention(**sel, paths=paths)
    assert paths == {"sliding": "reference", "selected": "reference"}


# ----------------------------------------------------------------------------------------------------
# the module's decoding steps on the kernels


@interpreter
@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
def test_module_decoding_on_the_kernels_matches_parallel(monkeypatch, share):
    """The decoding steps of SparseAttention routed to the ops ("triton", as on CUDA), the ops running the
    generated kernels under the interpreter: every output equals the parallel forward's (fp32)."""
    from test_decoding import DIM, make_module

    calls = []

    def range_op(q, k, v, lo, hi, max_keys, scale, splits):
        calls.append(("range", splits))
        return decode.decode_range_attention_launch(q, k, v, lo, hi, max_keys=max_keys, scale=scale,
                                                    num_splits=splits)

    def selected_op(q, k, v, idx, valid, pos, block_size, scale, splits):
        calls.append(("selected", splits))
        return decode.decode_selected_attention_launch(q, k, v, idx, valid, pos, block_size=block_size, scale=scale,
                                                       num_splits=splits)

    monkeypatch.setattr(decode, "route", lambda x, use_kernels=True: "triton" if use_kernels else "reference")
    monkeypatch.setattr(torch.ops.nsa, "decode_range_attention", range_op)
    monkeypatch.setattr(torch.ops.nsa, "decode_selected_attention", selected_op)
    attn = make_module(kv_heads=2, share=share, l=4, s=2, sel=8, k=2, window=5)
    x = torch.randn(2, 20, DIM)
    with torch.no_grad():
        parallel = attn(x)
        cache = attn.init_cache(2, 20)
        first = attn(x[:, :7], cache=cache)
        steps = [attn(x[:, i:i + 1], cache=cache) for i in range(7, 20)]
    assert attn.last_paths == {"compressed": "triton", "topk": "reference", "selected": "triton", "sliding": "triton",
                               "combine": "reference"}
    assert {kind for kind, _ in calls} == {"range", "selected"} and len(calls) == 3 * 13
    torch.testing.assert_close(torch.cat([first] + steps, 1), parallel, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------
# generator side: resource model and rendered sources (no kernels run)


@pytest.mark.parametrize("group", [1, 3, 16, 128])
def test_decode_tile_configs_fit_and_render(group):
    from nsa_codegen.codegen import resources
    from nsa_codegen.codegen.render import render
    from nsa_codegen.codegen.resources import decode as model

    spec = VariantSpec("decode_fwd", 0, group, True)
    kept, dropped = model.tile_configs(spec)
    assert kept and model.layout(spec)["ROWS"] == max(16, 1 << (group - 1).bit_length())
    for c in kept:
        assert c["max_d16"] >= c["max_d32"] > 0
        for nbytes, limit in ((2, c["max_d16"]), (4, c["max_d32"])):
            assert model.predict(spec, c, limit, nbytes)["shared"] <= resources.SMEM_LIMIT
    assert all("fits no head dim" in line for line in dropped)
    if group <= 16:  # the shipped groups: a config for every supported head dim in both widths
        assert max(c["max_d16"] for c in kept) == max(c["max_d32"] for c in kept) == resources.MAX_HEAD_DIM
    source = render(spec)
    compile(source, spec.name, "exec")
    assert f"GROUP = {group}\n" in source and "CAUSAL = True\n" in source
    for kernel in ("def range_kernel(", "def selected_kernel(", "def combine_kernel("):
        assert kernel in source
    # structural: G = 1 has no head packing, G >= 16 a power of two no padding rows
    assert ("head = hg * " in source) == (group > 1)
    assert ("row_ok = rows < " in source) == (group > 1)
    assert ("rows >= " in source) == (group not in (16, 128))


def test_decoding_is_causal_only():
    with pytest.raises(ValueError, match=r"causal must be one of \(True,\) for decode_fwd"):
        VariantSpec("decode_fwd", 0, 4, False)


# ----------------------------------------------------------------------------------------------------
# GPU lane


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 16])
@pytest.mark.parametrize("n", [512, 8192])
def test_gpu_decode_matches_reference(n, group, d, dtype):
    b, K = 3, 2
    q, k, v = make_kv(b, n, group * K, K, d, dtype, device="cuda", seed=n + group)
    t = torch.tensor([0, n // 3, n - 1], device="cuda")
    kw = dict(config=None, rel_slack=1e-3)  # the launcher's config; a relative floor for long 16-bit sums
    for splits in (None, 1, 7):
        check_range(q, k, v, torch.zeros_like(t), t + 1, n, splits=splits, **kw)  # compressed-like
        check_range(q, k, v, (t - 511).clamp(min=0), t + 1, 512, splits=splits, **kw)  # window
        for hs in (K, group * K):
            idx, valid = random_selection(b, hs, 8, n, 64, t.cpu(), seed=n)
            check_selected(q, k, v, idx.cuda(), valid.cuda(), t, 64, splits=splits, **kw)


@pytest.mark.gpu
@needs_cuda
def test_gpu_decode_opcheck():
    q, k, v = make_kv(2, 300, 8, 2, 64, torch.bfloat16, device="cuda")
    lo, hi = torch.tensor([0, 100], device="cuda"), torch.tensor([50, 300], device="cuda")
    torch.library.opcheck(torch.ops.nsa.decode_range_attention.default, (q, k, v, lo, hi, 300, 0.125, 3))
    idx = torch.tensor([[[0, 1], [2, 3]], [[0, 4], [1, 2]]], device="cuda")
    valid = torch.ones(2, 2, 2, dtype=torch.bool, device="cuda")
    torch.library.opcheck(torch.ops.nsa.decode_selected_attention.default,
                          (q, k, v, idx, valid, hi - 1, 16, 0.125, 2))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
def test_gpu_decoding_step_in_a_cuda_graph(share):
    """A decoding step of SparseAttention captured once in a CUDA graph and replayed: each replay equals an
    eager step on a twin cache (same prompt, same tokens), and the module reports the kernels."""
    from nsa_codegen import SparseAttention

    torch.manual_seed(0)
    attn = SparseAttention(dim=256, dim_head=64, heads=8, kv_heads=2, causal=True, sliding_window_size=64,
                           compress_block_size=16, compress_block_sliding_stride=8, selection_block_size=16,
                           num_selected_blocks=4, query_heads_share_selected_kv=share).cuda().to(torch.bfloat16)
    b, prompt_len, steps = 2, 300, 40
    prompt = torch.randn(b, prompt_len, 256, device="cuda", dtype=torch.bfloat16)
    tokens = torch.randn(steps + 3, b, 1, 256, device="cuda", dtype=torch.bfloat16)
    lengths = torch.tensor([prompt_len, 123], device="cuda")
    graph_cache, eager_cache = (attn.init_cache(b, prompt_len + steps + 3) for _ in range(2))
    with torch.no_grad():
        for cache in (graph_cache, eager_cache):
            attn(prompt, cache=cache, lengths=lengths)
        # warm up (compiles the kernels) on a third cache of the same capacity (the same kernel
        # specializations and selection width), on a side stream as capture requires
        warm = attn.init_cache(b, prompt_len + steps + 3)
        attn(prompt, cache=warm, lengths=lengths)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(3):
                attn(tokens[i], cache=warm)
        torch.cuda.current_stream().wait_stream(side)
        static_in = tokens[0].clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = attn(static_in, cache=graph_cache)
        assert attn.last_paths == {"compressed": "triton", "topk": "reference", "selected": "triton",
                                   "sliding": "triton", "combine": "triton"}
        for i in range(steps):
            static_in.copy_(tokens[i])
            graph.replay()
            eager = attn(tokens[i], cache=eager_cache)
            torch.testing.assert_close(static_out, eager, rtol=0, atol=0)
    torch.testing.assert_close(graph_cache.lengths, eager_cache.lengths)
    torch.testing.assert_close(graph_cache.k, eager_cache.k, rtol=0, atol=0)
    torch.testing.assert_close(graph_cache.ck, eager_cache.ck, rtol=0, atol=0)


@pytest.mark.gpu
@needs_cuda
def test_gpu_module_decoding_matches_parallel():
    """bf16 decoding on the decode kernels against the parallel forward on the parallel kernels (the
    numerics rule against the fp32 parallel forward, per-sequence lengths)."""
    from nsa_codegen import SparseAttention

    torch.manual_seed(1)
    attn = SparseAttention(dim=256, dim_head=64, heads=8, kv_heads=2, causal=True, sliding_window_size=64,
                           compress_block_size=16, compress_block_sliding_stride=8, selection_block_size=16,
                           num_selected_blocks=4).cuda()
    x = torch.randn(2, 700, 256, device="cuda")
    with torch.no_grad():
        ref32 = attn(x)
        low = attn.to(torch.bfloat16)
        parallel = low(x.bfloat16())
        cache = low.init_cache(2, 700)
        out = torch.cat([low(x[:, :500].bfloat16(), cache=cache)] +
                        [low(x[:, i:i + 1].bfloat16(), cache=cache) for i in range(500, 700)], 1)
    assert_numerics("decoded", out[:, 500:].float(), ref32[:, 500:], parallel[:, 500:].float(), rel_slack=2e-2)
