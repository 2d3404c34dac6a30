"""The gated combine (nsa-spec section 7) on generated Triton kernels.

Layers, fla style: generated kernels (templates/combine_{fwd,bwd}.py.j2) -> plain launchers
(`gated_combine_fwd_launch`, `gated_combine_bwd_launch`: callable under TRITON_INTERPRET=1, no
torch.library) -> `torch.ops.nsa.gated_combine` (a `torch.library.triton_op`, so torch.compile sees the
kernels; autograd via `register_autograd`; CPU kernel = the reference) -> the public `gated_combine`
(same contract as `reference.gated_combine`).

Inputs: the branch outputs o_cmp, o_slc, o_swa (b, n, H, d) and the gates (b, n, 3H) laid out (h s),
s = (compressed, selected, sliding), all of one dtype and device, any strides. The gates are the values
the module's gate produces, after its sigmoid (`SparseAttention.to_strategy_combine`, a user's
`strategy_combine_mlp` included): the op weights the branches by exactly those values, so the module
computes its gates as before and only the weighted sum and its backward move into the kernels. Taking
the logits and fusing the sigmoid would save one pass over the gates (3 values per (token, head) against
3d branch values) but would compute the sigmoid in fp32 where the module rounds it in its gate's dtype,
and would step around a replaced `to_strategy_combine`. Output (b, n, H, d) in the inputs' dtype, summed
in fp32.
Kernels: head dims 1..256, contiguous last dims of the branch outputs (an incoming gradient with another
last-dim stride is copied once), fewer than 2**31 rows b * n * H. Variants: `combine_fwd`, `combine_bwd`,
one each (no spec field changes their code).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from ..codegen import cache
from . import FAMILIES
from ._launch import choose_config, no_wrap, padded_head_dim, report, require_launch_device, route
from .checks import (HEAD_DIM_MAX, INT32_OFFSET_LIMIT, require_bool, require_float, require_kernel_dtype,
                     require_last_dim_contiguous, require_same_device, require_same_dtype, require_same_shape,
                     require_tensor)

PUBLIC = "nsa_codegen.kernels.combine.gated_combine"
BRANCHES = ("o_cmp", "o_slc", "o_swa")


def check_inputs(o_cmp, o_slc, o_swa, gates) -> None:
    """Raise ValueError / TypeError naming the offending argument and the allowed values."""
    named = {"o_cmp": o_cmp, "o_slc": o_slc, "o_swa": o_swa, "gates": gates}
    for name, t in named.items():
        require_tensor(name, t)
    for name in BRANCHES:
        if named[name].dim() != 4:
            raise ValueError(f"{name} must be 4-D (b, n, heads, d), got shape {tuple(named[name].shape)}")
    for name, t in named.items():
        require_float(name, t)
    require_same_dtype(**named)
    require_same_device(**named)
    require_same_shape("o_cmp", o_cmp, "o_slc", o_slc)
    require_same_shape("o_cmp", o_cmp, "o_swa", o_swa)
    b, n, h, _ = o_cmp.shape
    if tuple(gates.shape) != (b, n, 3 * h):
        raise ValueError(f"gates must have shape (b, n, 3 * heads) = ({b}, n={n}, {3 * h}), laid out (heads, "
                         f"[compressed, selected, sliding]), to match o_cmp {tuple(o_cmp.shape)}; got "
                         f"{tuple(gates.shape)}")


def check_launch(o_cmp, o_slc, o_swa, gates) -> None:
    """What only the kernels (not the reference) need: the device, the dtypes, contiguous last dims of the
    branch outputs, the head dims of the tile configs, int32 row indices."""
    require_launch_device(o_cmp, PUBLIC)
    for name, t in zip(BRANCHES + ("gates",), (o_cmp, o_slc, o_swa, gates)):
        require_kernel_dtype(name, t)
    for name, t in zip(BRANCHES, (o_cmp, o_slc, o_swa)):
        require_last_dim_contiguous(name, t, allow_size_one=True)
    b, n, h, d = o_cmp.shape
    if d > HEAD_DIM_MAX:
        raise ValueError(f"unsupported head dim d={d}: the combine kernels take 1 <= d <= {HEAD_DIM_MAX}; the "
                         f"reference path (CPU, or use_kernels=False) takes any head dim")
    if b * n * h >= INT32_OFFSET_LIMIT:
        raise ValueError(f"b * n * heads = {b * n * h} rows: the combine kernels index rows with int32 (limit "
                         f"2**31); split the batch or the sequence across calls")


def _check_saved(o_cmp, dout) -> None:
    require_tensor("dout", dout)
    if tuple(dout.shape) != tuple(o_cmp.shape) or dout.dtype != o_cmp.dtype or dout.device != o_cmp.device:
        raise ValueError(f"dout must match o_cmp: shape {tuple(o_cmp.shape)}, {o_cmp.dtype} on {o_cmp.device}; "
                         f"got {tuple(dout.shape)}, {dout.dtype} on {dout.device}")


def _check_op(o_cmp, o_slc, o_swa, gates, dout=None) -> None:
    """What every body of the ops runs first, on every device (the triton_op body is also the fake / meta
    implementation): the arguments, the backward's incoming gradient, and on CUDA the kernels' limits."""
    check_inputs(o_cmp, o_slc, o_swa, gates)
    if dout is not None:
        _check_saved(o_cmp, dout)
    if o_cmp.is_cuda:
        check_launch(o_cmp, o_slc, o_swa, gates)


def variant_specs():
    """(forward, backward) VariantSpecs: one each, whatever the inputs."""
    return FAMILIES["combine"].specs(1, False)


def _config(module, d: int, dtype: torch.dtype, override: Optional[dict] = None) -> tuple[dict, dict]:
    """(constexprs, launch options): the chosen config (`override` for tests and benchmarks) plus the head
    dim and its padding."""
    tile, launch = choose_config(module, d, dtype, override=override)
    rows = tile["BLOCK_R"]
    if rows < 1 or rows & (rows - 1):
        raise ValueError(f"config {tile}: BLOCK_R must be a power of two >= 1")
    return ({"HEAD_DIM": d, "BLOCK_D": padded_head_dim(d), "BLOCK_R": rows},
            {"num_warps": launch.get("num_warps", 4), "num_stages": launch.get("num_stages", 1)})


def _fwd(o_cmp, o_slc, o_swa, gates, wrap, config=None):
    b, n, h, d = o_cmp.shape
    out = torch.empty(o_cmp.shape, device=o_cmp.device, dtype=o_cmp.dtype)
    rows = b * n * h
    if rows == 0 or d == 0:
        return out
    module = cache.load_variant(variant_specs()[0])
    constexprs, launch = _config(module, d, o_cmp.dtype, config)
    wrap(module.kernel)[(triton.cdiv(rows, constexprs["BLOCK_R"]),)](
        o_cmp, o_slc, o_swa, gates, out,
        *o_cmp.stride()[:3], *o_slc.stride()[:3], *o_swa.stride()[:3], *gates.stride(), *out.stride()[:3],
        n, h, rows, **constexprs, **launch,
    )
    return out


def _bwd(o_cmp, o_slc, o_swa, gates, dout, wrap, config=None):
    b, n, h, d = o_cmp.shape
    grads = [torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (o_cmp, o_slc, o_swa, gates)]
    rows = b * n * h
    if rows == 0 or d == 0:
        return tuple(g.zero_() for g in grads)
    if dout.stride(-1) != 1 and d > 1:
        dout = dout.contiguous()
    module = cache.load_variant(variant_specs()[1])
    constexprs, launch = _config(module, d, o_cmp.dtype, config)
    d_cmp, d_slc, d_swa, d_gates = grads
    wrap(module.kernel)[(triton.cdiv(rows, constexprs["BLOCK_R"]),)](
        dout, o_cmp, o_slc, o_swa, gates, d_cmp, d_slc, d_swa, d_gates,
        *dout.stride()[:3], *o_cmp.stride()[:3], *o_slc.stride()[:3], *o_swa.stride()[:3], *gates.stride(),
        *d_cmp.stride()[:3], *d_slc.stride()[:3], *d_swa.stride()[:3], *d_gates.stride(),
        n, h, rows, **constexprs, **launch,
    )
    return d_cmp, d_slc, d_swa, d_gates


# ----------------------------------------------------------------------------------------------------
# plain launchers (interpreter-callable)


def gated_combine_fwd_launch(o_cmp, o_slc, o_swa, gates, *, config=None):
    """Launch the forward kernel; returns out (b, n, H, d). `config` overrides the tile config
    ({'BLOCK_R', 'num_warps'})."""
    check_inputs(o_cmp, o_slc, o_swa, gates)
    check_launch(o_cmp, o_slc, o_swa, gates)
    return _fwd(o_cmp, o_slc, o_swa, gates, no_wrap, config)


def gated_combine_bwd_launch(o_cmp, o_slc, o_swa, gates, dout, *, config=None):
    """Launch the backward kernel; returns (d o_cmp, d o_slc, d o_swa, d gates)."""
    check_inputs(o_cmp, o_slc, o_swa, gates)
    check_launch(o_cmp, o_slc, o_swa, gates)
    _check_saved(o_cmp, dout)
    return _bwd(o_cmp, o_slc, o_swa, gates, dout, no_wrap, config)


# ----------------------------------------------------------------------------------------------------
# torch.library: nsa::gated_combine (+ its backward op)


@torch.library.triton_op("nsa::gated_combine", mutates_args=())
def _gated_combine_op(o_cmp: torch.Tensor, o_slc: torch.Tensor, o_swa: torch.Tensor,
                      gates: torch.Tensor) -> torch.Tensor:
    _check_op(o_cmp, o_slc, o_swa, gates)
    from torch.library import wrap_triton

    return _fwd(o_cmp, o_slc, o_swa, gates, wrap_triton)


@torch.library.triton_op("nsa::gated_combine_backward", mutates_args=())
def _gated_combine_bwd_op(
    o_cmp: torch.Tensor, o_slc: torch.Tensor, o_swa: torch.Tensor, gates: torch.Tensor, dout: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_op(o_cmp, o_slc, o_swa, gates, dout)
    from torch.library import wrap_triton

    return _bwd(o_cmp, o_slc, o_swa, gates, dout, wrap_triton)


@_gated_combine_op.register_kernel("cpu")
def _gated_combine_cpu(o_cmp, o_slc, o_swa, gates):
    _check_op(o_cmp, o_slc, o_swa, gates)
    from .. import reference

    with torch.no_grad():
        return reference.gated_combine(o_cmp, o_slc, o_swa, gates).contiguous()


@_gated_combine_bwd_op.register_kernel("cpu")
def _gated_combine_bwd_cpu(o_cmp, o_slc, o_swa, gates, dout):
    _check_op(o_cmp, o_slc, o_swa, gates, dout)
    from .. import reference

    return tuple(g.contiguous() for g in reference.gated_combine_backward(o_cmp, o_slc, o_swa, gates, dout))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dout):
    return torch.ops.nsa.gated_combine_backward(*ctx.saved_tensors, dout)


_gated_combine_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# public


def gated_combine(o_cmp, o_slc, o_swa, gates, *, use_kernels=True, paths=None):
    """The gated combine of spec 7: sum_s g_s * o_s per (token, head); returns (b, n, H, d).

    Same contract as `reference.gated_combine`. CUDA (and `use_kernels`): `torch.ops.nsa.gated_combine` on
    the generated Triton kernels (differentiable in every input). Elsewhere: the reference. The path taken
    is recorded in `paths["combine"]` when a dict is given. The arguments are checked here, and again by
    the op.
    """
    check_inputs(o_cmp, o_slc, o_swa, gates)
    require_bool("use_kernels", use_kernels)
    if paths is not None and not isinstance(paths, dict):
        raise TypeError(f"paths must be None or a dict (it receives paths['combine']), got {type(paths).__name__}")
    path = route(o_cmp, use_kernels)
    report(paths, "combine", path)
    if path == "reference":
        from .. import reference

        return reference.gated_combine(o_cmp, o_slc, o_swa, gates)
    return torch.ops.nsa.gated_combine(o_cmp, o_slc, o_swa, gates)
