"""Sliding-window attention kernels (templates/window_{fwd,bwd}.py.j2, nsa_codegen/kernels/window.py).

Interpreter lane (CPU, TRITON_INTERPRET=1, fp32 + fp16, small shapes): forward, lse and every gradient
against nsa_codegen.reference under the numerics rule (conftest.py), outputs poisoned with NaN before the
launch and checked written; strided (packed qkv) inputs; query offsets; validation errors; the
torch.library op's CPU path; the resource model and the structure of the rendered sources. GPU lane
(`pytest -m gpu`, bf16 + fp16 on CUDA): the same comparison at d 64 / 128 and n up to 4096, `opcheck`,
torch.compile(fullgraph=True) forward + backward vs eager, and the sympy model vs the compiled kernels'
shared memory / registers. With $NSA_TEST_REPORT_DIR (or $OUT) set, the GPU lane appends its errors and
that comparison to dense_kernels_gpu.jsonl there.
"""
from __future__ import annotations

import pytest
import torch

from conftest import assert_numerics, interpreter_lane as interpreter
from dense_kernel_helpers import LaunchRecorder, assert_backward_uses_exact_delta, gpu_report, make_inputs
from nsa_codegen import reference
from nsa_codegen.kernels import window as window_ops  # `window` is the window size in these tests

SMALL_TILES = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 1}  # many tiles: every loop stage runs


# ----------------------------------------------------------------------------------------------------
# helpers (shared ones in dense_kernel_helpers.py)


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
    out, lse = window_ops.sliding_window_fwd_launch(q, k, v, config=config, **kw)
    dq, dk, dv = window_ops.sliding_window_bwd_launch(q, k, v, out, lse, dout, config=config, **kw)
    ref32 = reference_grads(q, k, v, dout, torch.float32, **kw)
    low = reference_grads(q, k, v, dout, dtype, **kw) if dtype != torch.float32 else ref32
    errs = {}
    for name, got, r32, rlow in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref32, low):
        assert got.dtype == dtype
        errs[name] = assert_numerics(name, got, r32, None if dtype == torch.float32 else rlow)[0]
    lse_ref = reference.sliding_window_lse(q.float(), k.float(), **kw)
    assert not torch.isnan(lse).any(), "lse: NaN (an element left unwritten?)"
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite] - lse_ref[finite]).abs().max().item() <= 1e-3 if finite.any() else True
    return errs


def config_for(group, block_m=None):
    """Narrow tiles (BLOCK_N = 16, few tokens per tile) so that every loop stage runs on short inputs."""
    return {**SMALL_TILES, "BLOCK_M": block_m or max(32, 4 * group)}


# ----------------------------------------------------------------------------------------------------
# interpreter lane


@interpreter
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("window", [0, 3, 16])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("group", [1, 2, 4, 16])
def test_window_fp32(group, causal, window):
    """n = 77 (31 for G = 16) with narrow tiles: several query tiles and key tiles, masked edges."""
    run_and_compare(1, 31 if group == 16 else 77, group, 1, 32, window, causal, torch.float32,
                    config=config_for(group), seed=group * 10 + window)


@interpreter
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("group", [1, 4])
def test_window_wide_band_runs_unmasked_interior(group, causal):
    """W = 40 > two tiles: the unmasked interior stage runs between the masked edges."""
    run_and_compare(1, 77, group, 1, 32, 40, causal, torch.float32, config=config_for(group, max(16, 8 * group)),
                    seed=40 + group)


@interpreter
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("n", [1, 31])
def test_window_short_default_config(n, causal, dtype):
    """The launcher's own config choice; n = 1, and n = 31 with W = 100 > n (the whole sequence)."""
    run_and_compare(2, n, 4, 2, 32, 3 if n == 1 else 100, causal, dtype, seed=n)


@interpreter
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("group,window", [(1, 16), (4, 3), (16, 0)])
def test_window_fp16(group, window, causal):
    run_and_compare(1, 31 if group == 16 else 77, group, 1, 32, window, causal, torch.float16,
                    config=config_for(group), seed=100 + group)


@interpreter
@pytest.mark.usefixtures("poison")
def test_window_group_not_power_of_two_and_head_dim_padding():
    """G = 3 leaves padding rows in the tile; d = 40 pads to a 64-wide tile."""
    run_and_compare(1, 31, 3, 1, 40, 5, True, torch.float32, config=config_for(3, 16), seed=7)
    run_and_compare(1, 31, 3, 1, 40, 5, False, torch.float32, config=config_for(3, 16), seed=8)


@interpreter
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_window_query_offset(causal):
    """Decoding-style calls: 5 queries at positions 20..24 against 25 keys, and queries past the keys
    (some rows without any key: out 0, lse -inf, no NaN in the gradients)."""
    run_and_compare(1, 5, 2, 1, 32, 7, causal, torch.float32, config=config_for(1), offset=20)
    run_and_compare(1, 5, 2, 1, 32, 2, causal, torch.float32, config=config_for(1), offset=26, nk=25)


@interpreter
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("group", [1, 4])
def test_window_backward_uses_exact_delta(group, causal):
    """The backward computes its own fp32 delta (dense_kernel_helpers.assert_backward_uses_exact_delta).
    Offset 3 with one key fewer than positions: the first query rows see few keys."""
    b, n, K, d, window, offset = 2, 77, 2, 32, 9, 3
    H = group * K
    q, k, v, dout = make_inputs(b, n, n + offset - 1, H, K, d, torch.float32, "cpu", 500 + group)
    kw = dict(window=window, causal=causal, scale=d ** -0.5, query_offset=offset)
    assert_backward_uses_exact_delta(
        window_ops.sliding_window_fwd_launch, window_ops.sliding_window_bwd_launch, q, k, v, dout,
        reference_grads(q, k, v, dout, torch.float32, **kw)[1:], ("dq", "dk", "dv"), config=config_for(group), **kw)


@interpreter
def test_window_op_cpu_path_is_the_reference():
    q, k, v, dout = make_inputs(1, 20, 20, 4, 2, 16, torch.float32, "cpu", 3)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = torch.ops.nsa.sliding_window_attention(q, k, v, 4, True, 0.25, 0)
    out.backward(dout)
    ref = reference_grads(q, k, v, dout, torch.float32, window=4, causal=True, scale=0.25)
    torch.testing.assert_close(out, ref[0])
    for got, r in zip((q.grad, k.grad, v.grad), ref[1:]):
        torch.testing.assert_close(got, r)
    torch.testing.assert_close(lse, reference.sliding_window_lse(q.detach(), k.detach(), window=4, causal=True,
                                                                 scale=0.25))
    public = window_ops.sliding_window_attention(q, k, v, window=4, causal=True, scale=0.25)
    torch.testing.assert_close(public, ref[0])


def _valid_args(d=16, dtype=torch.float16):
    return dict(
        q=torch.randn(1, 8, 4, d, dtype=dtype), k=torch.randn(1, 8, 2, d, dtype=dtype),
        v=torch.randn(1, 8, 2, d, dtype=dtype), window=2, causal=True, scale=0.25, query_offset=0,
    )


def _bad_args():
    cases = []

    def case(word, **change):
        args = _valid_args()
        args.update(change)
        cases.append(pytest.param(args, word, id=word.replace(" ", "_")))

    case("window", window=-1)
    case("window", window=2.5)
    case("causal", causal=1)
    case("scale", scale="x")
    case("query_offset", query_offset=-3)
    case("share one dtype", q=torch.randn(1, 8, 4, 16))
    case("q dtype", q=torch.randn(1, 8, 4, 16).to(torch.int32))
    case("mismatched heads", k=torch.randn(1, 8, 3, 16, dtype=torch.float16), v=torch.randn(1, 8, 3, 16, dtype=torch.float16))
    case("head dim", **{n: t[..., :12] for n, t in _valid_args().items() if n in "qkv"})
    case("contiguous last dim", q=torch.randn(1, 8, 16, 4, dtype=torch.float16).transpose(-1, -2))
    case("same shape", v=torch.randn(1, 7, 2, 16, dtype=torch.float16))
    case("4-D", q=torch.randn(8, 4, 16, dtype=torch.float16))
    case("torch.Tensor", k=[1.0])
    return cases


KERNEL_ONLY = ("head dim", "contiguous last dim")  # limits of the kernels; the reference path takes these


@pytest.mark.parametrize("args, word", _bad_args())
def test_window_validation_errors(args, word):
    with pytest.raises((ValueError, TypeError), match=word):
        window_ops.sliding_window_fwd_launch(**args)
    if word in KERNEL_ONLY:  # the public op routes CPU tensors to the reference, which computes them
        args = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        got = window_ops.sliding_window_attention(**args)
        want = reference.sliding_window_attention(**args)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        return
    with pytest.raises((ValueError, TypeError), match=word):
        window_ops.sliding_window_attention(**args)


def test_window_launcher_rejects_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="CUDA tensors"):
        window_ops.sliding_window_fwd_launch(q, q, q, window=2, causal=True, scale=0.25)


# ----------------------------------------------------------------------------------------------------
# GPU lane


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("group", [1, 4, 16])
@pytest.mark.parametrize("n,window", [(77, 0), (1000, 64), (4096, 512)])
def test_gpu_window_matches_reference(n, window, group, causal, d, dtype):
    errs = run_and_compare(1, n, group * 2, 2, d, window, causal, dtype, seed=n + group, device="cuda")
    gpu_report({"test": "window", "n": n, "window": window, "group": group, "causal": causal, "d": d,
                "dtype": str(dtype), "errors": errs})


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
        return window_ops.sliding_window_attention(q, k, v, window=32, causal=causal, scale=0.125)

    eager = f(q, k, v)
    grads_eager = torch.autograd.grad(eager, (q, k, v), dout)
    compiled = torch.compile(f, fullgraph=True)(q, k, v)
    grads_compiled = torch.autograd.grad(compiled, (q, k, v), dout)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------------
# generator side: resource model and structure of the rendered sources (no kernels run)


@pytest.mark.parametrize("family", ["window_fwd", "window_bwd", "cmp_fwd", "cmp_bwd"])
@pytest.mark.parametrize("group", [1, 3, 16, 128])
def test_dense_tile_configs_fit_and_render(family, group):
    from nsa_codegen.codegen import resources
    from nsa_codegen.codegen.resources import dense as resources_dense
    from nsa_codegen.codegen.render import render
    from nsa_codegen.codegen.spec import VariantSpec

    spec = VariantSpec(family, 0, group, True)
    kept, dropped = resources_dense.tile_configs(spec)
    assert kept, dropped
    for c in kept:
        assert c["BLOCK_M"] >= group
        pred = resources_dense.predict(spec, c, resources.MAX_HEAD_DIM, 2)
        assert pred["shared"] <= resources.SMEM_LIMIT and pred["n_regs"] > 0
        assert c["max_d16"] >= c["max_d32"]
    for line in dropped:
        assert "BLOCK_M < G" in line or "shared memory" in line
    for causal in (True, False):
        source = render(VariantSpec(family, 0, group, causal))
        compile(source, spec.name, "exec")
        assert f"GROUP = {group}\n" in source and f"CAUSAL = {causal}\n" in source
        # structural: G = 1 has no head packing, a power-of-two G no padding rows
        assert ("rows // " in source) == (group > 1)
        assert ("rows < TOKENS" in source) == (group not in (1, 2, 4, 8, 16, 32, 64, 128))


@pytest.mark.parametrize("family", ["window_fwd", "window_bwd", "cmp_fwd", "cmp_bwd"])
def test_dense_sources_have_no_dead_branches(family):
    from nsa_codegen.codegen.render import render
    from nsa_codegen.codegen.spec import VariantSpec

    causal = render(VariantSpec(family, 0, 4, True))
    noncausal = render(VariantSpec(family, 0, 4, False))
    if family.startswith("window"):
        assert "key[None, :] <= pos[:, None]" in causal or "key[:, None] <= pos[None, :]" in causal
        assert "pos[:, None] + WINDOW" in noncausal or "pos[None, :] + WINDOW" in noncausal
        assert "+ WINDOW)" not in causal
    else:
        assert "// STRIDE" in causal and "// STRIDE" not in noncausal
        assert "pos = " not in noncausal and "pos[" not in noncausal


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 16])
def test_gpu_dense_resource_model_vs_compiled(group, d):
    """Prints the sympy model's shared memory / registers beside the compiled kernels' (the closing note's
    comparison); asserts only that the compiled kernels fit the H100/H200 shared-memory limit."""
    from nsa_codegen.codegen import resources
    from nsa_codegen.codegen.resources import dense as resources_dense
    from nsa_codegen.kernels import compressed

    q, k, v, dout = make_inputs(1, 512, 512, 2 * group, 2, d, torch.bfloat16, "cuda", 5)
    runs = []
    rec = LaunchRecorder()
    out, lse = window_ops._fwd(q, k, v, 64, True, d ** -0.5, 0, rec)
    runs.append((window_ops.variant_specs(q, k, True)[0], list(rec.launched)))
    rec.launched.clear()
    window_ops._bwd(q, k, v, out, lse, dout, 64, True, d ** -0.5, 0, rec)
    runs.append((window_ops.variant_specs(q, k, True)[1], list(rec.launched)))
    ck, cv = k[:, :40], v[:, :40]
    rec.launched.clear()
    out, lse = compressed._fwd(q, ck, cv, 1, 16, True, d ** -0.5, 0, rec)
    runs.append((compressed.variant_specs(q, ck, True)[0], list(rec.launched)))
    rec.launched.clear()
    compressed._bwd(q, ck, cv, out, lse, dout, 1, 16, True, d ** -0.5, 0, rec)
    runs.append((compressed.variant_specs(q, ck, True)[1], list(rec.launched)))
    for spec, launched in runs:
        for name, kwargs, compiled in launched:
            config = {key: kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}
            pred = resources_dense.predict(spec, config, d, 2)
            shared = compiled.metadata.shared
            gpu_report({"test": "resources", "variant": spec.name, "kernel": name, "d": d, "config": config,
                        "model_shared": pred["shared"], "model_regs": pred["n_regs"], "compiled_shared": shared,
                        "compiled_regs": getattr(compiled, "n_regs", None),
                        "compiled_spills": getattr(compiled, "n_spills", None)})
            assert shared <= resources.SMEM_LIMIT
