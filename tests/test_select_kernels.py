"""Selected-attention kernels (templates/select_{fwd,bwd}.py.j2) against reference.selected_attention.

Two lanes, one set of cases:
- interpreter lane (CI, CPU, TRITON_INTERPRET=1): every variant of the default grid (l' in {8, 16, 32,
  64, 128} x G in {1, 2, 4, 8, 16} x causal: 50 forward/backward pairs = 100 sources) plus the on-demand
  variants l' in {2, 4}, l' = 20, G = 32 and G = 3, unshared selection, in fp32 and fp16, head dim 64
  (128 for a subset), forward (out, lse) and every gradient (dq, dk, dv, dgates).
- GPU lane (`pytest -m gpu`, skipped without CUDA): the same variants in bf16 and fp16 at head dims 64
  and 128 on larger shapes, plus torch.library.opcheck and torch.compile(fullgraph=True).

Numerics: the rule of conftest.py (fp32 on the interpreter: 1e-4 * max|ref32| + 1e-5; 16-bit:
2 * max|ref_lowp - ref32| + 1e-5, plus a small relative floor on the GPU lane), for the output, lse and
every gradient. Inputs are fresh random values; every allocation of the launchers is poisoned
(conftest.py) and must be fully written.
"""
from __future__ import annotations

import os

import pytest
import torch

from conftest import assert_numerics, interpreter_lane as interp, needs_cuda
from nsa_codegen import reference
from nsa_codegen.kernels import BLOCK_SIZES, GROUPS
from nsa_codegen.kernels import selected

gpu = pytest.mark.gpu

# sequence length per block size in the interpreter lane: odd, and long enough for >= 2 blocks when
# l' <= 64 (cost grows with the number of programs)
N_INTERP = {2: 23, 4: 23, 8: 29, 16: 37, 20: 45, 32: 67, 64: 67, 128: 131}


# ----------------------------------------------------------------------------------------------------
# inputs


def make_inputs(*, b=1, n, H, K, d, block_size, kk, shared=True, causal, dtype, gates=True,
                idx_dtype=torch.int64, device="cpu", seed=0, p_valid=0.8):
    """Random q, k, v and a random selection: distinct blocks per row, strictly earlier than the own
    block when causal (the contract), ~p_valid of them valid; invalid slots hold garbage indices."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, H, d, generator=gen)
    k = torch.randn(b, n, K, d, generator=gen)
    v = torch.randn(b, n, K, d, generator=gen)
    hs = K if shared else H
    nblk = -(-n // block_size)
    scores = torch.rand(b, n, hs, nblk, generator=gen)
    blocks = torch.arange(nblk)
    ncand = torch.full((n,), nblk)
    if causal:
        own = torch.arange(n) // block_size
        scores = scores.masked_fill(blocks[None, None, None, :] >= own[None, :, None, None], 2.0)
        ncand = own
    order = scores.argsort(dim=-1)
    idx = torch.empty(b, n, hs, kk, dtype=torch.int64)
    valid = torch.zeros(b, n, hs, kk, dtype=torch.bool)
    take = min(kk, nblk)
    idx[..., :take] = order[..., :take]
    in_cand = torch.arange(kk)[None, None, None, :] < ncand[None, :, None, None]
    valid = in_cand & (torch.rand(b, n, hs, kk, generator=gen) < p_valid)
    garbage = torch.randint(-2, nblk + 3, (b, n, hs, kk), generator=gen)
    idx = torch.where(valid, idx, garbage)
    g = (0.5 + torch.rand(b, n, hs, kk, generator=gen)) if gates else None
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return dict(
        q=cast(q), k=cast(k), v=cast(v), block_idx=idx.to(device=device, dtype=idx_dtype),
        block_valid=valid.to(device), gates=None if g is None else cast(g),
    )


# ----------------------------------------------------------------------------------------------------
# reference and comparison


def reference_grads(inp, dout, *, block_size, causal, scale, dtype):
    """Reference out, lse and grads with inputs cast to `dtype` (the inputs' values, upcast or not)."""
    q, k, v = (inp[n].detach().to(dtype).requires_grad_() for n in "qkv")
    g = inp["gates"]
    g = None if g is None else g.detach().to(dtype).requires_grad_()
    out = reference.selected_attention(q, k, v, inp["block_idx"], inp["block_valid"], g, block_size=block_size,
                                       causal=causal, scale=scale)
    out.backward(dout.to(dtype))
    res = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    if g is not None:
        res["dgates"] = g.grad if g.grad is not None else torch.zeros_like(g)  # kk = 0: no gate used
    if dtype == torch.float32:
        with torch.no_grad():
            res["lse"] = reference.selected_attention_lse(q, k, inp["block_idx"], inp["block_valid"], g,
                                                          block_size=block_size, causal=causal, scale=scale)
    return res


def run_kernels(inp, dout, *, block_size, causal, scale):
    """Forward into caller-allocated out / lse, backward into a caller-allocated dq (allocated with
    torch.empty: poisoned under the `poison` fixture, as the launchers' own allocations)."""
    q = inp["q"]
    b, n, h, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((b, n, h), device=q.device)
    args = (inp["q"], inp["k"], inp["v"], inp["block_idx"], inp["block_valid"], inp["gates"])
    kw = dict(block_size=block_size, causal=causal, scale=scale)
    out, lse = selected.selected_attention_fwd_launch(*args, **kw, out=out, lse=lse)
    dq = torch.empty_like(q)
    dq, dk, dv, dg = selected.selected_attention_bwd_launch(*args, out, lse, dout, **kw, dq=dq)
    res = {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
    if inp["gates"] is not None:
        res["dgates"] = dg
    return res


def check(got, ref32, ref_lowp=None, *, rel=1e-4, gpu_rel=0.0):
    """The numerics rule (conftest.py) per tensor of `ref32` (out, lse, dq, dk, dv, dgates); `ref_lowp` holds
    the low-precision reference's tensors (lse only in fp32). Returns {name: (err, tol)}."""
    report = {}
    for name, r in ref32.items():
        x = got[name]
        if name == "lse":  # -inf (no key) must match exactly; compare the finite part
            assert not torch.isnan(x).any(), "lse: NaN (an element left unwritten?)"
            assert torch.equal(torch.isinf(x).cpu(), torch.isinf(r).cpu()), "lse: -inf pattern differs"
            x, r = x.masked_fill(torch.isinf(x), 0), r.masked_fill(torch.isinf(r), 0)
        low = None if ref_lowp is None else ref_lowp.get(name)
        report[name] = assert_numerics(name, x, r, low, rel=rel, rel_slack=gpu_rel if low is not None else 0.0)
    return report


def compare_case(*, n, H, K, d, block_size, kk, causal, dtype, shared=True, gates=True, b=1,
                 idx_dtype=torch.int64, device="cpu", seed=0, gpu_rel=0.0):
    inp = make_inputs(b=b, n=n, H=H, K=K, d=d, block_size=block_size, kk=kk, shared=shared, causal=causal,
                      dtype=dtype, gates=gates, idx_dtype=idx_dtype, device=device, seed=seed)
    scale = d ** -0.5
    dout = torch.randn(inp["q"].shape, generator=torch.Generator().manual_seed(seed + 1)).to(device=device, dtype=dtype)
    kw = dict(block_size=block_size, causal=causal, scale=scale)
    got = run_kernels(inp, dout, **kw)
    ref32 = reference_grads(inp, dout, **kw, dtype=torch.float32)
    if dtype == torch.float32:
        report = check(got, ref32)
    else:
        report = check(got, ref32, reference_grads(inp, dout, **kw, dtype=dtype), gpu_rel=gpu_rel)
    if os.environ.get("NSA_ERR_LOG"):  # one JSON line per case, for the per-family worst-error summary
        import json

        group = H // K if shared else 1
        row = {"variant": f"bs{block_size}_g{group}_{'causal' if causal else 'noncausal'}", "dtype": str(dtype)[6:],
               "d": d, "err": {k_: e for k_, (e, _) in report.items()}, "tol": {k_: t for k_, (_, t) in report.items()}}
        with open(os.environ["NSA_ERR_LOG"], "a") as f:
            f.write(json.dumps(row) + "\n")
    return report


def case_heads(group, shared):
    """(H, K) for a variant group: shared selection packs G = H // K heads (one kv head keeps the
    interpreter fast; several kv heads and unshared GQA are covered by EXTRA); unshared packs 1 head."""
    return (group, 1) if shared else (4, 2)


# ----------------------------------------------------------------------------------------------------
# interpreter lane


GRID = [(l, g, c) for l in BLOCK_SIZES for g in GROUPS for c in (True, False)]


@interp
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("block_size,group,causal", GRID, ids=[f"bs{l}_g{g}_{'causal' if c else 'noncausal'}" for l, g, c in GRID])
@pytest.mark.usefixtures("poison")
def test_grid_variant_interpreter(block_size, group, causal, dtype, d):
    H, K = case_heads(group, True)
    # l' = 128: causal needs n > 128 for an earlier block (one candidate); non-causal runs one partial block
    n = N_INTERP[block_size] if (block_size < 128 or causal) else 100
    compare_case(n=n, H=H, K=K, d=d, block_size=block_size, kk=1 if block_size == 128 else 2, causal=causal,
                 dtype=dtype, seed=block_size * 100 + group)


EXTRA = [
    # (block_size, H, K, shared, causal, d, kk, gates, idx dtype) -- on-demand and odd cases
    (2, 4, 1, True, True, 64, 4, True, torch.int64),     # seed's l' = 2, G = 4
    (2, 2, 2, False, False, 64, 4, True, torch.int32),   # l' = 2 unshared, int32 indices
    (4, 16, 1, True, True, 64, 4, True, torch.int64),    # l' = 4, G = 16 (gathered tiles)
    (4, 4, 2, False, False, 64, 3, True, torch.int64),   # l' = 4 unshared GQA
    (20, 4, 2, True, True, 64, 2, True, torch.int64),    # l' = 20 (masked 32-wide tile), packed
    (20, 16, 1, True, False, 64, 2, True, torch.int32),  # l' = 20, G = 16
    (16, 32, 1, True, True, 64, 2, True, torch.int64),   # G = 32 (on demand)
    (32, 32, 1, True, False, 64, 2, False, torch.int64), # G = 32, no gates
    (16, 6, 2, True, True, 64, 3, True, torch.int64),    # G = 3 (not a power of two, padded to 4)
    (64, 16, 1, True, True, 128, 2, True, torch.int64),  # head dim 128
    (16, 4, 2, True, False, 128, 3, True, torch.int64),  # head dim 128, packed
    (8, 2, 1, True, True, 128, 3, True, torch.int32),    # head dim 128, gathered, packed G = 2
    (32, 4, 4, False, True, 48, 2, True, torch.int64),   # head dim 48 (masked to 64), unshared
    (16, 8, 1, True, True, 64, 0, True, torch.int64),    # kk = 0: causal own block only
]


def _extra_id(c) -> str:
    return (f"bs{c[0]}_H{c[1]}_K{c[2]}_{'shared' if c[3] else 'unshared'}_{'causal' if c[4] else 'noncausal'}"
            f"_kk{c[6]}{'' if c[7] else '_nogates'}_{str(c[8])[6:]}")


# every extra case at its own head dim and at 128 (issue 3: head dims 64 and 128 in each lane)
EXTRA_RUNS = [(c, d) for c in EXTRA for d in sorted({c[5], 128})]
EXTRA_RUN_IDS = [f"{_extra_id(c)}_d{d}" for c, d in EXTRA_RUNS]


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case,d", EXTRA_RUNS, ids=EXTRA_RUN_IDS)
@pytest.mark.usefixtures("poison")
def test_extra_variant_interpreter(case, d, dtype):
    block_size, H, K, shared, causal, _, kk, gates, idx_dtype = case
    compare_case(n=N_INTERP.get(block_size, 45), H=H, K=K, d=d, block_size=block_size, kk=kk, causal=causal,
                 dtype=dtype, shared=shared, gates=gates, idx_dtype=idx_dtype, seed=7 + block_size)


@interp
@pytest.mark.usefixtures("poison")
def test_batch_and_strided_inputs_interpreter():
    """b = 2, q/k/v as strided views of one fused qkv tensor and a transposed selection: no copies."""
    b, n, H, K, d, l, kk = 2, 33, 4, 2, 32, 8, 3
    base = make_inputs(b=b, n=n, H=H, K=K, d=d, block_size=l, kk=kk, causal=True, dtype=torch.float32, seed=3)
    fused = torch.cat([base["q"], base["k"], base["v"]], dim=2)  # (b, n, H + 2K, d)
    q, k, v = fused[:, :, :H], fused[:, :, H:H + K], fused[:, :, H + K:]
    assert not q.is_contiguous() and not k.is_contiguous()
    idx = base["block_idx"].transpose(2, 3).contiguous().transpose(2, 3)  # strided (b, n, K, kk)
    inp = dict(q=q, k=k, v=v, block_idx=idx, block_valid=base["block_valid"], gates=base["gates"])
    dout = torch.randn(b, n, H, d)
    kw = dict(block_size=l, causal=True, scale=d ** -0.5)
    check(run_kernels(inp, dout, **kw), reference_grads(inp, dout, **kw, dtype=torch.float32))


@interp
@pytest.mark.parametrize("group,layout", [(16, {"force_tpp": 2}), (16, {"force_tpp": 4}), (4, {"force_pad": True}),
                                          (2, {"force_tpp": 16})], ids=["g16-tpp2", "g16-tpp4", "g4-pad", "g2-tpp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.usefixtures("poison")
def test_experimental_layouts_match_the_reference(group, layout, causal):
    """The program layouts the GPU experiments render (render.load_with_layout): the padding baseline
    packing is measured against, and more tokens per program than the default (at G = 16: several
    tokens over the union of their blocks, for selections with locality). Forward and all gradients."""
    from nsa_codegen.codegen import render
    from nsa_codegen.codegen.spec import VariantSpec

    n, K, d, l, kk = 45, 1, 16, 8, 3
    inp = make_inputs(n=n, H=group * K, K=K, d=d, block_size=l, kk=kk, causal=causal, dtype=torch.float32,
                      seed=60 + group)
    fwd = render.load_with_layout(VariantSpec("select_fwd", l, group, causal), **layout)
    bwd = render.load_with_layout(VariantSpec("select_bwd", l, group, causal), **layout)
    expect_tpp = layout.get("force_tpp", 1)
    assert fwd.TOKENS_PER_PROGRAM == bwd.TOKENS_PER_PROGRAM == expect_tpp
    args = (inp["q"], inp["k"], inp["v"], inp["block_idx"], inp["block_valid"], inp["gates"])
    kw = dict(block_size=l, causal=causal, scale=d ** -0.5)
    out, lse = selected.selected_attention_fwd_launch(*args, **kw, module=fwd)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
    dq, dk, dv, dg = selected.selected_attention_bwd_launch(*args, out, lse, dout, **kw, module=bwd)
    got = {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv, "dgates": dg}
    check(got, reference_grads(inp, dout, **kw, dtype=torch.float32))


@interp
@pytest.mark.usefixtures("poison")
def test_noncausal_query_without_keys_gets_zero_and_finite_grads():
    inp = make_inputs(n=40, H=4, K=2, d=32, block_size=16, kk=2, causal=False, dtype=torch.float32, seed=5)
    inp["block_valid"][:, 7] = False  # token 7 has no key at all
    dout = torch.randn(inp["q"].shape)
    kw = dict(block_size=16, causal=False, scale=32 ** -0.5)
    got = run_kernels(inp, dout, **kw)
    assert torch.all(got["out"][:, 7] == 0) and torch.all(torch.isneginf(got["lse"][:, 7]))
    assert torch.all(got["dq"][:, 7] == 0)
    check(got, reference_grads(inp, dout, **kw, dtype=torch.float32))


@interp
def test_launcher_picks_generated_variant_and_config():
    from nsa_codegen.codegen import cache

    inp = make_inputs(n=16, H=8, K=2, d=64, block_size=16, kk=1, causal=True, dtype=torch.float32)
    fwd, bwd = selected.variant_specs(inp["q"], inp["k"], inp["block_idx"], block_size=16, causal=True)
    assert fwd.name == "select_fwd_bs16_g4_causal" and bwd.name == "select_bwd_bs16_g4_causal"
    unshared = torch.zeros(1, 16, 8, 1, dtype=torch.int64)
    assert selected.variant_specs(inp["q"], inp["k"], unshared, block_size=16, causal=False)[0].group == 1
    with pytest.raises(ValueError, match="selection heads"):
        selected.variant_specs(inp["q"], inp["k"], torch.zeros(1, 16, 3, 1, dtype=torch.int64), block_size=16,
                               causal=True)
    mod = cache.load_variant(fwd)
    assert mod.TOKENS_PER_PROGRAM == 4 and mod.BLOCK_M == 16 and mod.CONFIGS
    for c in mod.CONFIGS:
        assert {"BLOCK_N", "num_warps", "num_stages", "max_d16", "max_d32"} <= set(c)


# ----------------------------------------------------------------------------------------------------
# validation errors (raised before any launch; no interpreter needed)


def _valid_args(**over):
    inp = make_inputs(n=8, H=4, K=2, d=64, block_size=4, kk=2, causal=True, dtype=torch.float32)
    args = dict(inp, block_size=4, causal=True, scale=0.125)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, exc, words",
    [
        (dict(k=torch.randn(1, 8, 3, 64), v=torch.randn(1, 8, 3, 64)), ValueError, ["H=4", "K=3", "mismatched heads"]),
        (dict(block_idx=torch.zeros(1, 8, 2, 2, dtype=torch.int16)), TypeError, ["block_idx", "int32", "int64"]),
        (dict(block_idx=torch.zeros(1, 8, 2, 2, dtype=torch.float32)), TypeError, ["block_idx", "int32", "int64"]),
        (dict(block_idx=torch.zeros(1, 8, 3, 2, dtype=torch.int64)), ValueError, ["block_idx", "Hs", "mismatched heads"]),
        (dict(q=torch.randn(1, 8, 4, 128)[..., ::2]), ValueError, ["q", "contiguous last dim"]),
        (dict(q=torch.randn(1, 8, 4, 12), k=torch.randn(1, 8, 2, 12), v=torch.randn(1, 8, 2, 12)), ValueError,
         ["head dim d=12", "multiples of 8", "[16, 256]"]),
        (dict(q=torch.randn(1, 8, 4, 512), k=torch.randn(1, 8, 2, 512), v=torch.randn(1, 8, 2, 512)), ValueError,
         ["head dim d=512"]),
        (dict(block_valid=torch.ones(1, 8, 2, 2, dtype=torch.uint8)), TypeError, ["block_valid", "torch.bool"]),
        (dict(gates=torch.ones(1, 8, 2, 3)), ValueError, ["gates shape"]),
        (dict(q=torch.randn(1, 8, 4, 64).double(), k=torch.randn(1, 8, 2, 64).double(),
              v=torch.randn(1, 8, 2, 64).double()), TypeError, ["q dtype", "float16, bfloat16, float32"]),
        (dict(k=torch.randn(1, 8, 2, 64).half()), TypeError, ["q, k, v must share one dtype"]),
        (dict(block_size=0), ValueError, ["block_size"]),
        (dict(block_idx=torch.zeros(1, 8, 2, 2, dtype=torch.int64, device="meta")), ValueError, ["one device"]),
    ],
    ids=["heads", "idx-int16", "idx-float", "sel-heads", "last-dim", "head-dim-12", "head-dim-512", "valid-dtype",
         "gates-shape", "fp64", "mixed-dtype", "block-size", "device"],
)
def test_validation_errors_before_launch(request, over, exc, words):
    args = _valid_args(**over)
    sel = (args["q"], args["k"], args["v"], args["block_idx"], args["block_valid"], args["gates"])
    kw = dict(block_size=args["block_size"], causal=args["causal"], scale=args["scale"])
    kernel_only = request.node.callspec.id in KERNEL_ONLY
    for fn in (selected.selected_attention_fwd_launch, selected.selected_attention):
        if kernel_only and fn is selected.selected_attention:  # CPU: the reference takes these inputs
            torch.testing.assert_close(fn(*sel, **kw), reference.selected_attention(*sel, **kw), rtol=0, atol=0)
            continue
        with pytest.raises(exc) as info:
            fn(*sel, **kw)
        for w in words:
            assert w in str(info.value), f"{w!r} not in {info.value}"


KERNEL_ONLY = ("last-dim", "head-dim-12", "head-dim-512", "fp64")  # limits of the kernels, not of the reference


def test_cpu_public_path_is_the_reference():
    args = _valid_args()
    sel = (args["q"], args["k"], args["v"], args["block_idx"], args["block_valid"], args["gates"])
    ref = reference.selected_attention(*sel, block_size=4, causal=True, scale=0.125)
    for use_kernels in (True, False):
        paths = {}
        out = selected.selected_attention(*sel, block_size=4, causal=True, scale=0.125, use_kernels=use_kernels,
                                          paths=paths)
        assert paths == {"selected": "reference"}
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_query_offset_runs_the_reference_on_every_device(monkeypatch):
    """Queries placed after a cache (decoding, query_offset > 0) take the reference even where `route`
    would pick the kernels (CUDA); without an offset the op is taken (on CPU tensors: its CPU kernel)."""
    monkeypatch.setattr(selected, "route", lambda x, use_kernels=True: "triton")
    inp = make_inputs(n=9, H=4, K=2, d=16, block_size=4, kk=2, causal=True, dtype=torch.float32, seed=2)
    k, v = inp["k"], inp["v"]
    q, idx, valid, g = (inp[x][:, -1:] for x in ("q", "block_idx", "block_valid", "gates"))
    paths = {}
    out = selected.selected_attention(q, k, v, idx, valid, g, block_size=4, causal=True, scale=0.25, query_offset=8,
                                      paths=paths)
    assert paths == {"selected": "reference"}
    ref = reference.selected_attention(q, k, v, idx, valid, g, block_size=4, causal=True, scale=0.25, query_offset=8)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    full = selected.selected_attention(*(inp[x] for x in ("q", "k", "v", "block_idx", "block_valid", "gates")),
                                       block_size=4, causal=True, scale=0.25, paths=paths)
    assert paths == {"selected": "triton"}
    torch.testing.assert_close(full[:, -1:], ref)


def test_cpu_op_and_autograd_match_reference():
    """torch.ops.nsa.selected_attention on CPU: the reference (out) + chunked logsumexp (lse); its
    registered autograd gives the reference's gradients."""
    inp = make_inputs(n=21, H=4, K=2, d=16, block_size=4, kk=2, causal=True, dtype=torch.float32, seed=11)
    q, k, v, g = (inp[n].clone().requires_grad_() for n in ("q", "k", "v", "gates"))
    out, lse = torch.ops.nsa.selected_attention(q, k, v, inp["block_idx"], inp["block_valid"], g, 4, True, 0.25)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref = reference_grads(inp, dout, block_size=4, causal=True, scale=0.25, dtype=torch.float32)
    got = {"out": out.detach(), "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad, "dgates": g.grad}
    check(got, ref, rel=1e-5)
    dense = torch.logsumexp(_dense_logits(inp, 4, True, 0.25), -1)
    torch.testing.assert_close(lse, dense)


def _dense_logits(inp, l, causal, scale):
    """(b, n, H, n) logits with -inf outside each query's keys (tiny shapes only), for the lse check."""
    q, k, idx, ok, g = inp["q"], inp["k"], inp["block_idx"], inp["block_valid"], inp["gates"]
    b, n, H, d = q.shape
    K, hs = k.shape[2], idx.shape[2]
    s = torch.full((b, n, H, n), float("-inf"))
    for bi in range(b):
        for i in range(n):
            for h in range(H):
                r = h // (H // hs)
                kv = h // (H // K)
                for slot in range(idx.shape[3]):
                    if ok[bi, i, r, slot]:
                        for j in range(idx[bi, i, r, slot] * l, min(n, (idx[bi, i, r, slot] + 1) * l)):
                            s[bi, i, h, j] = g[bi, i, r, slot] * scale * (q[bi, i, h] @ k[bi, j, kv])
                if causal:
                    for j in range((i // l) * l, i + 1):
                        s[bi, i, h, j] = scale * (q[bi, i, h] @ k[bi, j, kv])
    return s


# ----------------------------------------------------------------------------------------------------
# GPU lane (pytest -m gpu on the H200)

GPU_N = {8: 301, 16: 507, 32: 507, 64: 1000, 128: 1000, 2: 127, 4: 201, 20: 507}


@gpu
@needs_cuda
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("block_size,group,causal", GRID, ids=[f"bs{l}_g{g}_{'causal' if c else 'noncausal'}" for l, g, c in GRID])
@pytest.mark.usefixtures("poison")
def test_grid_variant_gpu(block_size, group, causal, dtype, d):
    H, K = case_heads(group, True)
    compare_case(b=2, n=GPU_N[block_size], H=H, K=K, d=d, block_size=block_size, kk=4, causal=causal, dtype=dtype,
                 device="cuda", seed=block_size * 100 + group, gpu_rel=1e-3)


@gpu
@needs_cuda
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", EXTRA, ids=[f"extra{i}" for i in range(len(EXTRA))])
@pytest.mark.usefixtures("poison")
def test_extra_variant_gpu(case, dtype, d):
    block_size, H, K, shared, causal, _, kk, gates, idx_dtype = case
    compare_case(b=2, n=GPU_N.get(block_size, 301), H=H, K=K, d=d, block_size=block_size, kk=kk, causal=causal,
                 dtype=dtype, shared=shared, gates=gates, idx_dtype=idx_dtype, device="cuda", seed=7 + block_size,
                 gpu_rel=1e-3)


def _op_args(device, dtype, causal=True, requires_grad=True):
    inp = make_inputs(b=2, n=200, H=8, K=2, d=64, block_size=16, kk=4, causal=causal, dtype=dtype, device=device)
    q, k, v, g = (inp[n].requires_grad_(requires_grad) for n in ("q", "k", "v", "gates"))
    return (q, k, v, inp["block_idx"], inp["block_valid"], g, 16, causal, 0.125)


@gpu
@needs_cuda
def test_opcheck_gpu():
    for causal in (True, False):
        torch.library.opcheck(torch.ops.nsa.selected_attention, _op_args("cuda", torch.bfloat16, causal))


@gpu
@needs_cuda
def test_torch_compile_fullgraph_matches_eager_gpu():
    args = _op_args("cuda", torch.bfloat16)

    def f(q, k, v, idx, valid, g):
        return selected.selected_attention(q, k, v, idx, valid, g, block_size=16, causal=True, scale=0.125)

    dout = torch.randn_like(args[0])
    outs = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        for t in (args[0], args[1], args[2], args[5]):
            t.grad = None
        o = fn(*args[:6])
        o.backward(dout)
        outs.append([o.detach().clone()] + [t.grad.clone() for t in (args[0], args[1], args[2], args[5])])
    for e, c in zip(*outs):
        torch.testing.assert_close(c, e)  # atomics: dk, dv may differ in the last bits


@gpu
@needs_cuda
def test_public_cuda_path_autograd_gpu():
    args = _op_args("cuda", torch.float16)
    out = selected.selected_attention(*args[:6], block_size=16, causal=True, scale=0.125)
    out.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (args[0], args[1], args[2], args[5]))
