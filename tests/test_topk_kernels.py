"""Fused importance + top-k selection kernels (templates/topk_{fwd,bwd}.py.j2, nsa_codegen/kernels/topk.py)
against the reference (reference.select_topk: compressed_attention logits + importance_scores +
select_blocks).

Interpreter lane (default, CPU, TRITON_INTERPRET=1): fp32 (and one fp16 case), small shapes: n in
{1, 31, 77}, C up to 38, G in {1, 2, 4, 16}, shared / unshared, causal / non-causal, mapping (a)
(R = l'/s = 1) and (b) (R in {2, 4}), k in {0, 1, 3, more than the candidates}. GPU lane
(`pytest -m gpu`, bf16 / fp16): the numerics rule (conftest.py) against the fp32 reference. Kernel
outputs are poisoned (conftest.py) before the launch, so an unwritten element fails the comparison.

How selections are compared (ties may break differently from torch.topk): per (b, i, row)
  - values, sorted descending as both sides emit them, agree within `tol` slot by slot;
  - every kernel index is a distinct candidate whose *reference* probability equals the kernel's value
    at that slot within `tol`, and is at least the reference's kk-th value minus `tol` (so a different
    index is only accepted for a near-tie);
  - valid == (values > 1e-10); and where the reference value is clear of the 1e-10 threshold by `tol`,
    the kernel's validity agrees with it.
Gradients (use_diff_topk): the reference's full probability vector (select_blocks with every candidate)
gathered at the *kernel's* indices gives the oracle of sum(g * values); its gradient w.r.t. q and ck
is compared with the kernel's backward. In fp32 the kernel's sets also equal the reference's exactly.
"""
from __future__ import annotations

import os

import pytest
import torch

from conftest import CUDA, assert_numerics, tolerance
from nsa_codegen import reference
from nsa_codegen.codegen.render import render
from nsa_codegen.codegen.spec import VariantSpec
from nsa_codegen.kernels import topk

SMALL = {"BLOCK_M": 16, "BLOCK_U": 16, "num_warps": 4, "num_stages": 1}


# ----------------------------------------------------------------------------------------------------
# helpers


def make_inputs(b, n, H, K, d, M, s, dtype=torch.float32, device="cpu", seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    C = n // s
    q = torch.randn(b, n, H, d, generator=gen).to(device=device, dtype=dtype)
    ck = torch.randn(b, M + C, K, d, generator=gen).to(device=device, dtype=dtype)
    return q.requires_grad_(grad), ck.requires_grad_(grad)


def kwargs_for(M, s, lsel, k, causal, share, d, l=None):
    return dict(num_mem=M, compress_block_size=l or s, stride=s, selection_block_size=lsel, num_selected=k,
                causal=causal, share=share, scale=d ** -0.5)


def full_reference_p(q, ck, kw):
    """Reference probabilities of every candidate, dense (b, n, Hs, U), differentiable."""
    U = topk.check_inputs(q, ck, **kw)["U"]
    kw_all = dict(kw, num_selected=max(U, 1))
    idx, _, val = reference.select_topk(q, ck, **kw_all)
    if idx.shape[-1] == 0:
        return val
    return torch.zeros_like(val).scatter(-1, idx, val)


def check_selection(idx, valid, val, ref_idx, ref_val, p_full, tol):
    """The near-tie-aware comparison described in the module docstring."""
    assert idx.shape == ref_idx.shape == val.shape == valid.shape, (idx.shape, ref_idx.shape)
    assert idx.dtype == torch.int32 and val.dtype == torch.float32 and valid.dtype == torch.bool
    kk = idx.shape[-1]
    if kk == 0:
        return
    assert torch.isfinite(val).all(), "non-finite (unwritten?) values"
    ref_val = ref_val.float()
    err = (val - ref_val).abs().max().item()
    assert err <= tol, f"sorted values differ by {err:.3e} > {tol:.3e}"
    assert (val[..., 1:] <= val[..., :-1]).all(), "values not in descending order"
    U = p_full.shape[-1]
    il = idx.long()
    assert ((il >= 0) & (il < U)).all(), f"index out of [0, {U})"
    srt = il.sort(-1).values
    assert (srt[..., 1:] != srt[..., :-1]).all(), "repeated block in a row"
    p_at = p_full.float().gather(-1, il)
    gap = (p_at - val).abs().max().item()
    assert gap <= tol, f"kernel value differs from the reference probability of its block by {gap:.3e}"
    kth = ref_val[..., -1:]
    short = (p_at < kth - tol)
    assert not short.any(), f"{int(short.sum())} selected blocks are clearly outside the reference's top-k"
    assert torch.equal(valid, val > reference.VALID_THRESHOLD)
    clear = (ref_val - reference.VALID_THRESHOLD).abs() > tol
    assert torch.equal(valid[clear], (ref_val > reference.VALID_THRESHOLD)[clear])


def grad_oracle(q, ck, kw, idx, g):
    """d/d(q, ck) of sum(g * p_ref[idx]) through the reference."""
    qq, cc = q.detach().clone().requires_grad_(), ck.detach().clone().requires_grad_()
    p = full_reference_p(qq, cc, kw)
    vals = p.gather(-1, idx.long())
    dq, dck = torch.autograd.grad(vals, (qq, cc), g.to(vals.dtype), allow_unused=True)
    return (torch.zeros_like(qq) if dq is None else dq), (torch.zeros_like(cc) if dck is None else dck)


def lse_kwargs(kw):
    """The arguments of reference.select_topk_lse among select_topk's."""
    return {k: kw[k] for k in ("num_mem", "stride", "selection_block_size", "causal", "share", "scale")}


# ----------------------------------------------------------------------------------------------------
# interpreter lane: forward


# (b, n, H, K, d, M, s, l', k, causal, share): mapping (a) when l' == s, (b) when l' = R * s
FORWARD_CASES = [
    # mapping (a)
    (1, 77, 4, 2, 16, 1, 2, 2, 3, True, True),
    (2, 77, 4, 2, 16, 2, 2, 2, 3, False, True),
    (1, 77, 4, 1, 16, 1, 2, 2, 1, True, False),
    (1, 31, 2, 2, 16, 1, 1, 1, 40, True, True),  # k > C = 31: every candidate, invisible ones in index order
    (1, 31, 2, 2, 16, 1, 1, 1, 40, False, False),
    (1, 77, 16, 1, 32, 1, 4, 4, 3, True, True),  # G = 16 shared
    (1, 77, 16, 1, 32, 1, 4, 4, 3, False, False),
    (1, 1, 2, 1, 16, 1, 1, 1, 3, True, True),  # n = 1: one candidate, invisible
    (1, 1, 2, 1, 16, 1, 1, 1, 3, False, False),
    # mapping (b), R = 2 and 4
    (1, 77, 4, 2, 16, 1, 2, 4, 3, True, True),
    (2, 77, 4, 2, 16, 2, 2, 4, 3, False, True),
    (1, 77, 8, 2, 16, 1, 2, 8, 3, True, False),  # unshared under GQA (G = 4)
    (1, 77, 8, 2, 16, 1, 2, 8, 100, False, False),  # k > U = 9: own block last, probability 0
    (1, 77, 8, 4, 16, 1, 2, 8, 100, True, True),  # k > U, causal
    (1, 31, 16, 1, 16, 1, 1, 4, 1, True, True),  # G = 16, k = 1
    (1, 31, 4, 4, 16, 3, 1, 2, 3, False, True),  # G = 1 shared, 3 memory rows
    (1, 77, 2, 1, 16, 1, 4, 16, 2, True, False),  # R = 4, U = 4
    # k = 0, C == 0 and #candidates == 0: kk = 0, no launch
    (1, 31, 4, 2, 16, 1, 2, 4, 0, True, True),
    (1, 1, 4, 2, 16, 1, 2, 2, 3, True, True),
    (1, 7, 4, 2, 16, 1, 2, 8, 3, False, True),
]


def _case_id(c):
    b, n, H, K, d, M, s, lsel, k, causal, share = c
    return f"b{b}n{n}H{H}K{K}s{s}l{lsel}k{k}{'C' if causal else 'N'}{'S' if share else 'U'}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("case", FORWARD_CASES, ids=_case_id)
def test_forward_matches_reference(case, poison):
    b, n, H, K, d, M, s, lsel, k, causal, share = case
    q, ck = make_inputs(b, n, H, K, d, M, s, seed=hash(case) % 1000)
    kw = kwargs_for(M, s, lsel, k, causal, share, d)
    idx, valid, val, lse = topk.select_topk_fwd_launch(q, ck, **kw)
    ref_idx, ref_valid, ref_val = reference.select_topk(q, ck, **kw)
    check_selection(idx, valid, val, ref_idx, ref_val, full_reference_p(q, ck, kw), tol=1e-6)
    # fp32, random data: no near-ties, so the sets and even the order are the reference's
    assert torch.equal(idx.long(), ref_idx) and torch.equal(valid, ref_valid)
    if idx.shape[-1]:
        ref_lse = reference.select_topk_lse(q, ck, **lse_kwargs(kw))
        assert (lse - ref_lse).abs().max().item() <= 1e-5


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("R", [1, 4])
def test_forward_streams_over_tiles(causal, R, poison):
    """16 x 16 tiles: several query tiles and candidate tiles per program, merges across tiles."""
    s = 1 if R == 1 else 2
    q, ck = make_inputs(1, 77, 4, 2, 16, 1, s, seed=R + 10 * causal)
    kw = kwargs_for(1, s, R * s, 5, causal, True, 16)
    idx, valid, val, _ = topk.select_topk_fwd_launch(q, ck, **kw, config=SMALL)
    ref_idx, ref_valid, ref_val = reference.select_topk(q, ck, **kw)
    check_selection(idx, valid, val, ref_idx, ref_val, full_reference_p(q, ck, kw), tol=1e-6)
    assert torch.equal(idx.long(), ref_idx) and torch.equal(valid, ref_valid)


def test_forward_ties_break_toward_lower_index(poison):
    """Duplicated compressed keys give exactly equal scores: the lower block index comes first."""
    q, ck = make_inputs(1, 31, 2, 1, 16, 1, 1, seed=3)
    ck = ck.clone()
    ck[:, 1 + 16:] = ck[:, 1:16]  # blocks 16.. repeat blocks 0..14
    kw = kwargs_for(1, 1, 1, 6, False, True, 16)
    idx, valid, val, _ = topk.select_topk_fwd_launch(q, ck, **kw, config=SMALL)
    ref_idx, ref_valid, ref_val = reference.select_topk(q, ck, **kw)
    assert torch.equal(idx.long(), ref_idx)
    assert (val - ref_val).abs().max() <= 1e-6


def test_forward_fp16_numerics_rule(poison):
    b, n, H, K, d, M, s, lsel, k = 1, 77, 8, 2, 32, 1, 2, 4, 4
    for causal, share in ((True, True), (False, False)):
        q, ck = make_inputs(b, n, H, K, d, M, s, dtype=torch.float16, seed=5)
        kw = kwargs_for(M, s, lsel, k, causal, share, d)
        idx, valid, val, _ = topk.select_topk_fwd_launch(q, ck, **kw)
        q32, ck32 = q.float(), ck.float()
        ref_idx, _, ref_val = reference.select_topk(q32, ck32, **kw)
        _, _, low_val = reference.select_topk(q, ck, **kw)
        check_selection(idx, valid, val, ref_idx, ref_val, full_reference_p(q32, ck32, kw), tolerance(ref_val, low_val))


@pytest.mark.parametrize("lsel", [2, 8])
def test_forward_query_offset_matches_full_sequence(lsel, poison):
    """Decoding: the last token alone at query_offset = n - 1 selects what row n - 1 of the full causal
    sequence selects (length-causality of (a) and (b))."""
    q, ck = make_inputs(1, 77, 4, 2, 16, 1, 2, seed=lsel)
    kw = kwargs_for(1, 2, lsel, 3, True, True, 16)
    full_idx, full_valid, full_val = reference.select_topk(q, ck, **kw)
    for p in (76, 40):
        C = (p + 1) // 2  # compressed blocks that exist after p + 1 tokens
        idx, valid, val, _ = topk.select_topk_fwd_launch(q[:, p:p + 1], ck[:, :1 + C], **kw, query_offset=p)
        ref_idx, _, ref_val = reference.select_topk(q[:, p:p + 1], ck[:, :1 + C], **kw, query_offset=p)
        assert torch.equal(idx.long(), ref_idx) and (val - ref_val).abs().max() <= 1e-6
        if idx.shape[-1] == full_idx.shape[-1]:
            assert torch.equal(idx.long(), full_idx[:, p:p + 1]) and (val - full_val[:, p:p + 1]).abs().max() <= 1e-6


# ----------------------------------------------------------------------------------------------------
# interpreter lane: gradients (use_diff_topk)


GRAD_CASES = [
    (1, 77, 4, 2, 16, 1, 2, 2, 3, True, True),
    (1, 77, 4, 2, 16, 2, 2, 2, 3, False, False),
    (1, 77, 8, 2, 16, 1, 2, 8, 3, True, False),
    (1, 77, 4, 2, 16, 1, 2, 4, 100, False, True),  # every candidate selected, own block included
    (1, 31, 16, 1, 16, 1, 1, 2, 3, True, True),
    (2, 31, 2, 2, 16, 1, 1, 4, 1, False, True),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=_case_id)
def test_gradients_match_reference(case, poison):
    b, n, H, K, d, M, s, lsel, k, causal, share = case
    q, ck = make_inputs(b, n, H, K, d, M, s, seed=hash(case) % 1000, grad=True)
    kw = kwargs_for(M, s, lsel, k, causal, share, d)
    idx, valid, val = topk.select_topk_launch(q, ck, **kw)
    g = torch.randn_like(val)
    dq, dck = torch.autograd.grad(val, (q, ck), g)
    ref_idx, _, ref_val = reference.select_topk(q, ck, **kw)
    rdq, rdck = torch.autograd.grad(ref_val, (q, ck), g)  # sets are equal in fp32 (checked)
    assert torch.equal(idx.long(), ref_idx)
    assert torch.isfinite(dq).all() and torch.isfinite(dck).all()
    assert_numerics("dq", dq, rdq)
    assert_numerics("dck", dck, rdck)
    assert (dck[:, :M] == 0).all()  # memory rows never enter the selection


@pytest.mark.parametrize("causal", [True, False])
def test_gradients_stream_over_tiles(causal, poison):
    q, ck = make_inputs(1, 77, 4, 2, 16, 1, 2, seed=21 + causal, grad=True)
    kw = kwargs_for(1, 2, 4, 5, causal, False, 16)
    idx, valid, val = topk.select_topk_launch(q, ck, **kw, config=SMALL)
    g = torch.randn_like(val)
    dq, dck = torch.autograd.grad(val, (q, ck), g)
    rdq, rdck = grad_oracle(q, ck, kw, idx, g)
    assert_numerics("dq", dq, rdq)
    assert_numerics("dck", dck, rdck)


def test_gradients_fp16_numerics_rule(poison):
    b, n, H, K, d, M, s, lsel, k = 1, 77, 4, 2, 32, 1, 2, 4, 3
    q, ck = make_inputs(b, n, H, K, d, M, s, dtype=torch.float16, seed=8, grad=True)
    kw = kwargs_for(M, s, lsel, k, True, True, d)
    idx, valid, val = topk.select_topk_launch(q, ck, **kw)
    g = torch.randn_like(val)
    dq, dck = torch.autograd.grad(val, (q, ck), g)
    rdq, rdck = grad_oracle(q.float(), ck.float(), kw, idx, g)
    ldq, ldck = grad_oracle(q, ck, kw, idx, g)
    for name, got, ref, low in (("dq", dq, rdq, ldq), ("dck", dck, rdck, ldck)):
        assert_numerics(name, got, ref, low)


def test_backward_poisoned_outputs_written(poison):
    q, ck = make_inputs(1, 31, 4, 2, 16, 1, 1, seed=2)
    kw = kwargs_for(1, 1, 2, 3, True, True, 16)
    idx, valid, val, lse = topk.select_topk_fwd_launch(q, ck, **kw)
    dq, dck = topk.select_topk_bwd_launch(q, ck, idx, val, lse, torch.randn_like(val), **kw)
    assert torch.isfinite(dq).all() and torch.isfinite(dck).all()


# ----------------------------------------------------------------------------------------------------
# routing, validation, op registration, rendering (no kernel launch)


def test_routing_is_explicit(monkeypatch):
    """select_topk records the path it took in paths["topk"]: the reference on CPU tensors and with
    use_kernels=False; the kernels where `route` says so (CUDA tensors) for mappings (a) and (b) only."""
    q, ck = make_inputs(1, 16, 2, 1, 16, 1, 2)
    base = kwargs_for(1, 2, 4, 2, True, True, 16)
    for use_kernels in (True, False):
        paths = {}
        topk.select_topk(q, ck, **base, use_kernels=use_kernels, paths=paths)
        assert paths == {"topk": "reference"}
    # as on CUDA: `route` answers "triton" (on CPU tensors the op then runs its CPU kernel, the reference)
    asked = []
    monkeypatch.setattr(topk, "route", lambda x, use_kernels=True: asked.append(use_kernels) or "triton")
    paths = {}
    got = topk.select_topk(q, ck, **base, use_kernels=True, paths=paths)
    assert paths == {"topk": "triton"} and asked == [True]
    want = reference.select_topk(q, ck, **base)
    assert torch.equal(got[0].long(), want[0]) and torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    # mapping (c) never reaches the kernels, whatever the device
    for lsel, interp in ((1, False), (3, False), (4, True)):
        paths = {}
        topk.select_topk(q, ck, **dict(base, selection_block_size=lsel), interpolated=interp, paths=paths)
        assert paths == {"topk": "reference"}
        info = topk.check_inputs(q, ck, **dict(base, selection_block_size=lsel), interpolated=interp)
        assert info["mapping"] == "c"
        with pytest.raises(ValueError, match="mapping \\(c\\)"):
            topk._check_kernel_mapping(info)
    with pytest.raises(ValueError, match="mapping \\(c\\)"):
        topk.select_topk_fwd_launch(q, ck, **dict(base, selection_block_size=3))
    # (a) with interpolation is still (a)
    assert topk.check_inputs(q, ck, **dict(base, selection_block_size=2), interpolated=True)["mapping"] == "a"


def test_public_select_topk_on_cpu_is_the_reference():
    q, ck = make_inputs(1, 31, 4, 2, 16, 1, 2, grad=True)
    for lsel, interp in ((4, False), (3, False), (4, True)):
        kw = kwargs_for(1, 2, lsel, 3, True, True, 16)
        got = topk.select_topk(q, ck, **kw, interpolated=interp)
        want = reference.select_topk(q, ck, **kw, interpolated=interp)
        assert got[0].dtype == torch.int32 and torch.equal(got[0].long(), want[0])
        for a, b_ in zip(got[1:], want[1:]):
            assert torch.equal(a, b_)
    assert got[2].requires_grad


def test_cpu_op_kernel_is_the_reference():
    q, ck = make_inputs(1, 31, 4, 2, 16, 1, 2, seed=4)
    kw = kwargs_for(1, 2, 4, 3, True, True, 16)
    val, lse, idx, valid = torch.ops.nsa.select_topk(q, ck, 1, 2, 2, 4, 3, True, True, kw["scale"], 0)
    ri, rv, rval = reference.select_topk(q, ck, **kw)
    assert idx.dtype == torch.int32 and torch.equal(idx.long(), ri) and torch.equal(valid, rv)
    assert torch.equal(val, rval)
    assert lse.shape == (1, 31, 2) and torch.isfinite(lse).all()
    # autograd through the op's CPU kernels equals the reference's
    qg, cg = q.clone().requires_grad_(), ck.clone().requires_grad_()
    v, _, _, _ = torch.ops.nsa.select_topk(qg, cg, 1, 2, 2, 4, 3, True, True, kw["scale"], 0)
    g = torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
    dq, dck = torch.autograd.grad(v, (qg, cg), g)
    rq, rc = q.clone().requires_grad_(), ck.clone().requires_grad_()
    _, _, rv2 = reference.select_topk(rq, rc, **kw)
    rdq, rdck = torch.autograd.grad(rv2, (rq, rc), g)
    assert_numerics("dq", dq, rdq, rel=1e-5)
    assert_numerics("dck", dck, rdck, rel=1e-5)


def test_op_outputs_float_first_for_opcheck():
    """Regression (H200 opcheck, test_aot_dispatch_dynamic: "result type Float can't be cast to the desired
    output type Long"): opcheck sums the op's outputs in order into `sm = 0` with `+=`, so the first output
    must be floating. Replays that summation on the CPU kernel's outputs, then its backward."""
    q, ck = make_inputs(1, 31, 4, 2, 16, 1, 2, seed=5, grad=True)
    outs = torch.ops.nsa.select_topk(q, ck, 1, 2, 2, 4, 3, True, True, 16 ** -0.5, 0)
    assert [o.dtype for o in outs] == [torch.float32, torch.float32, torch.int32, torch.bool]
    assert topk.OP_OUTPUTS == ("values", "lse", "block_idx", "block_valid")
    sm = 0
    for o in outs:
        sm += o.sum().abs()
    dq, dck = torch.autograd.grad(sm, (q, ck))
    assert torch.isfinite(dq).all() and torch.isfinite(dck).all() and dq.abs().sum() > 0


def test_opcheck_without_a_gpu():
    """torch.library.opcheck's schema, autograd-registration and fake-tensor checks, in a subprocess without
    the interpreter (under TRITON_INTERPRET=1 fake tensors would reach the interpreter). The AOT-dispatch
    check needs a GPU driver to trace the Triton kernel: the GPU lane runs it (test_gpu_opcheck_and_compile)."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from nsa_codegen.kernels import topk  # registers the ops\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q = torch.randn(1, 64, 8, 16, generator=g).requires_grad_()\n"
        "ck = torch.randn(1, 5, 2, 16, generator=g).requires_grad_()\n"
        "args = (q, ck, 1, 32, 16, 32, 4, True, True, 0.25, 0)\n"
        "utils = ('test_schema', 'test_autograd_registration', 'test_faketensor')\n"
        "torch.library.opcheck(torch.ops.nsa.select_topk.default, args, test_utils=utils)\n"
        "val, lse, idx, _ = torch.ops.nsa.select_topk(*args)\n"
        "bargs = (q.detach(), ck.detach(), idx, val.detach(), lse, torch.randn_like(val)) + args[2:]\n"
        "torch.library.opcheck(torch.ops.nsa.select_topk_backward.default, bargs, test_utils=utils)\n"
        "print('opcheck ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "opcheck ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize(
    "change, word",
    [
        (dict(num_mem=-1), "num_mem"),
        (dict(num_mem=99), "num_mem"),
        (dict(stride=0), "stride"),
        (dict(compress_block_size=1), "compress_block_size"),
        (dict(selection_block_size=0), "selection_block_size"),
        (dict(num_selected=-1), "num_selected"),
        (dict(causal=1), "causal"),
        (dict(share="yes"), "share"),
        (dict(scale=None), "scale"),
        (dict(query_offset=-2), "query_offset"),
    ],
)
def test_validation_names_the_argument(change, word):
    q, ck = make_inputs(1, 16, 4, 2, 16, 1, 2)
    kw = dict(kwargs_for(1, 2, 4, 2, True, True, 16), query_offset=0)
    kw.update(change)
    with pytest.raises((ValueError, TypeError), match=word):
        topk.select_topk_fwd_launch(q, ck, **kw)
    with pytest.raises((ValueError, TypeError), match=word):
        topk.select_topk(q, ck, **kw)


def test_validation_of_tensors():
    q, ck = make_inputs(1, 16, 4, 2, 16, 1, 2)
    kw = kwargs_for(1, 2, 4, 2, True, True, 16)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        topk.select_topk(q[:, :, :3], ck, **kw)
    with pytest.raises(TypeError, match="dtype"):
        topk.select_topk(q.int(), ck.int(), **kw)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 for the Triton kernels"):
        topk.select_topk_fwd_launch(q.double(), ck.double(), **kw)
    idx, valid, val = topk.select_topk(q.double(), ck.double(), **kw)  # CPU: the reference takes float64
    assert val.dtype == torch.float64 and idx.dtype == torch.int32
    with pytest.raises(TypeError, match="share one dtype"):
        topk.select_topk(q, ck.half(), **kw)
    with pytest.raises(ValueError, match="ck shape"):
        topk.select_topk(q, ck[..., :8], **kw)
    with pytest.raises(ValueError, match="4-D"):
        topk.select_topk(q[0], ck, **kw)


@pytest.mark.parametrize("family", ["topk_fwd", "topk_bwd"])
@pytest.mark.parametrize("block_size, group, causal", [(64, 16, True), (8, 1, False), (20, 4, True)])
def test_templates_render_plain_python(family, block_size, group, causal):
    source = render(VariantSpec(family, block_size, group, causal))
    compile(source, f"{family}.py", "exec")
    assert "{{" not in source and "{%" not in source
    assert ("own[:, None])" in source) and (("for g in range(%d)" % group in source) == (group > 1))
    assert ("u_end = U\n" in source) == (not causal)


def test_strided_inputs(poison):
    """Non-contiguous q (a slice of a packed qkv) and ck (a transposed view): no copy needed."""
    gen = torch.Generator().manual_seed(11)
    qkv = torch.randn(1, 31, 6, 16, generator=gen)
    q = qkv[:, :, :4]
    ck = torch.randn(1, 2, 1 + 15, 16, generator=gen).transpose(1, 2)  # (1, 16, 2, 16), strided
    kw = kwargs_for(1, 2, 4, 3, False, True, 16)
    idx, valid, val, _ = topk.select_topk_fwd_launch(q, ck, **kw)
    ri, rv, rval = reference.select_topk(q, ck, **kw)
    assert torch.equal(idx.long(), ri) and (val - rval).abs().max() <= 1e-6


# ----------------------------------------------------------------------------------------------------
# GPU lane (H200): bf16 / fp16, the numerics rule against the fp32 reference


# Each case compiles one forward and one backward kernel (tens of seconds each), so the GPU lane keeps
# to a handful: both dtypes, G in {1, 4, 16}, shared / unshared, causal / not, mappings (a) and (b).
GPU_CASES = [
    # (b, n, H, K, d, M, s, l', k, causal, share), dtype
    ((2, 1000, 16, 1, 128, 1, 16, 64, 16, True, True), torch.bfloat16),  # G = 16, (b) R = 4
    ((1, 4096, 64, 4, 128, 1, 16, 64, 16, True, True), torch.bfloat16),  # the paper's settings, shorter
    ((1, 1000, 8, 2, 64, 2, 16, 32, 16, False, True), torch.bfloat16),  # G = 4 non-causal, R = 2
    ((1, 1000, 8, 2, 64, 1, 16, 64, 16, True, False), torch.float16),  # unshared under GQA
    ((1, 513, 4, 4, 128, 1, 32, 32, 100, False, True), torch.float16),  # (a), k > candidates, G = 1
]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("case, dtype", GPU_CASES,
                         ids=[_case_id(c) + ("-bf16" if t == torch.bfloat16 else "-fp16") for c, t in GPU_CASES])
def test_gpu_forward_backward_numerics(case, dtype, poison):
    b, n, H, K, d, M, s, lsel, k, causal, share = case
    q, ck = make_inputs(b, n, H, K, d, M, s, dtype=dtype, device="cuda", seed=n + H, grad=True)
    kw = kwargs_for(M, s, lsel, k, causal, share, d)
    paths = {}
    idx, valid, val = topk.select_topk(q, ck, **kw, paths=paths)
    assert paths == {"topk": "triton"}
    q32, ck32 = q.detach().float(), ck.detach().float()
    ref_idx, _, ref_val = reference.select_topk(q32, ck32, **kw)
    _, _, low_val = reference.select_topk(q.detach(), ck.detach(), **kw)
    tol = tolerance(ref_val, low_val) if val.numel() else 0.0
    check_selection(idx, valid, val, ref_idx, ref_val, full_reference_p(q32, ck32, kw), tol)
    if val.numel() == 0:
        return
    g = torch.randn_like(val)
    dq, dck = torch.autograd.grad(val, (q, ck), g)
    rdq, rdck = grad_oracle(q32, ck32, kw, idx, g)
    ldq, ldck = grad_oracle(q.detach(), ck.detach(), kw, idx, g)
    for name, got, ref, low in (("dq", dq, rdq, ldq), ("dck", dck, rdck, ldck)):
        assert torch.isfinite(got).all(), name
        assert_numerics(name, got, ref, low)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_opcheck_and_compile():
    q, ck = make_inputs(1, 256, 8, 2, 64, 1, 16, dtype=torch.bfloat16, device="cuda", grad=True)
    args = (q, ck, 1, 32, 16, 32, 4, True, True, 64 ** -0.5, 0)
    torch.library.opcheck(torch.ops.nsa.select_topk.default, args)  # every test_util, test_aot_dispatch_dynamic too
    val, lse, idx, _ = torch.ops.nsa.select_topk(*args)
    g = torch.randn_like(val)
    torch.library.opcheck(torch.ops.nsa.select_topk_backward.default,
                          (q.detach(), ck.detach(), idx, val.detach(), lse, g) + args[2:])

    def f(q, ck):
        val, _, idx, valid = torch.ops.nsa.select_topk(q, ck, 1, 32, 16, 32, 4, True, True, 64 ** -0.5, 0)
        return idx, valid, val

    eager = f(q, ck)
    compiled = torch.compile(f, fullgraph=True)(q, ck)
    for a, b_ in zip(eager, compiled):
        assert torch.equal(a, b_)
    g = torch.randn_like(eager[2])
    ge = torch.autograd.grad(eager[2], (q, ck), g)
    gc = torch.autograd.grad(compiled[2], (q, ck), g)
    for a, b_ in zip(ge, gc):
        assert (a.float() - b_.float()).abs().max().item() <= 1e-2 * max(a.float().abs().max().item(), 1e-6)
