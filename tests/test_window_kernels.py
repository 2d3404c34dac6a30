"""Sliding-window attention kernels (templates/window_{fwd,bwd}.py.j2, nsa_codegen/ops_window.py).

Interpreter lane (CPU, TRITON_INTERPRET=1, fp32 + fp16, small shapes): forward, lse and every gradient
against nsa_codegen.reference under design.md's numerics rule, outputs poisoned with NaN before the
launch and checked written; strided (packed qkv) inputs; query offsets; validation errors; the
torch.library op's CPU path. GPU lane (`pytest -m gpu`, bf16 + fp16 on CUDA): the same comparison at
d 64 / 128 and n up to 4096, `opcheck`, and torch.compile(fullgraph=True) forward + backward vs eager.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any generated kernel is imported

from nsa_codegen import ops_window, reference  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interpreter = pytest.mark.skipif(not INTERPRET, reason="interpreter lane (TRITON_INTERPRET=1, CPU)")
gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SMALL_TILES = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 1}  # many tiles: every loop stage runs


# ----------------------------------------------------------------------------------------------------
# helpers


def assert_close(name, got, ref32, ref_low, dtype):
    """design.md: fp32 -> max|got - ref32| <= 1e-4 relative; else <= 2 * max|ref_low - ref32| + 1e-5.
    Prints the worst mismatch on failure."""
    got, ref32 = got.float(), ref32.float()
    assert not torch.isnan(got).any(), f"{name}: NaN in the output (an element left unwritten?)"
    diff = (got - ref32).abs()
    err = diff.max().item() if diff.numel() else 0.0
    if dtype == torch.float32:
        tol = 1e-4 * (ref32.abs().max().item() if ref32.numel() else 0.0) + 1e-6
    else:
        tol = 2 * (ref_low.float() - ref32).abs().max().item() + 1e-5
    if err > tol:
        idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise AssertionError(
            f"{name}: max err {err:.3e} > tol {tol:.3e} at {idx}: got {got[idx].item():.6g}, ref {ref32[idx].item():.6g}"
        )
    return err


@pytest.fixture
def poison(monkeypatch):
    """Every kernel output starts as NaN, so an element the kernels skip shows up."""

    def alloc(shape, device, dtype):
        return torch.full(tuple(shape), float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(ops_window, "alloc_output", alloc)


def make_inputs(b, nq, nk, H, K, d, dtype, device, seed):
    """q, k, v as strided views of one packed tensor (last dim contiguous, nothing copied); dout strided too."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(b, nq, H + 1, d, generator=g)[:, :, :H].to(device=device, dtype=dtype)
    kv = torch.randn(b, nk, 2 * K, d, generator=g).to(device=device, dtype=dtype)
    k, v = kv[:, :, :K], kv[:, :, K:]
    dout = torch.randn(b, H, nq, d, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    return q, k, v, dout


def reference_grads(q, k, v, dout, dtype, **kw):
    """Reference output and gradients with inputs cast to `dtype`."""
    qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = reference.sliding_window_attention(qq, kk, vv, **kw)
    out.backward(dout.to(dtype))
    return out.detach(), qq.grad, kk.grad, vv.grad


def run_and_compare(b, nq, H, K, d, window, causal, dtype, *, config=None, offset=0, nk=None, seed=0,
                    device="cpu"):
    nk = nq + offset if nk is None else nk
    q, k, v, dout = make_inputs(b, nq, nk, H, K, d, dtype, device, seed)
    scale = d ** -0.5
    kw = dict(window=window, causal=causal, scale=scale, query_offset=offset)
    out, lse = ops_window.sliding_window_fwd_launch(q, k, v, config=config, **kw)
    dq, dk, dv = ops_window.sliding_window_bwd_launch(q, k, v, out, lse, dout, config=config, **kw)
    ref32 = reference_grads(q, k, v, dout, torch.float32, **kw)
    low = reference_grads(q, k, v, dout, dtype, **kw) if dtype != torch.float32 else ref32
    errs = {}
    for name, got, r32, rlow in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref32, low):
        assert got.dtype == dtype and got.shape == r32.shape
        errs[name] = assert_close(name, got, r32, rlow, dtype)
    lse_ref = ops_window.reference_lse(q.float(), k.float(), window, causal, scale, offset)
    assert not torch.isnan(lse).any(), "lse: NaN (an element left unwritten?)"
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite] - lse_ref[finite]).abs().max().item() <= 1e-3 if finite.any() else True
    return errs


def config_for(group, block_m=None):
    return {**SMALL_TILES, "BLOCK_M": block_m or max(16, group)}


# ----------------------------------------------------------------------------------------------------
# interpreter lane


@interpreter
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("window", [0, 3, 16])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("group", [1, 2, 4, 16])
def test_window_fp32_small_tiles(group, causal, window):
    """n = 77 with 16-row tiles: several query tiles and key tiles, all three loop stages."""
    heads = group * (1 if group == 16 else 2)
    run_and_compare(1, 77, heads, heads // group, 32, window, causal, torch.float32,
                    config=config_for(group), seed=group * 10 + window)


@interpreter
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("n", [1, 31])
def test_window_short_default_config(n, causal, dtype):
    """The launcher's own config choice; n = 1 and a partial tile."""
    run_and_compare(2, n, 4, 2, 32, 3, causal, dtype, seed=n)


@interpreter
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("group,window", [(1, 16), (4, 3), (16, 0)])
def test_window_fp16(group, window, causal):
    heads = group * (1 if group == 16 else 2)
    run_and_compare(1, 77, heads, heads // group, 32, window, causal, torch.float16,
                    config=config_for(group, 32), seed=100 + group)


@interpreter
@pytest.mark.usefixtures("poison")
def test_window_group_not_power_of_two_and_head_dim_padding():
    """G = 3 leaves padding rows in the tile; d = 40 pads to a 64-wide tile."""
    run_and_compare(1, 31, 6, 2, 40, 5, True, torch.float32, config=config_for(3), seed=7)
    run_and_compare(1, 31, 6, 2, 40, 5, False, torch.float32, config=config_for(3), seed=8)


@interpreter
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_window_query_offset(causal):
    """Decoding-style calls: 5 queries at positions 20..24 against 25 keys, and queries past the keys
    (some rows without any key: out 0, lse -inf, no NaN in the gradients)."""
    run_and_compare(1, 5, 2, 1, 32, 7, causal, torch.float32, config=config_for(1), offset=20)
    run_and_compare(1, 5, 2, 1, 32, 2, causal, torch.float32, config=config_for(1), offset=26, nk=25)


@interpreter
def test_window_op_cpu_path_is_the_reference():
    q, k, v, dout = make_inputs(1, 20, 4, 2, 16, torch.float32, "cpu", 3)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = torch.ops.nsa.sliding_window_attention(q, k, v, 4, True, 0.25, 0)
    out.backward(dout)
    ref = reference_grads(q, k, v, dout, torch.float32, window=4, causal=True, scale=0.25)
    torch.testing.assert_close(out, ref[0])
    for got, r in zip((q.grad, k.grad, v.grad), ref[1:]):
        torch.testing.assert_close(got, r)
    torch.testing.assert_close(lse, ops_window.reference_lse(q.detach(), k.detach(), 4, True, 0.25))
    public = ops_window.sliding_window_attention(q, k, v, window=4, causal=True, scale=0.25)
    torch.testing.assert_close(public, ref[0])


@pytest.mark.parametrize(
    "change, word",
    [
        (dict(window=-1), "window"),
        (dict(window=2.5), "window"),
        (dict(causal=1), "causal"),
        (dict(scale="x"), "scale"),
        (dict(query_offset=-3), "query_offset"),
        (dict(q=lambda q: q.float()), "dtype"),
        (dict(q=lambda q: q.to(torch.int32)), "q dtype"),
        (dict(k=lambda k: k[:, :, :1].expand(-1, -1, 3, -1)), "mismatched heads"),
        (dict(q=lambda q: q[..., :12]), "head dim"),
        (dict(q=lambda q: q.transpose(-1, -2)), "contiguous last dim"),
        (dict(v=lambda v: v[:, :-1]), "same shape"),
        (dict(q=lambda q: q[:, :, :, None]), "4-D"),
    ],
)
def test_window_validation_errors(change, word):
    q = torch.randn(1, 8, 4, 16, dtype=torch.float16)
    k = torch.randn(1, 8, 2, 16, dtype=torch.float16)
    v = torch.randn(1, 8, 2, 16, dtype=torch.float16)
    args = dict(q=q, k=k, v=v, window=2, causal=True, scale=0.25, query_offset=0)
    for key, val in change.items():
        args[key] = val(args[key]) if callable(val) else val
    if "q" in change and word == "head dim":
        args["q"] = torch.randn(1, 8, 4, 12, dtype=torch.float16)
        args["k"] = args["v"] = torch.randn(1, 8, 2, 12, dtype=torch.float16)
    if "q" in change and word == "contiguous last dim":
        args["q"] = torch.randn(1, 8, 16, 4, dtype=torch.float16).transpose(-1, -2)
        args["k"] = torch.randn(1, 8, 16, 2, dtype=torch.float16).transpose(-1, -2)
        args["v"] = args["k"]
    with pytest.raises((ValueError, TypeError), match=word):
        ops_window.sliding_window_fwd_launch(**args)
    with pytest.raises((ValueError, TypeError), match=word):
        ops_window.sliding_window_attention(**args)


def test_window_launcher_rejects_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="CUDA tensors"):
        ops_window.sliding_window_fwd_launch(q, q, q, window=2, causal=True, scale=0.25)


# ----------------------------------------------------------------------------------------------------
# GPU lane


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("group", [1, 4, 16])
@pytest.mark.parametrize("n,window", [(1000, 64), (4096, 512), (77, 0)])
@pytest.mark.parametrize("marks", [0], ids=[""])
def test_gpu_window_matches_reference(n, window, group, causal, d, dtype, marks, request):
    for m in gpu:
        request.applymarker(m)
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    heads = group * 2
    errs = run_and_compare(1, n, heads, 2, d, window, causal, dtype, seed=n + group, device="cuda")
    print(f"window n={n} W={window} G={group} causal={causal} d={d} {dtype}: {errs}")


def _gpu_inputs(dtype=torch.bfloat16, n=300, H=8, K=2, d=64):
    q, k, v, dout = make_inputs(2, n, n, H, K, d, dtype, "cuda", 11)
    return [t.detach().requires_grad_() for t in (q, k, v)], dout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_gpu_window_opcheck(causal):
    (q, k, v), _ = _gpu_inputs()
    torch.library.opcheck(torch.ops.nsa.sliding_window_attention.default, (q, k, v, 32, causal, 0.125, 0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_gpu_window_compile_matches_eager(causal):
    (q, k, v), dout = _gpu_inputs()

    def f(q, k, v):
        return ops_window.sliding_window_attention(q, k, v, window=32, causal=causal, scale=0.125)

    eager = f(q, k, v)
    grads_eager = torch.autograd.grad(eager, (q, k, v), dout)
    compiled = torch.compile(f, fullgraph=True)(q, k, v)
    grads_compiled = torch.autograd.grad(compiled, (q, k, v), dout)
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)
    for a, b in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
