"""Compressed-attention kernels (templates/cmp_{fwd,bwd}.py.j2, nsa_codegen/kernels/compressed.py).

Interpreter lane (CPU, TRITON_INTERPRET=1, fp32 + fp16, small shapes): forward, lse and the gradients
of q, ck and cv (memory rows included) against nsa_codegen.reference under the numerics rule (conftest.py),
outputs poisoned with NaN before the launch and checked written; strided inputs; strides l and l/2;
M in {1, 2}; query offsets; validation errors; the torch.library op's CPU path. GPU lane
(`pytest -m gpu`, bf16 + fp16 on CUDA): the same comparison at d 64 / 128 and n up to 4096, `opcheck`,
and torch.compile(fullgraph=True) forward + backward vs eager. With $NSA_TEST_REPORT_DIR (or $OUT)
set, the GPU lane appends its errors to dense_kernels_gpu.jsonl there.
"""
from __future__ import annotations

import pytest
import torch

from conftest import assert_numerics, interpreter_lane as interpreter, needs_cuda
from dense_kernel_helpers import assert_backward_uses_exact_delta, gpu_report, make_inputs
from nsa_codegen import reference
from nsa_codegen.kernels import compressed


# ----------------------------------------------------------------------------------------------------
# helpers (shared ones in dense_kernel_helpers.py)


def reference_grads(q, ck, cv, dout, dtype, **kw):
    qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, ck, cv))
    out, _ = reference.compressed_attention(qq, kk, vv, **kw)
    out.backward(dout.to(dtype))
    return out.detach(), qq.grad, kk.grad, vv.grad


def run_and_compare(b, nq, H, K, d, num_mem, block_size, stride, causal, dtype, *, config=None, offset=0, seed=0,
                    device="cpu"):
    rows = num_mem + (nq + offset) // stride
    q, ck, cv, dout = make_inputs(b, nq, rows, H, K, d, dtype, device, seed)
    scale = d ** -0.5
    kw = dict(num_mem=num_mem, block_size=block_size, stride=stride, causal=causal, scale=scale, query_offset=offset)
    out, lse = compressed.compressed_attention_fwd_launch(q, ck, cv, config=config, **kw)
    dq, dck, dcv = compressed.compressed_attention_bwd_launch(q, ck, cv, out, lse, dout, config=config, **kw)
    ref32 = reference_grads(q, ck, cv, dout, torch.float32, **kw)
    low = reference_grads(q, ck, cv, dout, dtype, **kw) if dtype != torch.float32 else ref32
    errs = {}
    for name, got, r32, rlow in zip(("out", "dq", "dck", "dcv"), (out, dq, dck, dcv), ref32, low):
        assert got.dtype == dtype
        errs[name] = assert_numerics(name, got, r32, None if dtype == torch.float32 else rlow)[0]
    lse_ref = reference.compressed_attention_lse(q.float(), ck.float(), num_mem=num_mem, stride=stride,
                                                 causal=causal, scale=scale, query_offset=offset)
    assert torch.isfinite(lse).all(), "lse: NaN / inf (an element left unwritten?)"
    assert (lse - lse_ref).abs().max().item() <= 1e-3
    return errs


def config_for(group, block_m=None):
    """Narrow tiles (BLOCK_N = 16, few tokens per tile) so that every loop stage runs on short inputs."""
    return {"BLOCK_M": block_m or max(32, 4 * group), "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}


# ----------------------------------------------------------------------------------------------------
# interpreter lane


@interpreter
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("block_size,stride,num_mem", [(4, 4, 1), (8, 4, 2)], ids=["s=l,M=1", "s=l/2,M=2"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("group", [1, 2, 4, 16])
def test_cmp_fp32(group, causal, block_size, stride, num_mem):
    """n = 77 (31 for G = 16), M + C up to 21 key rows: several query tiles and key tiles."""
    run_and_compare(1, 31 if group == 16 else 77, group, 1, 32, num_mem, block_size, stride, causal, torch.float32,
                    config=config_for(group), seed=group * 10 + stride)


@interpreter
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("num_mem", [1, 2])
def test_cmp_many_compressed_rows(num_mem, causal):
    """Stride 2 at n = 77: 38 compressed rows + memory over three key tiles, the unmasked / masked split
    of both kernels in the middle of the sequence; GQA with K = 2."""
    run_and_compare(1, 77, 4, 2, 32, num_mem, 4, 2, causal, torch.float32, config=config_for(2, 16),
                    seed=200 + num_mem)


@interpreter
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("n", [1, 31])
def test_cmp_short_default_config(n, causal, dtype):
    """The launcher's own config choice; n = 1 (no compressed block yet: memory only) and n = 31."""
    run_and_compare(2, n, 4, 2, 32, 2, 8, 4, causal, dtype, seed=n)


@interpreter
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("group,block_size,stride,num_mem", [(1, 8, 4, 1), (4, 4, 4, 2), (16, 8, 8, 1)])
def test_cmp_fp16(group, block_size, stride, num_mem, causal):
    run_and_compare(1, 31 if group == 16 else 77, group, 1, 32, num_mem, block_size, stride, causal, torch.float16,
                    config=config_for(group), seed=100 + group)


@pytest.mark.parametrize("nq", [1, 255, 256, 257, 1000, 4096, 65536, 100003])
@pytest.mark.parametrize("tokens", [1, 3, 4, 16])
def test_cmp_dkdv_chunks_cover_the_queries(nq, tokens):
    """The dkdv query chunks tile [0, nq) exactly on the kernel's token grid, at most DKDV_MAX_CHUNKS."""
    chunks, per = compressed.dkdv_chunks(nq, tokens)
    assert 1 <= chunks <= compressed.DKDV_MAX_CHUNKS and per % tokens == 0
    assert (chunks - 1) * per < nq <= chunks * per


def test_cmp_dkdv_chunks_add_no_guard_on_a_symbolic_length():
    """Under torch.compile(dynamic=True) the query count is symbolic: the chunk count must stay symbolic
    (a guard on it would recompile at every 256-token step up to 4096)."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    nq = env.create_symintnode(env.create_symbol(3000, source=ConstantSource("nq")), hint=3000)
    chunks, per = compressed.dkdv_chunks(nq, 5)
    assert isinstance(chunks, torch.SymInt) and isinstance(per, torch.SymInt)
    assert (int(chunks.node.hint), int(per.node.hint)) == compressed.dkdv_chunks(3000, 5)
    assert not env.guards, [str(g.expr) for g in env.guards]


@interpreter
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("group", [1, 4])
def test_cmp_dkdv_query_chunks(group, causal, monkeypatch):
    """dkdv_kernel split over query chunks (fp32 partial sums in a poisoned workspace, summed by the
    launcher): with 8-token chunks at n = 77, chunk edges fall inside both the masked and the unmasked
    query ranges of the key tiles; gradients as the reference."""
    monkeypatch.setattr(compressed, "DKDV_MIN_CHUNK", 8)
    config = config_for(group, 16)
    assert compressed.dkdv_chunks(77, 16 // group)[0] >= 5
    run_and_compare(1, 77, group * 2, 2, 32, 2, 4, 2, causal, torch.float32, config=config, seed=300 + group)


@interpreter
@pytest.mark.usefixtures("poison")
def test_cmp_group_not_power_of_two_and_head_dim_padding():
    """G = 3 leaves padding rows in the tile; d = 40 pads to a 64-wide tile."""
    run_and_compare(1, 31, 3, 1, 40, 1, 4, 2, True, torch.float32, config=config_for(3, 16), seed=7)
    run_and_compare(1, 31, 3, 1, 40, 2, 4, 2, False, torch.float32, config=config_for(3, 16), seed=8)


@interpreter
@pytest.mark.usefixtures("poison")
def test_cmp_query_offset():
    """Decoding-style call: 5 queries at positions 20..24 against M + 24 // 2 rows."""
    run_and_compare(1, 5, 2, 1, 32, 1, 4, 2, True, torch.float32, config=config_for(1, 16), offset=20)


@interpreter
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("group", [1, 4])
def test_cmp_backward_uses_exact_delta(group, causal):
    """The backward computes its own fp32 delta (dense_kernel_helpers.assert_backward_uses_exact_delta)."""
    b, n, K, d, M, s = 2, 77, 2, 32, 1, 4
    H = group * K
    q, ck, cv, dout = make_inputs(b, n, M + n // s, H, K, d, torch.float32, "cpu", 300 + group)
    kw = dict(num_mem=M, block_size=s, stride=s, causal=causal, scale=d ** -0.5)
    assert_backward_uses_exact_delta(
        compressed.compressed_attention_fwd_launch, compressed.compressed_attention_bwd_launch,
        q, ck, cv, dout, reference_grads(q, ck, cv, dout, torch.float32, **kw)[1:], ("dq", "dck", "dcv"),
        config=config_for(group, 16 * group), **kw)


@interpreter
def test_cmp_op_cpu_path_is_the_reference():
    q, ck, cv, dout = make_inputs(1, 20, 1 + 10, 4, 2, 16, torch.float32, "cpu", 3)
    q, ck, cv = (t.detach().requires_grad_() for t in (q, ck, cv))
    out, lse = torch.ops.nsa.compressed_attention(q, ck, cv, 1, 4, 2, True, 0.25, 0)
    out.backward(dout)
    kw = dict(num_mem=1, block_size=4, stride=2, causal=True, scale=0.25)
    ref = reference_grads(q, ck, cv, dout, torch.float32, **kw)
    torch.testing.assert_close(out, ref[0])
    for got, r in zip((q.grad, ck.grad, cv.grad), ref[1:]):
        torch.testing.assert_close(got, r)
    torch.testing.assert_close(lse, reference.compressed_attention_lse(q.detach(), ck.detach(), num_mem=1, stride=2,
                                                                       causal=True, scale=0.25))
    public, logits = compressed.compressed_attention(q, ck, cv, **kw)
    ref_out, ref_logits = reference.compressed_attention(q, ck, cv, **kw)
    torch.testing.assert_close(public, ref_out)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(reference.compressed_logits(q, ck, num_mem=1, stride=2, causal=True, scale=0.25),
                               ref_logits)
    assert compressed.compressed_attention(q, ck, cv, **kw, return_logits=False)[1] is None


def _valid_args(d=16, dtype=torch.float16):
    return dict(
        q=torch.randn(1, 8, 4, d, dtype=dtype), ck=torch.randn(1, 5, 2, d, dtype=dtype),
        cv=torch.randn(1, 5, 2, d, dtype=dtype), num_mem=1, block_size=4, stride=2, causal=True, scale=0.25,
        query_offset=0,
    )


def _bad_args():
    cases = []

    def case(word, **change):
        args = _valid_args()
        args.update(change)
        cases.append(pytest.param(args, word, id=word.replace(" ", "_")))

    case("num_mem", num_mem=0)
    case("num_mem", num_mem=6)
    case("block_size", block_size=0)
    case("stride", stride=0)
    case("stride", stride=8)
    case("causal", causal="yes")
    case("scale", scale=None)
    case("query_offset", query_offset=-1)
    case("share one dtype", cv=torch.randn(1, 5, 2, 16))
    case("mismatched heads", ck=torch.randn(1, 5, 3, 16, dtype=torch.float16), cv=torch.randn(1, 5, 3, 16, dtype=torch.float16))
    case("head dim", **{n: t[..., :12] for n, t in _valid_args().items() if n in ("q", "ck", "cv")})
    case("contiguous last dim", ck=torch.randn(1, 5, 16, 2, dtype=torch.float16).transpose(-1, -2))
    case("same shape", cv=torch.randn(1, 4, 2, 16, dtype=torch.float16))
    case("4-D", q=torch.randn(8, 4, 16, dtype=torch.float16))
    return cases


@pytest.mark.parametrize("args, word", _bad_args())
def test_cmp_validation_errors(args, word):
    with pytest.raises((ValueError, TypeError), match=word):
        compressed.compressed_attention_fwd_launch(**args)
    if word in ("head dim", "contiguous last dim"):  # kernel limits: the public op's reference path takes them
        args = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        got, _ = compressed.compressed_attention(**args)
        want, _ = reference.compressed_attention(**args)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        return
    with pytest.raises((ValueError, TypeError), match=word):
        compressed.compressed_attention(**args)


# ----------------------------------------------------------------------------------------------------
# GPU lane


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("group", [1, 4, 16])
@pytest.mark.parametrize("n,block_size,stride,num_mem", [(77, 4, 2, 2), (1000, 32, 16, 1), (4096, 32, 16, 2),
                                                         (4096, 64, 64, 1)])
def test_gpu_cmp_matches_reference(n, block_size, stride, num_mem, group, causal, d, dtype):
    errs = run_and_compare(1, n, group * 2, 2, d, num_mem, block_size, stride, causal, dtype, seed=n + group,
                           device="cuda")
    gpu_report({"test": "cmp", "n": n, "block_size": block_size, "stride": stride, "num_mem": num_mem,
                "group": group, "causal": causal, "d": d, "dtype": str(dtype), "errors": errs})


def _gpu_inputs(dtype=torch.bfloat16, n=300, H=8, K=2, d=64, num_mem=2, stride=8):
    q, ck, cv, dout = make_inputs(2, n, num_mem + n // stride, H, K, d, dtype, "cuda", 11)
    return [t.detach().requires_grad_() for t in (q, ck, cv)], dout


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_gpu_cmp_opcheck(causal):
    (q, ck, cv), _ = _gpu_inputs()
    torch.library.opcheck(torch.ops.nsa.compressed_attention.default, (q, ck, cv, 2, 16, 8, causal, 0.125, 0))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_gpu_cmp_compile_matches_eager(causal):
    (q, ck, cv), dout = _gpu_inputs()

    def f(q, ck, cv):
        out, _ = compressed.compressed_attention(q, ck, cv, num_mem=2, block_size=16, stride=8, causal=causal,
                                                     scale=0.125, return_logits=False)
        return out

    eager = f(q, ck, cv)
    grads_eager = torch.autograd.grad(eager, (q, ck, cv), dout)
    compiled = torch.compile(f, fullgraph=True)(q, ck, cv)
    grads_compiled = torch.autograd.grad(compiled, (q, ck, cv), dout)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, b)
