"""SparseAttention (nsa_codegen.module) on CPU: the seed's grid, an extended grid, argument checks,
custom sub-networks, state-dict layout and initialisation.

Gradient rule (encoded in `expected_grad`, never skipped): after `out.backward`, every trainable
parameter has a finite gradient that is non-zero somewhere, except the compression networks and the
intra-block positions (`k_compress.*`, `v_compress.*`, `k_intrablock_positions`,
`v_intrablock_positions`) when no query sees any compressed block: their only route to the output is
a compressed key/value that some query attends to. Non-causal: block 0 exists iff n >= s (C = n // s).
Causal: query i sees block w iff (w + 1) * s - 1 < i, so some query sees block 0 iff n - 1 > s - 1,
i.e. n > s. (Short sequences the seed runs: n = 1 with s = 4 and, causal, n = 4 with s = 4.) Then their
gradient is None or all zero. `rotary_emb.freqs` is a frozen parameter (requires_grad=False) and never
gets one. `compress_mem_kv` always does: the memory values are always attended.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from conftest import interpreter_lane
from nsa_codegen import SparseAttention, reference

COMPRESSION_PARAMS = ("k_compress.", "v_compress.", "k_intrablock_positions", "v_intrablock_positions")


def sees_compressed_block(seq_len: int, stride: int, causal: bool) -> bool:
    """Whether any query attends to a compressed block (see the module docstring)."""
    return seq_len > stride if causal else seq_len >= stride


def expected_grad(name: str, seq_len: int, stride: int, causal: bool) -> bool | None:
    """True: finite and non-zero somewhere; False: None or all zero; None: frozen, no grad."""
    if name == "rotary_emb.freqs":
        return None
    if name.startswith(COMPRESSION_PARAMS):
        return sees_compressed_block(seq_len, stride, causal)
    return True


def check_forward_backward(attn: SparseAttention, seq_len: int, batch: int = 2):
    x = torch.randn(batch, seq_len, attn.dim, requires_grad=True)
    out = attn(x)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    stride, causal = attn.compress_block_sliding_stride, attn.causal
    for name, param in attn.named_parameters():
        want = expected_grad(name, seq_len, stride, causal)
        grad = param.grad
        if want is None:
            assert not param.requires_grad and grad is None, name
        elif want:
            assert grad is not None, f"{name}: no gradient"
            assert torch.isfinite(grad).all(), f"{name}: non-finite gradient"
            assert grad.abs().sum() > 0, f"{name}: gradient is zero everywhere"
        else:
            assert grad is None or (grad == 0).all(), f"{name}: unexpected gradient"
    mem_v_grad = attn.compress_mem_kv.grad[1]
    assert mem_v_grad.abs().sum() > 0, "memory values are always attended"


# --------------------------------------------------------------------------------------------------
# the seed's grid, verbatim (dim 512, dim_head 64, heads 8, window 2, compress block 4)


@pytest.mark.parametrize("use_diff_topk", (False, True))
@pytest.mark.parametrize("causal", (False, True))
@pytest.mark.parametrize("seq_len", (1, 4, 31, 32, 120))
@pytest.mark.parametrize("kv_heads", (8, 4))
@pytest.mark.parametrize("selection_block_size", (8, 4, 2))
@pytest.mark.parametrize("num_selected_block", (0, 2))
@pytest.mark.parametrize("query_heads_share_selected_kv", (False, True))
@pytest.mark.parametrize("interpolated_importance_score", (False, True))
def test_sparse_attn(use_diff_topk, causal, seq_len, kv_heads, selection_block_size,
                     num_selected_block, query_heads_share_selected_kv,
                     interpolated_importance_score):
    attn = SparseAttention(
        dim=512,
        dim_head=64,
        heads=8,
        kv_heads=kv_heads,
        causal=causal,
        sliding_window_size=2,
        compress_block_size=4,
        selection_block_size=selection_block_size,
        num_selected_blocks=num_selected_block,
        use_diff_topk=use_diff_topk,
        query_heads_share_selected_kv=query_heads_share_selected_kv,
        interpolated_importance_score=interpolated_importance_score,
    )
    check_forward_backward(attn, seq_len)


# --------------------------------------------------------------------------------------------------
# extended: compress block {8, 4} x stride {2, 4} x selection {8, 16, 32} (0.2.3's grid axes) with
# interpolation on and off. Reduced to keep CPU time down: kv_heads 4 only (GQA; MHA is covered by
# the seed grid), and use_diff_topk tied to query_heads_share_selected_kv (both values of each occur).


@pytest.mark.parametrize("causal", (False, True))
@pytest.mark.parametrize("seq_len", (1, 4, 31, 32, 120))
@pytest.mark.parametrize("compress_block_size,stride", [(8, 2), (8, 4), (4, 2), (4, 4)])
@pytest.mark.parametrize("selection_block_size", (8, 16, 32))
@pytest.mark.parametrize("num_selected_block", (0, 2))
@pytest.mark.parametrize("share_and_diff", [(True, False), (False, True)])
@pytest.mark.parametrize("interpolated_importance_score", (False, True))
def test_sparse_attn_strided(causal, seq_len, compress_block_size, stride, selection_block_size,
                             num_selected_block, share_and_diff, interpolated_importance_score):
    share, use_diff_topk = share_and_diff
    attn = SparseAttention(
        dim=512, dim_head=64, heads=8, kv_heads=4, causal=causal, sliding_window_size=2,
        compress_block_size=compress_block_size, compress_block_sliding_stride=stride,
        selection_block_size=selection_block_size, num_selected_blocks=num_selected_block,
        use_diff_topk=use_diff_topk, query_heads_share_selected_kv=share,
        interpolated_importance_score=interpolated_importance_score,
    )
    check_forward_backward(attn, seq_len)


@pytest.mark.parametrize("causal", (False, True))
@pytest.mark.parametrize("selection_block_size,stride", [(3, 4), (6, 4), (5, 2), (12, 8)])
def test_selection_not_multiple_of_stride(causal, selection_block_size, stride):
    """Mapping (c) without interpolation: l' < s or l' not a multiple of s."""
    attn = SparseAttention(dim=64, dim_head=16, heads=4, kv_heads=2, causal=causal,
                           sliding_window_size=3, compress_block_size=8,
                           compress_block_sliding_stride=stride,
                           selection_block_size=selection_block_size, num_selected_blocks=3,
                           use_diff_topk=True)
    check_forward_backward(attn, 45)


def test_no_norm_and_more_memory_rows():
    attn = SparseAttention(dim=64, dim_head=16, heads=4, sliding_window_size=4,
                           compress_block_size=4, selection_block_size=4, num_selected_blocks=2,
                           num_compressed_mem_kv=3, norm=False, causal=True)
    assert "norm.weight" not in attn.state_dict()
    assert attn.compress_mem_kv.shape == (2, 4, 3, 16)
    check_forward_backward(attn, 33)


def test_empty_sequence():
    attn = SparseAttention(dim=64, dim_head=16, heads=4, sliding_window_size=2,
                           compress_block_size=4, selection_block_size=4, num_selected_blocks=2)
    out = attn(torch.randn(2, 0, 64))
    assert out.shape == (2, 0, 64)


@pytest.mark.parametrize("use_triton_kernel", (True, False))
def test_last_paths_cpu_is_reference(use_triton_kernel):
    attn = SparseAttention(dim=64, dim_head=16, heads=4, sliding_window_size=2,
                           compress_block_size=4, selection_block_size=4, num_selected_blocks=2,
                           use_triton_kernel=use_triton_kernel, causal=True)
    attn(torch.randn(1, 20, 64))
    assert attn.last_paths == dict.fromkeys(("compressed", "topk", "selected", "sliding", "combine"), "reference")
    attn.num_selected_blocks = 0  # no selection to make: the top-k is not called
    attn(torch.randn(1, 20, 64))
    assert attn.last_paths["topk"] == "none" and attn.last_paths["selected"] == "reference"


# --------------------------------------------------------------------------------------------------
# the module against the functional reference (reference.nsa_attention on the module's parameters)


@torch.no_grad()
def randomize_zero_init(attn: SparseAttention, seed: int = 0):
    """Memory rows, intra-block positions and the combine gate start at zero: randomize them so that
    every branch reaches the output."""
    gen = torch.Generator().manual_seed(seed)
    for p, std in ((attn.compress_mem_kv, 1.0), (attn.k_intrablock_positions, 0.5),
                   (attn.v_intrablock_positions, 0.5), (attn.to_strategy_combine[0].weight, 0.3),
                   (attn.to_strategy_combine[0].bias, 1.0)):
        p.copy_(torch.randn(p.shape, generator=gen) * std)


def functional_reference(attn: SparseAttention, x: torch.Tensor):
    """(out, parts, v) of reference.nsa_attention on the module's projections and parameters."""
    b, n, _ = x.shape
    H, K, d = attn.heads, attn.kv_heads, attn.dim_head
    l, s = attn.compress_block_size, attn.compress_block_sliding_stride
    hx = attn.norm(x)
    q, k, v = attn.to_qkv(hx).split(attn.qkv_split, dim=-1)
    q, k, v = q.reshape(b, n, H, d), k.reshape(b, n, K, d), v.reshape(b, n, K, d)
    ck = reference.compress(k, attn.k_intrablock_positions, attn.k_compress, l, s)
    cv = reference.compress(v, attn.v_intrablock_positions, attn.v_compress, l, s)
    ck, cv = reference.prepend_memory(ck, cv, attn.compress_mem_kv)
    o, parts = reference.nsa_attention(
        q, k, v, ck, cv, attn.to_strategy_combine[0](hx), freqs=attn.rotary_emb.freqs,
        num_mem=attn.num_mem_compress_kv, compress_block_size=l, stride=s,
        selection_block_size=attn.selection_block_size, num_selected=attn.num_selected_blocks,
        window=attn.sliding_window_size, causal=attn.causal, scale=attn.scale,
        share=attn.query_heads_share_selected_kv, interpolated=attn.interpolated_importance_score,
        use_diff_topk=attn.use_diff_topk, return_parts=True)
    return attn.combine_heads(o.reshape(b, n, H * d)), parts, v


def assert_module_matches(attn: SparseAttention, x: torch.Tensor, want_out: torch.Tensor, want_grads: dict,
                          grad_out: torch.Tensor):
    x = x.detach().requires_grad_()
    out = attn(x)
    params = dict(attn.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad]
    grads = torch.autograd.grad(out, [x] + [params[n] for n in names], grad_out, allow_unused=True)
    torch.testing.assert_close(out, want_out)
    for name, got in zip(["input"] + names, grads):
        want = want_grads[name]
        if got is None or want is None:
            assert (got is None or not got.any()) and (want is None or not want.any()), name
        else:
            torch.testing.assert_close(got, want, msg=name)


def reference_out_and_grads(attn: SparseAttention, x: torch.Tensor, grad_out: torch.Tensor):
    x = x.detach().requires_grad_()
    out, parts, v = functional_reference(attn, x)
    params = dict(attn.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad]
    grads = torch.autograd.grad(out, [x] + [params[n] for n in names], grad_out, allow_unused=True)
    return out.detach(), dict(zip(["input"] + names, grads)), parts, v


@pytest.mark.parametrize("causal", (True, False), ids=("causal", "noncausal"))
@pytest.mark.parametrize("kv_heads,share", [(2, True), (4, False)])
def test_sliding_window_zero_matches_reference(causal, kv_heads, share):
    """sliding_window_size=0 (spec 6: causal keys [i - W, i], non-causal |i - j| <= W; W = 0 is the token
    itself): the module equals the functional reference, output and every gradient, and the sliding
    branch returns each token's own value row."""
    torch.manual_seed(3)
    attn = SparseAttention(dim=64, dim_head=16, heads=4, kv_heads=kv_heads, causal=causal, sliding_window_size=0,
                           compress_block_size=4, compress_block_sliding_stride=2, selection_block_size=4,
                           num_selected_blocks=2, use_diff_topk=True, query_heads_share_selected_kv=share)
    randomize_zero_init(attn)
    x = torch.randn(2, 23, 64)
    grad_out = torch.randn(2, 23, 64)
    want_out, want_grads, parts, v = reference_out_and_grads(attn, x, grad_out)
    torch.testing.assert_close(parts["o_swa"], v.repeat_interleave(4 // kv_heads, dim=2), rtol=0, atol=0)
    assert_module_matches(attn, x, want_out, want_grads, grad_out)
    assert attn.last_paths["sliding"] == "reference"


@pytest.mark.parametrize("dim_head,dtype", [(4, torch.float32), (12, torch.float32), (16, torch.float64)],
                         ids=["d4", "d12", "fp64"])
def test_inputs_outside_the_kernels_run_the_reference(dim_head, dtype):
    """Head dims and dtypes the kernels do not take (and the ops' checks refuse) run the reference on CPU,
    as the module's constructor accepts them: output and gradients equal the functional reference."""
    torch.manual_seed(4)
    attn = SparseAttention(dim=32, dim_head=dim_head, heads=4, kv_heads=2, causal=True, sliding_window_size=3,
                           compress_block_size=4, compress_block_sliding_stride=2, selection_block_size=4,
                           num_selected_blocks=2, use_diff_topk=True).to(dtype)
    randomize_zero_init(attn)
    x, grad_out = torch.randn(2, 21, 32, dtype=dtype), torch.randn(2, 21, 32, dtype=dtype)
    want_out, want_grads, _, _ = reference_out_and_grads(attn, x, grad_out)
    assert_module_matches(attn, x, want_out, want_grads, grad_out)
    assert attn.last_paths == dict.fromkeys(("compressed", "topk", "selected", "sliding", "combine"), "reference")


OP_PATH_CASES = [  # (causal, window, compress l, stride, l', k, share, diff_topk, interpolated)
    (True, 0, 4, 2, 4, 2, True, True, False),     # W = 0, mapping (b)
    (True, 3, 4, 4, 4, 2, False, True, False),    # mapping (a), unshared
    (False, 2, 8, 4, 8, 2, True, False, False),   # non-causal, mapping (b)
    (True, 2, 4, 2, 3, 2, True, True, False),     # mapping (c): the top-k stays on the reference
    (False, 0, 4, 2, 4, 0, True, False, False),   # k = 0: block-diagonal selection
]


@interpreter_lane
@pytest.mark.parametrize("case", OP_PATH_CASES, ids=[f"case{i}" for i in range(len(OP_PATH_CASES))])
def test_op_path_matches_reference_path(case, monkeypatch):
    """The path of CUDA tensors, on CPU: every op routed to its torch.library op (whose CPU kernels are the
    reference forward, lse and closed-form or autograd backward), composed by the module. Output and
    every gradient equal the all-reference path's."""
    causal, window, l, s, sel, k, share, diff, interp = case
    torch.manual_seed(5)
    attn = SparseAttention(dim=64, dim_head=16, heads=4, kv_heads=2, causal=causal, sliding_window_size=window,
                           compress_block_size=l, compress_block_sliding_stride=s, selection_block_size=sel,
                           num_selected_blocks=k, use_diff_topk=diff, query_heads_share_selected_kv=share,
                           interpolated_importance_score=interp)
    randomize_zero_init(attn)
    x, grad_out = torch.randn(2, 29, 64), torch.randn(2, 29, 64)
    want_out, want_grads, _, _ = reference_out_and_grads(attn, x, grad_out)
    from nsa_codegen.kernels import combine, compressed, selected, topk, window as window_ops

    for module in (combine, compressed, selected, topk, window_ops):
        monkeypatch.setattr(module, "route", lambda t, use_kernels=True: "triton" if use_kernels else "reference")
    assert_module_matches(attn, x, want_out, want_grads, grad_out)
    expected = {"compressed": "triton", "selected": "triton", "sliding": "triton", "combine": "triton",
                "topk": "none" if k == 0 else ("reference" if sel % s or sel < s else "triton")}
    assert attn.last_paths == expected
    attn.use_triton_kernel = False
    assert_module_matches(attn, x, want_out, want_grads, grad_out)
    assert set(attn.last_paths.values()) <= {"reference", "none"}


# --------------------------------------------------------------------------------------------------
# state dict layout and initialisation (spec "State dict" and "Constructor")


def test_state_dict_names_shapes_and_init():
    dim, d, H, K, l, M = 96, 16, 6, 2, 8, 2
    attn = SparseAttention(dim=dim, dim_head=d, heads=H, kv_heads=K, sliding_window_size=4,
                           compress_block_size=l, compress_block_sliding_stride=4,
                           selection_block_size=8, num_selected_blocks=2, num_compressed_mem_kv=M,
                           compress_mlp_expand_factor=0.5)
    hidden = int(0.5 * l * d)
    shapes = {
        "norm.weight": (dim,),
        "to_qkv.weight": ((H + 2 * K) * d, dim),
        "compress_mem_kv": (2, K, M, d),
        "k_intrablock_positions": (K, l, d),
        "v_intrablock_positions": (K, l, d),
        "k_compress.1.weight": (hidden, l * d), "k_compress.1.bias": (hidden,),
        "k_compress.3.weight": (d, hidden), "k_compress.3.bias": (d,),
        "v_compress.1.weight": (hidden, l * d), "v_compress.1.bias": (hidden,),
        "v_compress.3.weight": (d, hidden), "v_compress.3.bias": (d,),
        "rotary_emb.freqs": (d // 2,),
        "to_strategy_combine.0.weight": (3 * H, dim),
        "to_strategy_combine.0.bias": (3 * H,),
        "combine_heads.weight": (dim, H * d),
    }
    state = attn.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes
    assert (state["compress_mem_kv"] == 0).all()
    assert (state["k_intrablock_positions"] == 0).all() and (state["v_intrablock_positions"] == 0).all()
    assert (state["to_strategy_combine.0.weight"] == 0).all()
    assert state["to_strategy_combine.0.bias"].tolist() == [-2.0, -2.0, 2.0] * H
    for a, b in zip(attn.k_compress.parameters(), attn.v_compress.parameters()):
        assert torch.equal(a, b)  # phi_v is a deep copy of phi_k
        assert a.data_ptr() != b.data_ptr()
    freqs = 10000.0 ** (-torch.arange(0, d, 2).float() / d)
    torch.testing.assert_close(state["rotary_emb.freqs"], freqs)
    assert not attn.rotary_emb.freqs.requires_grad


# --------------------------------------------------------------------------------------------------
# custom sub-networks


class MeanPoolCompress(nn.Module):
    """A compress_mlp: (b, K, C, l, d) -> (b, K, C, d)."""

    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, windows):
        assert windows.ndim == 5
        return self.proj(windows.mean(dim=-2))


def test_custom_compress_mlp_sequential():
    d, l = 16, 4
    mlp = nn.Sequential(nn.Flatten(start_dim=-2), nn.Linear(l * d, 2 * l * d), nn.SiLU(),
                        nn.Linear(2 * l * d, d))
    attn = SparseAttention(dim=64, dim_head=d, heads=4, kv_heads=2, sliding_window_size=2,
                           compress_block_size=l, compress_block_sliding_stride=2,
                           selection_block_size=4, num_selected_blocks=2, compress_mlp=mlp,
                           causal=True)
    assert attn.k_compress is not mlp and attn.v_compress is not mlp
    assert set(attn.state_dict()) >= {"k_compress.1.weight", "v_compress.3.bias"}
    check_forward_backward(attn, 31)


def test_custom_compress_mlp_module():
    attn = SparseAttention(dim=64, dim_head=16, heads=4, sliding_window_size=2,
                           compress_block_size=4, selection_block_size=8, num_selected_blocks=2,
                           compress_mlp=MeanPoolCompress(16))
    check_forward_backward(attn, 31)


def test_custom_strategy_combine_mlp():
    dim, H = 64, 4
    mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, 3 * H))
    attn = SparseAttention(dim=dim, dim_head=16, heads=H, sliding_window_size=2,
                           compress_block_size=4, selection_block_size=4, num_selected_blocks=2,
                           strategy_combine_mlp=mlp, causal=True)
    assert attn.to_strategy_combine[0] is mlp
    check_forward_backward(attn, 31)


def test_bad_custom_modules_are_reported():
    attn = SparseAttention(dim=64, dim_head=16, heads=4, sliding_window_size=2,
                           compress_block_size=4, selection_block_size=4, num_selected_blocks=2,
                           compress_mlp=nn.Flatten(start_dim=-2))
    with pytest.raises(ValueError, match="compress_mlp"):
        attn(torch.randn(1, 16, 64))
    attn = SparseAttention(dim=64, dim_head=16, heads=4, sliding_window_size=2,
                           compress_block_size=4, selection_block_size=4, num_selected_blocks=2,
                           strategy_combine_mlp=nn.Linear(64, 5))
    with pytest.raises(ValueError, match="strategy_combine_mlp"):
        attn(torch.randn(1, 16, 64))


# --------------------------------------------------------------------------------------------------
# argument validation: ValueError naming the argument


BASE = dict(dim=64, dim_head=16, heads=4, sliding_window_size=2, compress_block_size=4,
            selection_block_size=4, num_selected_blocks=2)

BAD_ARGS = [
    ("dim", 0), ("dim", -3), ("dim", 64.0), ("dim_head", 0), ("dim_head", 15), ("heads", 0),
    ("kv_heads", 3), ("kv_heads", 0), ("kv_heads", 8),
    ("sliding_window_size", -1), ("sliding_window_size", 1.5),
    ("compress_block_size", 0), ("compress_block_size", -4),
    ("compress_block_sliding_stride", 0), ("compress_block_sliding_stride", -2),
    ("compress_block_sliding_stride", 5), ("compress_block_sliding_stride", 2.0),
    ("selection_block_size", 0), ("selection_block_size", -8),
    ("num_selected_blocks", -1), ("num_selected_blocks", True),
    ("num_compressed_mem_kv", 0), ("num_compressed_mem_kv", -1),
    ("compress_mlp_expand_factor", 0.0), ("compress_mlp_expand_factor", -1.0),
    ("compress_mlp_expand_factor", "2"),
    ("compress_mlp", "not-a-module"), ("strategy_combine_mlp", "linear"),
]


@pytest.mark.parametrize("name,value", BAD_ARGS, ids=[f"{n}={v!r}" for n, v in BAD_ARGS])
def test_bad_constructor_argument(name, value):
    with pytest.raises(ValueError, match=name):
        SparseAttention(**{**BASE, name: value})


def test_heads_message_says_what_is_allowed():
    with pytest.raises(ValueError, match=r"heads \(4\) must be divisible by kv_heads \(3\)"):
        SparseAttention(**{**BASE, "kv_heads": 3})
    with pytest.raises(ValueError, match=r"compress_block_sliding_stride \(5\) must be in \[1"):
        SparseAttention(**{**BASE, "compress_block_sliding_stride": 5})


def test_valid_edge_arguments():
    SparseAttention(**{**BASE, "num_selected_blocks": 0})
    SparseAttention(**{**BASE, "sliding_window_size": 0})  # spec 6: the token itself
    SparseAttention(**{**BASE, "compress_block_sliding_stride": 4})
    SparseAttention(**{**BASE, "compress_block_sliding_stride": 1})
    SparseAttention(**{**BASE, "kv_heads": 1})


@pytest.mark.parametrize("shape,match", [((64,), "rank 3"), ((2, 64), "rank 3"),
                                         ((1, 2, 3, 64), "rank 3"), ((2, 5, 63), "dim=64")])
def test_bad_input_shape(shape, match):
    attn = SparseAttention(**BASE)
    with pytest.raises(ValueError, match=f"inp.*{match}"):
        attn(torch.randn(shape))


def test_bad_input_dtype_and_type():
    attn = SparseAttention(**BASE)
    with pytest.raises(ValueError, match="inp dtype must be floating"):
        attn(torch.ones(1, 4, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="inp must be a torch.Tensor"):
        attn([[0.0] * 64])


def test_cache_on_non_causal_module():
    attn = SparseAttention(**BASE, causal=False)
    with pytest.raises(ValueError, match="return_cache.*causal"):
        attn(torch.randn(1, 8, 64), return_cache=True)
    causal = SparseAttention(**BASE, causal=True)
    _, cache = causal(torch.randn(1, 8, 64), return_cache=True)
    with pytest.raises(ValueError, match="cache.*causal"):
        attn(torch.randn(1, 1, 64), cache=cache)


def test_cache_takes_several_tokens_and_names_a_wrong_cache():
    attn = SparseAttention(**BASE, causal=True)
    x = torch.randn(1, 10, 64)
    with torch.no_grad():
        parallel = attn(x)
        out, cache = attn(x[:, :8], return_cache=True)
        two = attn(x[:, 8:], cache=cache)  # two tokens, decoded one position at a time
    torch.testing.assert_close(torch.cat((out, two), 1), parallel, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="cache must be the StaticCache"):
        attn(torch.randn(1, 1, 64), cache=(cache.k, cache.v))
    with pytest.raises(ValueError, match="cache was made for batch 1, inp has batch 3"):
        attn(torch.randn(3, 1, 64), cache=cache)


def test_defaults():
    attn = SparseAttention(**BASE)
    assert attn.kv_heads == attn.heads == 4
    assert attn.compress_block_sliding_stride == attn.compress_block_size == 4
    assert not attn.causal and attn.use_triton_kernel and attn.query_heads_share_selected_kv
    assert attn.num_mem_compress_kv == 1
    # positional order is the seed's (0.0.75): ..., selection_block_size, num_selected_blocks, kv_heads
    positional = SparseAttention(64, 16, 4, 2, 4, 8, 3, 2)
    assert (positional.selection_block_size, positional.num_selected_blocks,
            positional.kv_heads) == (8, 3, 2)


def test_grad_rule_matches_definition():
    """The short cases of the grids really hit both sides of the rule."""
    cases = itertools.product((1, 2, 3, 4, 5, 8, 9), (2, 4), (False, True))
    for n, s, causal in cases:
        C = n // s
        visible = any((w + 1) * s - 1 < i for w in range(C) for i in range(n)) if causal else C > 0
        assert sees_compressed_block(n, s, causal) == visible


# --------------------------------------------------------------------------------------------------
# import weight and the CUDA path


def test_import_registers_ops_but_loads_no_generated_kernel():
    """`import nsa_codegen` registers the torch.ops.nsa ops; generated kernels load on first use."""
    import os
    import subprocess
    import sys

    code = ("import sys, torch, nsa_codegen; assert hasattr(torch.ops.nsa, 'selected_attention'); "
            "loaded = [m for m in sys.modules if m.startswith('nsa_codegen._variants.')]; "
            "assert not loaded, loaded")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("share", (True, False))
def test_cuda_selected_branch_runs_triton(share):
    """On CUDA with use_triton_kernel the selected branch is the generated op; the module output
    stays close to the all-reference path (kernel numerics are tested with the kernels)."""
    torch.manual_seed(0)
    attn = SparseAttention(dim=256, dim_head=64, heads=8, kv_heads=2, causal=True,
                           sliding_window_size=16, compress_block_size=16,
                           compress_block_sliding_stride=8, selection_block_size=16,
                           num_selected_blocks=4, query_heads_share_selected_kv=share).cuda()
    x = torch.randn(2, 300, 256, device="cuda", requires_grad=True)
    out = attn(x)
    assert attn.last_paths["selected"] == "triton" and attn.last_paths["combine"] == "triton"
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    attn.use_triton_kernel = False
    with torch.no_grad():
        ref = attn(x)
    assert attn.last_paths["selected"] == "reference" and attn.last_paths["combine"] == "reference"
    torch.testing.assert_close(out.detach(), ref, atol=1e-2, rtol=1e-2)


def _small_module(**over):
    kw = dict(dim=64, dim_head=16, heads=4, kv_heads=2, causal=True, sliding_window_size=8, compress_block_size=8,
              compress_block_sliding_stride=4, selection_block_size=8, num_selected_blocks=2)
    return SparseAttention(**{**kw, **over})


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_input_dtype_other_than_the_parameters_is_named(dtype):
    attn = _small_module()
    with pytest.raises(ValueError, match=f"inp dtype {dtype} differs from the module's parameters"):
        attn(torch.randn(1, 20, 64).to(dtype))


def test_autocast_input_is_not_a_dtype_mismatch():
    attn = _small_module()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(torch.randn(1, 20, 64))
    assert out.shape == (1, 20, 64)


def test_cache_of_another_dtype_is_named():
    attn = _small_module()
    cache64 = attn.init_cache(1, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="cache is torch.float64 on cpu, but this input projects to torch.float32"):
        attn(torch.randn(1, 1, 64), cache=cache64)
