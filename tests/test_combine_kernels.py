"""Gated-combine kernels (templates/combine_{fwd,bwd}.py.j2, nsa_codegen/kernels/combine.py).

Interpreter lane (CPU, TRITON_INTERPRET=1, fp32 + fp16): the output and every gradient (the three branch
outputs and the gates) against nsa_codegen.reference.gated_combine under the numerics rule (conftest.py),
outputs poisoned with NaN before the launch and checked written; odd shapes (n = 1, H = 1, head dims that
are not powers of two, b > 1), strided inputs, tiles that split the rows unevenly, empty inputs; validation
errors; the torch.library op's CPU path and its registration (opcheck without a GPU); the rendered
sources (one load of each input, one store of each output). GPU lane (`pytest -m gpu`, bf16 + fp16 on
CUDA): the same comparison up to n = 4096, through the launchers and through the op's autograd, `opcheck`,
torch.compile(fullgraph=True) forward + backward vs eager, no register spills, and the fused op against
the eager formula at n = 65536, H = 64, d = 128 (bytes moved and time). With $NSA_TEST_REPORT_DIR (or
$OUT) set, the GPU lane appends its results to dense_kernels_gpu.jsonl there.
"""
from __future__ import annotations

import os
import re

import pytest
import torch

from conftest import assert_numerics, interpreter_lane as interpreter
from dense_kernel_helpers import LaunchRecorder, gpu_report
from nsa_codegen import reference
from nsa_codegen.kernels import combine

NAMES = ("out", "d_o_cmp", "d_o_slc", "d_o_swa", "d_gates")


# ----------------------------------------------------------------------------------------------------
# helpers


def make_inputs(b, n, H, d, dtype, device="cpu", seed=0, strided=True):
    """o_cmp, o_slc, o_swa (b, n, H, d), gates (b, n, 3H) in (0, 1) (sigmoid of fresh draws) and dout.
    Strided: every tensor a view with its own strides (the branch outputs and dout keep a unit last dim,
    the gates do not), nothing copied."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if not strided:
        o = [draw(b, n, H, d) for _ in range(3)]
        return (*o, torch.sigmoid(draw(b, n, 3 * H).float()).to(dtype), draw(b, n, H, d))
    o_cmp = draw(b, n, H + 1, d)[:, :, 1:]  # a slice of packed heads
    o_slc = draw(b, H, n, d).transpose(1, 2)  # heads-major
    o_swa = draw(b, n, H, 2 * d)[..., :d]  # rows of 2d
    gates = torch.sigmoid(draw(b, n, 3 * H, 2).float()).to(dtype)[..., 1]  # last-dim stride 2
    dout = draw(n, b, H, d).transpose(0, 1)  # batch stride below the token stride
    return o_cmp, o_slc, o_swa, gates, dout


def reference_grads(o_cmp, o_slc, o_swa, gates, dout, dtype):
    """Reference output and gradients (autograd through the eager formula) with inputs cast to `dtype`."""
    xs = [t.detach().to(dtype).requires_grad_() for t in (o_cmp, o_slc, o_swa, gates)]
    out = reference.gated_combine(*xs)
    out.backward(dout.to(dtype))
    return (out.detach(), *(x.grad for x in xs))


def run_and_compare(b, n, H, d, dtype, *, config=None, seed=0, device="cpu", strided=True):
    o_cmp, o_slc, o_swa, gates, dout = make_inputs(b, n, H, d, dtype, device, seed, strided)
    out = combine.gated_combine_fwd_launch(o_cmp, o_slc, o_swa, gates, config=config)
    grads = combine.gated_combine_bwd_launch(o_cmp, o_slc, o_swa, gates, dout, config=config)
    ref32 = reference_grads(o_cmp, o_slc, o_swa, gates, dout, torch.float32)
    low = reference_grads(o_cmp, o_slc, o_swa, gates, dout, dtype) if dtype != torch.float32 else ref32
    errs = {}
    for name, got, r32, rlow in zip(NAMES, (out, *grads), ref32, low):
        assert got.dtype == dtype and got.device == o_cmp.device, name
        errs[name] = assert_numerics(name, got, r32, None if dtype == torch.float32 else rlow)[0]
    return errs


# ----------------------------------------------------------------------------------------------------
# interpreter lane

SHAPES = [  # (b, n, H, d)
    (1, 1, 1, 16),  # one row
    (2, 7, 3, 40),  # b > 1, d = 40 pads to 64
    (1, 33, 4, 64),  # several programs, the last one partly empty
    (2, 5, 1, 24),  # H = 1
    (1, 3, 2, 12),  # d below the smallest tile (16)
    (1, 2, 2, 256),  # the largest head dim
    (3, 1, 2, 128),  # n = 1 per batch element
]


@interpreter
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("strided", [True, False], ids=["strided", "contiguous"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_combine_fp32(shape, strided):
    run_and_compare(*shape, torch.float32, seed=sum(shape), strided=strided)


@interpreter
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_combine_fp16(shape):
    run_and_compare(*shape, torch.float16, seed=100 + sum(shape))


@interpreter
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("rows", [1, 4, 16])
def test_combine_small_tiles(rows):
    """BLOCK_R that does not divide b * n * H = 42: rows split across programs, the last one partial."""
    run_and_compare(2, 7, 3, 40, torch.float32, config={"BLOCK_R": rows, "num_warps": 4}, seed=rows)


@interpreter
@pytest.mark.usefixtures("poison")
def test_combine_default_config_is_4096_elements_per_tile():
    """The launcher's own choice: BLOCK_R * BLOCK_D = 4096 at every head dim (resources/combine.py)."""
    from nsa_codegen.codegen import cache

    for spec in combine.variant_specs():
        module = cache.load_variant(spec)
        for d in (16, 40, 64, 128, 256):
            constexprs, launch = combine._config(module, d, torch.float16)
            assert constexprs["BLOCK_R"] * constexprs["BLOCK_D"] == 4096 and launch["num_warps"] == 4


@interpreter
@pytest.mark.usefixtures("poison")
def test_combine_incoming_gradient_without_unit_last_dim():
    """dout of out.sum() is an expanded scalar (stride 0 everywhere): the backward copies it once."""
    o_cmp, o_slc, o_swa, gates, _ = make_inputs(2, 5, 3, 24, torch.float32, seed=9)
    dout = torch.tensor(0.75).expand(2, 5, 3, 24)
    grads = combine.gated_combine_bwd_launch(o_cmp, o_slc, o_swa, gates, dout)
    for name, got, want in zip(NAMES[1:], grads, reference_grads(o_cmp, o_slc, o_swa, gates, dout, torch.float32)[1:]):
        assert_numerics(name, got, want)


@interpreter
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("shape", [(2, 0, 3, 16), (0, 4, 3, 16), (1, 4, 2, 0)], ids=["n0", "b0", "d0"])
def test_combine_empty(shape):
    """Nothing to launch: empty outputs, zero gradients (d = 0: the gate gradients are empty sums)."""
    o_cmp, o_slc, o_swa, gates, dout = make_inputs(*shape, torch.float32, strided=False)
    out = combine.gated_combine_fwd_launch(o_cmp, o_slc, o_swa, gates)
    grads = combine.gated_combine_bwd_launch(o_cmp, o_slc, o_swa, gates, dout)
    assert out.shape == o_cmp.shape
    for got, t in zip(grads, (o_cmp, o_slc, o_swa, gates)):
        assert got.shape == t.shape and not got.isnan().any() and not got.any()


def test_op_cpu_path_is_the_reference():
    """torch.ops.nsa.gated_combine on CPU tensors: the reference forward; its registered autograd runs the
    backward op's CPU kernel (the closed form) and equals autograd through the eager formula."""
    o_cmp, o_slc, o_swa, gates, dout = make_inputs(2, 6, 3, 20, torch.float32, seed=4)
    xs = [t.detach().requires_grad_() for t in (o_cmp, o_slc, o_swa, gates)]
    out = torch.ops.nsa.gated_combine(*xs)
    out.backward(dout)
    want = reference_grads(o_cmp, o_slc, o_swa, gates, dout, torch.float32)
    torch.testing.assert_close(out, want[0], rtol=0, atol=0)
    for name, x, w in zip(NAMES[1:], xs, want[1:]):
        torch.testing.assert_close(x.grad, w, msg=name)


def test_public_op_routes_and_reports():
    o_cmp, o_slc, o_swa, gates, _ = make_inputs(1, 4, 2, 16, torch.float32, seed=2)
    want = reference.gated_combine(o_cmp, o_slc, o_swa, gates)
    for use_kernels in (True, False):
        paths = {}
        got = combine.gated_combine(o_cmp, o_slc, o_swa, gates, use_kernels=use_kernels, paths=paths)
        assert paths == {"combine": "reference"}  # CPU tensors: the reference either way
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_module_combine_equals_the_eager_formula():
    """The module's combine through the op equals, bit for bit on CPU, the eager formula it replaced
    (gates from to_strategy_combine, cast to the branches' dtype, (h s) layout)."""
    from nsa_codegen import SparseAttention

    torch.manual_seed(6)
    attn = SparseAttention(dim=32, dim_head=16, heads=3, sliding_window_size=2, compress_block_size=4,
                           selection_block_size=4, num_selected_blocks=1)
    with torch.no_grad():
        attn.to_strategy_combine[0].weight.normal_()
    hx = torch.randn(2, 5, 32)
    o = [torch.randn(2, 5, 3, 16) for _ in range(3)]
    got = attn._combine(hx, *o)
    gates = attn.to_strategy_combine(hx).reshape(2, 5, 3, 3, 1)
    eager = gates[..., 0, :] * o[0] + gates[..., 1, :] * o[1] + gates[..., 2, :] * o[2]
    torch.testing.assert_close(got, attn.combine_heads(eager.reshape(2, 5, 48)), rtol=0, atol=0)
    assert attn.last_paths == {"combine": "reference"}


def test_opcheck_without_a_gpu():
    """torch.library.opcheck's schema, autograd-registration and fake-tensor checks of both ops, in a subprocess
    without the interpreter (under TRITON_INTERPRET=1 fake tensors would reach the interpreter). The
    AOT-dispatch check needs a GPU to trace the Triton kernel: the GPU lane runs it."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from nsa_codegen.kernels import combine  # registers the ops\n"
        "g = torch.Generator().manual_seed(0)\n"
        "o = [torch.randn(2, 5, 3, 16, generator=g).requires_grad_() for _ in range(3)]\n"
        "gates = torch.rand(2, 5, 9, generator=g).requires_grad_()\n"
        "utils = ('test_schema', 'test_autograd_registration', 'test_faketensor')\n"
        "torch.library.opcheck(torch.ops.nsa.gated_combine.default, (*o, gates), test_utils=utils)\n"
        "bargs = (*(t.detach() for t in o), gates.detach(), torch.randn(2, 5, 3, 16, generator=g))\n"
        "torch.library.opcheck(torch.ops.nsa.gated_combine_backward.default, bargs, test_utils=utils)\n"
        "print('opcheck ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "opcheck ok" in res.stdout, res.stderr[-3000:]


def _valid_args(d=16, dtype=torch.float16):
    g = torch.Generator().manual_seed(1)
    o = [torch.randn(1, 4, 2, d, generator=g).to(dtype) for _ in range(3)]
    return dict(o_cmp=o[0], o_slc=o[1], o_swa=o[2], gates=torch.rand(1, 4, 6, generator=g).to(dtype))


def _bad_args():
    cases = []

    def case(word, **change):
        args = _valid_args()
        args.update(change)
        cases.append(pytest.param(args, word, id=word.replace(" ", "_")))

    case("torch.Tensor", o_slc=[1.0])
    case("o_cmp must be 4-D", o_cmp=torch.randn(4, 2, 16, dtype=torch.float16))
    case("o_swa dtype", o_swa=torch.randn(1, 4, 2, 16).to(torch.int32))
    case("share one dtype", gates=torch.rand(1, 4, 6))
    case("same shape", o_slc=torch.randn(1, 4, 3, 16, dtype=torch.float16))
    case("gates must have shape", gates=torch.rand(1, 4, 2, 3, dtype=torch.float16))
    case("gates must have shape", gates=torch.rand(1, 4, 4, dtype=torch.float16))
    case("one device", o_swa=torch.randn(1, 4, 2, 16, dtype=torch.float16, device="meta"))
    case("head dim", **{n: torch.randn(1, 4, 2, 264, dtype=torch.float16) for n in ("o_cmp", "o_slc", "o_swa")})
    case("contiguous last dim", o_cmp=torch.randn(1, 4, 16, 2, dtype=torch.float16).transpose(-1, -2))
    return cases


KERNEL_ONLY = ("head dim", "contiguous last dim")  # limits of the kernels; the reference path takes these


@pytest.mark.parametrize("args, word", _bad_args())
def test_combine_validation_errors(args, word):
    with pytest.raises((ValueError, TypeError), match=word):
        combine.gated_combine_fwd_launch(**args)
    if word in KERNEL_ONLY:  # the public op routes CPU tensors to the reference, which computes them
        args = {k: v.float() for k, v in args.items()}
        got = combine.gated_combine(**args)
        torch.testing.assert_close(got, reference.gated_combine(**args), rtol=0, atol=0)
        return
    with pytest.raises((ValueError, TypeError), match=word):
        combine.gated_combine(**args)


@pytest.mark.parametrize("change, word", [(dict(use_kernels=1), "use_kernels"), (dict(paths=[]), "paths")])
def test_combine_public_flags_are_checked(change, word):
    with pytest.raises((ValueError, TypeError), match=word):
        combine.gated_combine(**_valid_args(), **change)


def test_combine_backward_checks_dout():
    args = _valid_args(dtype=torch.float32)
    with pytest.raises(ValueError, match="dout must match o_cmp"):
        torch.ops.nsa.gated_combine_backward(*args.values(), torch.randn(1, 4, 2, 8))
    with pytest.raises(ValueError, match="dout must match o_cmp"):
        torch.ops.nsa.gated_combine_backward(*args.values(), torch.randn(1, 4, 2, 16, dtype=torch.float64))


def test_combine_launcher_rejects_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensors"):
        combine.gated_combine_fwd_launch(**_valid_args())


# ----------------------------------------------------------------------------------------------------
# generator side: the resource model and the rendered sources (no kernels run)


def test_combine_is_one_variant_with_configs_for_every_head_dim():
    from nsa_codegen.codegen import resources
    from nsa_codegen.codegen.resources import combine as resources_combine

    for spec in combine.variant_specs():
        kept, dropped = resources_combine.tile_configs(spec)
        assert not dropped and [c["BLOCK_R"] for c in kept] == [256, 128, 64, 32, 16]
        for c in kept:
            assert c["max_d16"] == c["max_d32"] == 4096 // c["BLOCK_R"]  # the tile holds 4096 elements
            assert resources_combine.predict(spec, c, c["max_d16"], 2)["n_regs"] <= resources.REG_LIMIT


def test_combine_sources_touch_each_tensor_once():
    """Memory-bound by construction: the forward loads the three gates and the three branch tiles and stores
    the output once; the backward loads the gates, dout and the three branch tiles, and stores the three
    branch gradients and the three gate gradients once; no loop re-reads anything."""
    from nsa_codegen.codegen.render import render

    fwd, bwd = (render(spec) for spec in combine.variant_specs())
    for source in (fwd, bwd):
        compile(source, "<combine>", "exec")
        assert "for " not in source.split("@triton.jit", 1)[1] and "tl.dot" not in source
    loads = lambda source: re.findall(r"tl\.load\((\w+)", source)  # noqa: E731
    stores = lambda source: re.findall(r"tl\.store\((\w+)", source)  # noqa: E731
    assert loads(fwd) == ["gate", "gate", "gate", "O_CMP", "O_SLC", "O_SWA"]
    assert stores(fwd) == ["OUT"]
    assert loads(bwd) == ["gate", "gate", "gate", "DOUT", "O_CMP", "O_SLC", "O_SWA"]
    assert stores(bwd) == ["d_gate", "D_CMP", "d_gate", "D_SLC", "d_gate", "D_SWA"]


# ----------------------------------------------------------------------------------------------------
# GPU lane

GPU_SHAPES = [(1, 77, 3, 40), (2, 1000, 8, 64), (1, 4096, 16, 128), (2, 300, 4, 256)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=["x".join(map(str, s)) for s in GPU_SHAPES])
def test_gpu_combine_matches_reference(shape, dtype):
    errs = run_and_compare(*shape, dtype, seed=sum(shape), device="cuda")
    gpu_report({"test": "combine", "shape": shape, "dtype": str(dtype), "errors": errs})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_combine_op_autograd_matches_launchers(dtype):
    """torch.ops.nsa.gated_combine forward + registered backward equal the plain launchers bit for bit."""
    o_cmp, o_slc, o_swa, gates, dout = make_inputs(2, 300, 8, 128, dtype, "cuda", 3)
    xs = [t.detach().requires_grad_() for t in (o_cmp, o_slc, o_swa, gates)]
    paths = {}
    out = combine.gated_combine(*xs, paths=paths)
    assert paths == {"combine": "triton"}
    grads = torch.autograd.grad(out, xs, dout)
    want = (combine.gated_combine_fwd_launch(o_cmp, o_slc, o_swa, gates),
            *combine.gated_combine_bwd_launch(o_cmp, o_slc, o_swa, gates, dout))
    for name, got, w in zip(NAMES, (out, *grads), want):
        torch.testing.assert_close(got, w, rtol=0, atol=0, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_combine_opcheck():
    o_cmp, o_slc, o_swa, gates, dout = make_inputs(2, 300, 8, 64, torch.bfloat16, "cuda", 11)
    xs = [t.detach().requires_grad_() for t in (o_cmp, o_slc, o_swa, gates)]
    torch.library.opcheck(torch.ops.nsa.gated_combine.default, tuple(xs))
    torch.library.opcheck(torch.ops.nsa.gated_combine_backward.default, (o_cmp, o_slc, o_swa, gates, dout))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_combine_compile_matches_eager():
    o_cmp, o_slc, o_swa, gates, dout = make_inputs(2, 300, 8, 64, torch.bfloat16, "cuda", 12)
    xs = [t.detach().requires_grad_() for t in (o_cmp, o_slc, o_swa, gates)]

    def f(*args):
        return combine.gated_combine(*args)

    eager = f(*xs)
    grads_eager = torch.autograd.grad(eager, xs, dout)
    compiled = torch.compile(f, fullgraph=True)(*xs)
    grads_compiled = torch.autograd.grad(compiled, xs, dout)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_combine_no_register_spills(d, dtype):
    """The register model (resources/combine.py) against the compiled kernels: no spills at the default tile."""
    o_cmp, o_slc, o_swa, gates, dout = make_inputs(1, 512, 8, d, dtype, "cuda", 5)
    rec = LaunchRecorder()
    combine._fwd(o_cmp, o_slc, o_swa, gates, rec)
    combine._bwd(o_cmp, o_slc, o_swa, gates, dout, rec)
    for (_, kwargs, compiled), name in zip(rec.launched, ("combine_fwd", "combine_bwd")):
        gpu_report({"test": "combine_resources", "kernel": name, "d": d, "dtype": str(dtype),
                    "BLOCK_R": kwargs["BLOCK_R"], "compiled_regs": getattr(compiled, "n_regs", None),
                    "compiled_spills": getattr(compiled, "n_spills", None),
                    "compiled_shared": compiled.metadata.shared})
        assert getattr(compiled, "n_spills", 0) == 0, (name, d, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_combine_bandwidth_against_the_eager_formula():
    """n = 65536, H = 64, d = 128, bf16 (one branch output: 1 GiB). Bytes of the (b, n, H, d) tensors moved,
    in units of one such tensor: the eager formula 12 forward (5 kernels: 3 products, 2 sums; 7 reads,
    5 writes) and 18 backward (per branch: dout * g read 2 / write 1, dout * o_s read 2 / write 1 then its
    sum over d read 1); the kernels 4 forward (3 reads, 1 write) and 7 backward (4 reads, 3 writes). Reports
    both times and the fused kernels' bandwidth; asserts the fused forward + backward at least 1.5x faster."""
    import triton.testing

    b, n, H, d = 1, 65536, 64, 128
    o_cmp, o_slc, o_swa, gates, dout = make_inputs(b, n, H, d, torch.bfloat16, "cuda", 21, strided=False)
    xs = [t.detach().requires_grad_() for t in (o_cmp, o_slc, o_swa, gates)]

    def fused():
        return torch.autograd.grad(combine.gated_combine(*xs), xs, dout)

    def eager():
        return torch.autograd.grad(reference.gated_combine(*xs), xs, dout)

    def fused_fwd():
        with torch.no_grad():
            return combine.gated_combine(*xs)

    def eager_fwd():
        with torch.no_grad():
            return reference.gated_combine(*xs)

    ms = {name: triton.testing.do_bench(fn, warmup=5, rep=50, quantiles=[0.5])
          for name, fn in (("fused_fwd", fused_fwd), ("eager_fwd", eager_fwd), ("fused", fused), ("eager", eager))}
    unit = o_cmp.numel() * o_cmp.element_size()
    gpu_report({"test": "combine_bandwidth", "shape": [b, n, H, d], "dtype": "bf16", "ms": ms,
                "fused_fwd_TBps": 4 * unit / ms["fused_fwd"] / 1e9, "fused_fwdbwd_TBps": 11 * unit / ms["fused"] / 1e9,
                "speedup_fwd": ms["eager_fwd"] / ms["fused_fwd"], "speedup_fwdbwd": ms["eager"] / ms["fused"]})
    print(ms)
    assert ms["eager"] / ms["fused"] >= 1.5, ms
