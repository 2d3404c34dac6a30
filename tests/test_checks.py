"""One set of argument checks on every path, and one selection contract for the reference and the kernels.

Checks: every op body (the triton_op body, which is also its fake / meta implementation, and every CPU
kernel, forward and backward) runs its family's `check_inputs` first, so a bad argument raises the same
error type, naming the argument, through the public function, the plain launchers (the interpreter on
CPU), `torch.ops.nsa.<op>` on CPU tensors and `torch.ops.nsa.<op>` on meta tensors.

Selection contract (nsa-spec section 5): a slot is used iff it is valid, its id lies in
[0, ceil(n / l')) and, when causal, the id is before the query's own block; every other slot is
ignored, by the reference and by the kernels alike (`reference.usable_selection`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from conftest import interpreter_lane as interp
from nsa_codegen import reference
from nsa_codegen.kernels import compressed, selected, topk, window
from test_select_kernels import check, reference_grads, run_kernels

B, N, H, K, D = 2, 8, 4, 2, 16


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------
# the families: valid arguments, and how each lane calls them


@dataclass
class Family:
    name: str
    tensors: Callable[[], dict]  # valid tensor arguments of the forward
    scalars: dict  # valid scalar arguments (public keyword names)
    kv: tuple  # the names of the key-side tensors (batch, heads, device cases)
    op_args: tuple  # torch.ops.nsa.<op> argument order
    saved: Callable[[dict], dict]  # the backward op's extra tensors, from valid forward tensors
    bwd_args: tuple
    public: Callable[[dict], object]
    launch_fwd: Callable[[dict], object]
    launch_bwd: Callable[[dict], object]
    op: str


def _attn_saved(t):
    q = t["q"]
    return dict(out=_randn(*q.shape, seed=5), lse=torch.zeros(q.shape[:3]), dout=_randn(*q.shape, seed=6))


def _window_tensors():
    return dict(q=_randn(B, N, H, D, seed=1), k=_randn(B, N, K, D, seed=2), v=_randn(B, N, K, D, seed=3))


def _cmp_tensors():
    return dict(q=_randn(B, N, H, D, seed=1), ck=_randn(B, 5, K, D, seed=2), cv=_randn(B, 5, K, D, seed=3))


def _sel_tensors():
    own = torch.arange(N) // 4
    idx = torch.zeros(B, N, K, 2, dtype=torch.int64)
    valid = (own > 0)[None, :, None, None].expand(B, N, K, 2).clone()
    valid[..., 1] = False
    return dict(q=_randn(B, N, H, D, seed=1), k=_randn(B, N, K, D, seed=2), v=_randn(B, N, K, D, seed=3),
                block_idx=idx, block_valid=valid, gates=torch.rand(B, N, K, 2))


def _topk_tensors():
    return dict(q=_randn(B, N, H, D, seed=1), ck=_randn(B, 5, K, D, seed=2))


def _topk_saved(t):
    shape = (B, N, K, 2)  # Hs = K (shared), kk = min(num_selected, U = 4) = 2
    return dict(block_idx=torch.stack([torch.zeros(shape[:3]), torch.ones(shape[:3])], -1).to(torch.int32),
                values=torch.rand(shape), lse=torch.zeros(shape[:3]), grad_values=_randn(*shape, seed=7))


def _kw(a, names):
    return {n: a[n] for n in names}


WINDOW = Family(
    "window", _window_tensors, dict(window=2, causal=True, scale=0.25, query_offset=0), ("k", "v"),
    ("q", "k", "v", "window", "causal", "scale", "query_offset"), _attn_saved,
    ("q", "k", "v", "out", "lse", "dout", "window", "causal", "scale", "query_offset"),
    lambda a: window.sliding_window_attention(a["q"], a["k"], a["v"], **_kw(a, WINDOW.scalars)),
    lambda a: window.sliding_window_fwd_launch(a["q"], a["k"], a["v"], **_kw(a, WINDOW.scalars)),
    lambda a: window.sliding_window_bwd_launch(a["q"], a["k"], a["v"], a["out"], a["lse"], a["dout"],
                                               **_kw(a, WINDOW.scalars)),
    "sliding_window_attention",
)
CMP_SCALARS = dict(num_mem=1, block_size=2, stride=2, causal=True, scale=0.25, query_offset=0)
COMPRESSED = Family(
    "compressed", _cmp_tensors, CMP_SCALARS, ("ck", "cv"),
    ("q", "ck", "cv", *CMP_SCALARS), _attn_saved, ("q", "ck", "cv", "out", "lse", "dout", *CMP_SCALARS),
    lambda a: compressed.compressed_attention(a["q"], a["ck"], a["cv"], **_kw(a, CMP_SCALARS)),
    lambda a: compressed.compressed_attention_fwd_launch(a["q"], a["ck"], a["cv"], **_kw(a, CMP_SCALARS)),
    lambda a: compressed.compressed_attention_bwd_launch(a["q"], a["ck"], a["cv"], a["out"], a["lse"], a["dout"],
                                                         **_kw(a, CMP_SCALARS)),
    "compressed_attention",
)
SEL_SCALARS = dict(block_size=4, causal=True, scale=0.25)
SEL_TENSORS = ("q", "k", "v", "block_idx", "block_valid", "gates")
SELECTED = Family(
    "selected", _sel_tensors, dict(SEL_SCALARS, query_offset=0), ("k", "v"),
    (*SEL_TENSORS, *SEL_SCALARS), _attn_saved, (*SEL_TENSORS, "out", "lse", "dout", *SEL_SCALARS),
    lambda a: selected.selected_attention(*(a[n] for n in SEL_TENSORS), **_kw(a, SELECTED.scalars)),
    lambda a: selected.selected_attention_fwd_launch(*(a[n] for n in SEL_TENSORS), **_kw(a, SEL_SCALARS)),
    lambda a: selected.selected_attention_bwd_launch(*(a[n] for n in SEL_TENSORS), a["out"], a["lse"], a["dout"],
                                                     **_kw(a, SEL_SCALARS)),
    "selected_attention",
)
TOPK_SCALARS = dict(num_mem=1, compress_block_size=2, stride=2, selection_block_size=2, num_selected=2, causal=True,
                    share=True, scale=0.25, query_offset=0)
TOPK = Family(
    "topk", _topk_tensors, TOPK_SCALARS, ("ck",),
    ("q", "ck", *TOPK_SCALARS), _topk_saved,
    ("q", "ck", "block_idx", "values", "lse", "grad_values", *TOPK_SCALARS),
    lambda a: topk.select_topk(a["q"], a["ck"], **_kw(a, TOPK_SCALARS)),
    lambda a: topk.select_topk_fwd_launch(a["q"], a["ck"], **_kw(a, TOPK_SCALARS)),
    lambda a: topk.select_topk_bwd_launch(a["q"], a["ck"], a["block_idx"], a["values"], a["lse"], a["grad_values"],
                                          **_kw(a, TOPK_SCALARS)),
    "select_topk",
)
FAMS = {f.name: f for f in (WINDOW, COMPRESSED, SELECTED, TOPK)}


# ----------------------------------------------------------------------------------------------------
# bad arguments: (family, case, change(args, device) -> args, exception, words in the message, backward only)


def _other(dev):
    return "cpu" if dev == "meta" else "meta"


def _move(t, dev):
    """t on `dev` (a meta tensor has no data to copy: a CPU tensor of its shape stands in)."""
    return torch.zeros(t.shape, dtype=t.dtype, device=dev) if t.is_meta else t.to(dev)


def _each_kv(f, fn):
    return lambda a, dev: {**a, **{n: fn(a[n]) for n in f.kv}}


def _tensor_cases(f):
    floats = ("q",) + f.kv
    return [
        (f.name, "q-int", lambda a, dev: {**a, **{n: a[n].long() for n in floats}}, TypeError, ["q dtype", "floating"]),
        (f.name, "q-3d", lambda a, dev: {**a, "q": a["q"][0]}, ValueError, ["q must be 4-D"]),
        (f.name, "kv-batch", _each_kv(f, lambda t: t[:1]), ValueError, [f.kv[0], "shape"]),
        (f.name, "kv-heads", _each_kv(f, lambda t: torch.cat([t, t[:, :, :1]], 2)), ValueError, ["H=4", "K=3"]),
        (f.name, "kv-no-heads", _each_kv(f, lambda t: t[:, :, :0]), ValueError, ["H=4", "K=0"]),
        (f.name, "kv-dtype", _each_kv(f, lambda t: t.half()), TypeError, ["share one dtype"]),
        (f.name, "kv-device", lambda a, dev: {**a, f.kv[0]: _move(a[f.kv[0]], _other(dev))}, ValueError,
         ["one device", f.kv[0]]),
    ]


def _saved_cases(f):
    first = "out" if "out" in f.bwd_args else "values"
    return [
        (f.name, "saved-lse", lambda a, dev: {**a, "lse": a["lse"][:, :-1]}, ValueError, ["lse"]),
        (f.name, f"saved-{first}", lambda a, dev: {**a, first: a[first][:, :-1]}, ValueError, [first]),
        (f.name, "saved-device", lambda a, dev: {**a, first: _move(a[first], _other(dev))}, ValueError,
         ["one device", first]),
    ]


def _set(**over):
    return lambda a, dev: {**a, **over}


CASES = [c for f in FAMS.values() for c in _tensor_cases(f)] + [
    ("window", "window-neg", _set(window=-3), ValueError, ["window"]),
    ("window", "query_offset-neg", _set(query_offset=-1), ValueError, ["query_offset"]),
    ("compressed", "num_mem-0", _set(num_mem=0), ValueError, ["num_mem"]),
    ("compressed", "num_mem-too-many", _set(num_mem=6), ValueError, ["num_mem"]),
    ("compressed", "stride-0", _set(stride=0), ValueError, ["stride"]),
    ("compressed", "stride-gt-block", _set(stride=3), ValueError, ["stride", "block_size"]),
    ("compressed", "block_size-0", _set(block_size=0, stride=1), ValueError, ["block_size"]),
    ("compressed", "query_offset-neg", _set(query_offset=-1), ValueError, ["query_offset"]),
    ("selected", "block_size-0", _set(block_size=0), ValueError, ["block_size"]),
    ("selected", "query_offset-neg", _set(query_offset=-1), ValueError, ["query_offset"]),
    ("selected", "idx-float", lambda a, dev: {**a, "block_idx": a["block_idx"].float()}, TypeError, ["block_idx"]),
    ("selected", "idx-shape", lambda a, dev: {**a, "block_idx": a["block_idx"][:, :, :1]}, ValueError,
     ["block_idx"]),
    ("selected", "valid-dtype", lambda a, dev: {**a, "block_valid": a["block_valid"].to(torch.uint8)}, TypeError,
     ["block_valid"]),
    ("selected", "gates-shape", lambda a, dev: {**a, "gates": a["gates"][..., :1]}, ValueError, ["gates"]),
    ("selected", "idx-device", lambda a, dev: {**a, "block_idx": _move(a["block_idx"], _other(dev))}, ValueError,
     ["one device", "block_idx"]),
    ("topk", "stride-0", _set(stride=0), ValueError, ["stride"]),
    ("topk", "num_mem-neg", _set(num_mem=-1), ValueError, ["num_mem"]),
    ("topk", "num_mem-too-many", _set(num_mem=6), ValueError, ["num_mem"]),
    ("topk", "num_selected-neg", _set(num_selected=-1), ValueError, ["num_selected"]),
    ("topk", "selection_block_size-0", _set(selection_block_size=0), ValueError, ["selection_block_size"]),
    ("topk", "compress_block_size-lt-stride", _set(compress_block_size=1), ValueError, ["compress_block_size"]),
    ("topk", "query_offset-neg", _set(query_offset=-1), ValueError, ["query_offset"]),
    ("topk", "no-tokens", lambda a, dev: {**a, "q": a["q"][:, :0]}, ValueError, ["n >= 1"]),
]
BWD_CASES = [c for f in FAMS.values() for c in _saved_cases(f)]

LANES = ("public", "launcher", "op-cpu", "op-meta")
BWD_LANES = ("launcher-bwd", "op-bwd-cpu", "op-bwd-meta")


def _args(f, change, lane, backward=False):
    dev = "meta" if lane.endswith("meta") else "cpu"
    t = f.tensors()
    if backward:
        t.update(f.saved(t))
    a = {n: (x.to(dev) if isinstance(x, torch.Tensor) else x) for n, x in {**t, **f.scalars}.items()}
    return change(a, dev)


def _call(f, lane, a):
    if lane == "public":
        return f.public(a)
    if lane == "launcher":
        return f.launch_fwd(a)
    if lane == "launcher-bwd":
        return f.launch_bwd(a)
    names = f.bwd_args if "bwd" in lane else f.op_args
    op = getattr(torch.ops.nsa, f.op + ("_backward" if "bwd" in lane else ""))
    return op(*(a[n] for n in names))


def _lanes(f, case, lanes):
    """The lanes that take the changed argument: the ops and launchers of the selected family have no
    query_offset (queries after a cache run on the reference)."""
    if f.name == "selected" and case == "query_offset-neg":
        return ("public",)
    return lanes


def _raises_everywhere(f, case, change, exc, words, lanes, backward=False):
    messages = {}
    for lane in _lanes(f, case, lanes):
        a = _args(f, change, lane, backward)
        with pytest.raises(Exception) as info:
            _call(f, lane, a)
        assert info.type is exc, f"{lane}: {info.type.__name__}: {info.value}"
        for w in words:
            assert w in str(info.value), f"{lane}: {w!r} not in {info.value}"
        messages[lane] = str(info.value)
    return messages


@pytest.mark.parametrize("family,case,change,exc,words", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_argument_raises_the_same_error_on_every_path(family, case, change, exc, words):
    """Public function, plain launcher, torch.ops.nsa.<op> on CPU tensors and on meta tensors: the same
    error type, naming the argument (the forward op), and the backward op / launcher alike."""
    f = FAMS[family]
    _raises_everywhere(f, case, change, exc, words, LANES)
    if case != "query_offset-neg" or f.name != "selected":
        _raises_everywhere(f, case, change, exc, words, BWD_LANES, backward=True)


@pytest.mark.parametrize("family,case,change,exc,words", BWD_CASES, ids=[f"{c[0]}-{c[1]}" for c in BWD_CASES])
def test_bad_saved_tensor_raises_the_same_error_on_every_backward_path(family, case, change, exc, words):
    _raises_everywhere(FAMS[family], case, change, exc, words, BWD_LANES, backward=True)


@pytest.mark.parametrize("family", FAMS)
def test_valid_arguments_pass_on_cpu(family):
    """The table's base arguments are valid: every CPU lane runs them (so each case fails on its change)."""
    f = FAMS[family]
    for lane in ("public", "op-cpu"):
        _call(f, lane, _args(f, lambda a, dev: a, lane))
    _call(f, "op-bwd-cpu", _args(f, lambda a, dev: a, "op-bwd-cpu", backward=True))


def test_raw_ops_no_longer_compute_garbage():
    """The reported failures, one per op: each now raises before computing."""
    q, k, v = _randn(2, 8, 4, 16), _randn(1, 8, 2, 16), _randn(1, 8, 2, 16)  # batch 2 against batch 1
    with pytest.raises(ValueError, match="k/v shape"):
        torch.ops.nsa.sliding_window_attention(q, k, v, 2, True, 0.25, 0)
    k, v = _randn(2, 8, 2, 16), _randn(2, 8, 2, 16)
    with pytest.raises(ValueError, match="window"):
        torch.ops.nsa.sliding_window_attention(q, k, v, -3, True, 0.25, 0)
    with pytest.raises(TypeError, match="floating"):
        torch.ops.nsa.sliding_window_attention(q.long(), k.long(), v.long(), 2, True, 0.25, 0)
    with pytest.raises(ValueError, match="one device"):
        torch.ops.nsa.sliding_window_attention(q, k.to("meta"), v.to("meta"), 2, True, 0.25, 0)
    ck, cv = _randn(2, 5, 2, 16), _randn(2, 5, 2, 16)
    with pytest.raises(ValueError, match="num_mem"):
        torch.ops.nsa.compressed_attention(q, ck, cv, 0, 2, 2, True, 0.25, 0)
    with pytest.raises(ValueError, match="stride"):
        torch.ops.nsa.compressed_attention(q, ck, cv, 1, 2, 4, True, 0.25, 0)
    with pytest.raises(ValueError, match="stride"):
        torch.ops.nsa.select_topk(q, ck, 1, 2, 0, 2, 2, True, True, 0.25, 0)
    with pytest.raises(ValueError, match="query_offset"):
        torch.ops.nsa.select_topk(q, ck, 1, 2, 2, 2, 2, True, True, 0.25, -1)


def test_num_mem_zero_compressed_refuses_topk_accepts():
    """nsa-spec: M >= 1 memory rows (the compressed attention of a query that sees no block is the average of
    the memory values); the top-k reads only the non-memory columns, so M = 0 is a valid top-k input.
    Public function and op agree on both."""
    t = _cmp_tensors()
    for call in (lambda: compressed.compressed_attention(t["q"], t["ck"], t["cv"], **dict(CMP_SCALARS, num_mem=0)),
                 lambda: torch.ops.nsa.compressed_attention(t["q"], t["ck"], t["cv"], 0, 2, 2, True, 0.25, 0)):
        with pytest.raises(ValueError, match="num_mem must be an int >= 1"):
            call()
    kw = dict(TOPK_SCALARS, num_mem=0)
    idx, valid, val = topk.select_topk(t["q"], t["ck"], **kw)
    v2, _, i2, ok2 = torch.ops.nsa.select_topk(t["q"], t["ck"], *kw.values())
    assert torch.equal(idx, i2) and torch.equal(valid, ok2) and torch.equal(val, v2)
    assert idx.shape[-1] == 2  # C = 5 rows, all compressed


def test_topk_op_refuses_mapping_c_on_every_device():
    """The op computes mappings (a) and (b) (the public function runs (c) on the reference)."""
    t = _topk_tensors()
    for dev in ("cpu", "meta"):
        args = (t["q"].to(dev), t["ck"].to(dev), 1, 3, 3, 2, 2, True, True, 0.25, 0)  # l' = 2 < s = 3: (c)
        with pytest.raises(ValueError, match="mapping"):
            torch.ops.nsa.select_topk(*args)


def test_scalar_checks_take_symbolic_sizes():
    """Under torch.compile(dynamic=True) the ops' integer arguments (SymInt in their schemas) reach the
    fake implementation, and so the checks, as symbolic ints."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()

    def sym(name, value):
        return env.create_symintnode(env.create_symbol(value, source=ConstantSource(name)), hint=value)

    t = _window_tensors()
    window.check_inputs(t["q"], t["k"], t["v"], sym("w", 3), True, 0.25, sym("off", 5))
    c = _cmp_tensors()
    compressed.check_inputs(c["q"], c["ck"], c["cv"], sym("m", 1), 2, 2, True, 0.25, sym("off2", 0))


# ----------------------------------------------------------------------------------------------------
# the selection contract


def test_usable_selection_rule():
    """Valid, 0 <= id < ceil(n / l'), and when causal before the own block (query_offset + i) // l'."""
    idx = torch.tensor([-1, 0, 1, 2, 3, 4]).expand(1, 6, 1, 6)  # n = 10 keys, l' = 4: blocks 0, 1, 2
    valid = torch.ones(1, 6, 1, 6, dtype=torch.bool)
    valid[0, :, 0, 1] = False  # block 0 marked invalid everywhere
    noncausal = reference.usable_selection(idx, valid, 10, 4, False)
    assert noncausal[0, :, 0].tolist() == [[False, False, True, True, False, False]] * 6
    causal = reference.usable_selection(idx, valid, 10, 4, True, query_offset=3)  # positions 3 .. 8: own 0, 1, 2
    expect_by_own = {0: [False] * 6, 1: [False] * 6, 2: [False, False, True, False, False, False]}
    for i in range(6):
        assert causal[0, i, 0].tolist() == expect_by_own[(3 + i) // 4], i


def _out_of_contract(b, n, hs, block_size, seed):
    """Per (token, row): the ids -1, -3 (negative), nblk, nblk + 2 (past the end) and up to 4 distinct random
    blocks (own and later ones included: future ids when causal), in random slot order, ~90% valid."""
    gen = torch.Generator().manual_seed(seed)
    nblk = -(-n // block_size)
    take = min(nblk, 4)
    rand = torch.rand(b, n, hs, nblk, generator=gen).argsort(-1)[..., :take]
    extra = torch.tensor([-1, -3, nblk, nblk + 2]).expand(b, n, hs, 4)
    idx = torch.cat([extra, rand], -1)
    idx = idx.gather(-1, torch.rand(idx.shape, generator=gen).argsort(-1))
    valid = torch.rand(idx.shape, generator=gen) < 0.9
    return idx, valid


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("query_offset,nq", [(0, 19), (6, 5), (18, 1)])
def test_reference_ignores_out_of_contract_slots(causal, query_offset, nq):
    """The reference on a selection with negative, past-the-end, own-block and future ids equals the
    reference on the same selection with those slots invalid: they are ignored (not clamped), forward
    and gradients (gates included)."""
    n, l, hs = 19, 4, 2
    idx, valid = _out_of_contract(1, nq, hs, l, seed=nq + query_offset)
    q, k, v = _randn(1, nq, 4, 16, seed=1), _randn(1, n, 2, 16, seed=2), _randn(1, n, 2, 16, seed=3)
    g = torch.rand(idx.shape, generator=torch.Generator().manual_seed(4)) + 0.5
    usable = reference.usable_selection(idx, valid, n, l, causal, query_offset)
    assert (valid & ~usable).any()  # the selection holds ignored valid slots
    kw = dict(block_size=l, causal=causal, scale=0.25, query_offset=query_offset)
    dout = _randn(1, nq, 4, 16, seed=9)
    res = []
    for sel_idx, sel_valid in ((idx, valid), (idx.masked_fill(~usable, 0), usable)):
        qq, kk_, vv, gg = (t.detach().clone().requires_grad_() for t in (q, k, v, g))
        out = reference.selected_attention(qq, kk_, vv, sel_idx, sel_valid, gg, **kw)
        lse = reference.selected_attention_lse(qq, kk_, sel_idx, sel_valid, gg, **kw)
        grads = torch.autograd.grad(out, (qq, kk_, vv, gg), dout, allow_unused=True)
        res.append((out, lse, *[x if x is not None else torch.zeros_like(t) for x, t in zip(grads, (q, k, v, g))]))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dgates"), *res):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


# (H, K, l', shared): the three program layouts of the selected kernels
LAYOUTS = [
    (16, 1, 16, True),   # one token per program, a key tile per slot
    (16, 1, 8, True),    # one token per program, gathered small blocks
    (4, 2, 16, True),    # several tokens per program (G = 2), the tile's distinct blocks
    (4, 2, 8, False),    # unshared selection, several tokens per program
]


@interp
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("h,kh,block_size,shared", LAYOUTS,
                         ids=[f"H{c[0]}_K{c[1]}_bs{c[2]}_{'shared' if c[3] else 'unshared'}" for c in LAYOUTS])
def test_kernels_and_reference_ignore_the_same_slots(h, kh, block_size, shared, causal):
    """Interpreter launchers against the reference (fp32) on selections holding negative, past-the-end and
    (causal) own-block and future ids: out, lse, dq, dk, dv, dgates."""
    n, d = 37 if block_size == 16 else 29, 16
    hs = kh if shared else h
    idx, valid = _out_of_contract(1, n, hs, block_size, seed=block_size + h)
    gen = torch.Generator().manual_seed(h * block_size)
    inp = dict(q=torch.randn(1, n, h, d, generator=gen), k=torch.randn(1, n, kh, d, generator=gen),
               v=torch.randn(1, n, kh, d, generator=gen), block_idx=idx, block_valid=valid,
               gates=0.5 + torch.rand(idx.shape, generator=gen))
    usable = reference.usable_selection(idx, valid, n, block_size, causal)
    assert (valid & ~usable).any()
    dout = torch.randn(1, n, h, d, generator=gen)
    kw = dict(block_size=block_size, causal=causal, scale=d ** -0.5)
    check(run_kernels(inp, dout, **kw), reference_grads(inp, dout, **kw, dtype=torch.float32), rel=1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_dkv_schedule_holds_exactly_the_usable_slots(causal):
    n, l, hs = 29, 8, 2
    idx, valid = _out_of_contract(2, n, hs, l, seed=3)
    usable = reference.usable_selection(idx, valid, n, l, causal)
    kk = idx.shape[-1]
    entries, segments = selected.dkv_schedule(idx, valid, n, l, causal, 4)
    for bh in range(2 * hs):
        bi, h = divmod(bh, hs)
        seen = set()
        for blk, start, end, _ in segments[bh].tolist():
            if blk >= 0:
                seen |= {(blk, *divmod(e, kk)) for e in entries[bh, start:end].tolist()}
        want = {(int(idx[bi, t, h, s]), t, s) for t in range(n) for s in range(kk) if usable[bi, t, h, s]}
        assert seen == want


MAPPINGS = [  # (stride, selection block size, interpolated): mappings (a), (b), (c), (c) interpolated
    (4, 4, False), (2, 8, False), (4, 6, False), (2, 8, True),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("stride,sel,interp_", MAPPINGS, ids=["a", "b", "c", "c-interp"])
@pytest.mark.parametrize("query_offset,nq", [(0, 45), (44, 1), (30, 15)])
def test_select_blocks_never_makes_ignored_slots(stride, sel, interp_, causal, query_offset, nq):
    """The module's selections (select_blocks, and block_diagonal_selection for 5b) are inside the contract:
    every valid slot is usable, so the module's numbers do not depend on how ignored slots are treated."""
    n = query_offset + nq
    C = n // stride
    imp = _randn(2, nq, 3, C, seed=nq + sel)
    vis = reference.compressed_visibility(nq, C, stride, causal, query_offset=query_offset)
    imp = imp.masked_fill(~vis[None, :, None, :], reference.masked_value(imp.dtype))
    idx, valid, _ = reference.select_blocks(imp, seq_len=n, stride=stride, compress_block_size=stride,
                                            selection_block_size=sel, num_selected=3, causal=causal,
                                            interpolated=interp_, query_offset=query_offset)
    assert valid.any()
    assert torch.equal(reference.usable_selection(idx, valid, n, sel, causal, query_offset), valid)
    if not causal:
        idx, valid = reference.block_diagonal_selection(2, nq, 3, sel, query_offset=query_offset)
        assert torch.equal(reference.usable_selection(idx, valid, n, sel, causal, query_offset), valid)


def test_select_topk_never_makes_ignored_slots():
    """The same for the fused top-k the module calls (reference path; the kernels match it elsewhere)."""
    q, ck = _randn(1, 40, 4, 16, seed=1), _randn(1, 1 + 10, 2, 16, seed=2)
    for causal in (True, False):
        kw = dict(num_mem=1, compress_block_size=4, stride=4, selection_block_size=8, num_selected=3,
                  causal=causal, share=True, scale=0.25)
        idx, valid, _ = topk.select_topk(q, ck, **kw)
        assert valid.any()
        assert torch.equal(reference.usable_selection(idx, valid, 40, 8, causal), valid)
