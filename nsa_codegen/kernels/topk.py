"""Fused importance scores + top-k block selection (nsa-spec section 4) on generated Triton kernels.

Layers, fla style: generated kernels (templates/topk_{fwd,bwd}.py.j2) -> plain launchers
(`select_topk_fwd_launch`, `select_topk_bwd_launch`: callable under TRITON_INTERPRET=1, no torch.library)
-> `torch.ops.nsa.select_topk` (a `torch.library.triton_op`; autograd via `register_autograd`, the
gradient of `values` reaching q and ck for use_diff_topk; CPU kernel = the reference) -> the public
`select_topk`.

`select_topk(q, ck, ...)` computes what `reference.compressed_attention` (logits) +
`reference.importance_scores` + `reference.select_blocks` compute, without ever holding the (n x C)
score matrix: q (b, n, H, d), ck (b, M + C, K, d) with the M memory rows first (any strides); returns
block_idx int32, block_valid bool, values fp32, each (b, n, Hs, kk) with Hs = K (share) or H, and
kk = min(num_selected, #candidates) (0 when num_selected == 0 or C == 0).

Routing (by metadata only; never a silent numerical change):
  mapping (a) l' == s, and (b) l' % s == 0, l' > s, not interpolated:
      CUDA -> the generated kernels (torch.ops.nsa.select_topk); other devices -> the reference.
  mapping (c) (l' < s, l' not a multiple of s, or l' > s with interpolated=True):
      the reference on every device (reference.compressed_attention logits + importance_scores +
      select_blocks: it holds the (n x C) logits and the token-level scores chunk by chunk).
  `select_topk(..., paths=d)` records in d["topk"] which of "triton" / "reference" the call took.

Ties: the kernel ranks candidates by their fp32 scores with ties toward the lower block index (as the
reference's stable sort does on probabilities). Blocks whose probability is 0 (invisible, the own
block of (b)) come after every visible one in index order, as in the reference; a visible candidate
whose probability underflows to 0 is ordered by score instead of index (it is invalid either way).
"""
from __future__ import annotations

import torch
import triton

from ..codegen import cache
from ..reference import selection_mapping  # one rule for (a)/(b)/(c), shared with the oracle
from . import FAMILIES
from ..codegen.spec import padded_head_dim, pow2
from ._launch import choose_config, head_group, no_wrap, report, require_launch_device, route
from .checks import (HEAD_DIM_MAX, alert_not_deterministic, is_int, require_4d, require_bool, require_float, require_heads,
                     require_index_dtype, require_kernel_dtype, require_int, require_one_device, require_positive_int,
                     require_same_device, require_same_dtype, require_scale, require_tensor)


# ----------------------------------------------------------------------------------------------------
# validation (before any launch)


def check_inputs(q, ck, num_mem, compress_block_size, stride, selection_block_size, num_selected, causal,
                 share, scale, interpolated=False, query_offset=0) -> dict:
    """Raise ValueError / TypeError naming the offending argument and the allowed values; returns the
    derived sizes (b, n, H, d, K, M, C, G, Hs, mapping, R, U, kk)."""
    for name, t, layout in (("q", q, "(b, n, H, d)"), ("ck", ck, "(b, M + C, K, d)")):
        require_tensor(name, t)
        require_4d(name, t, layout)
        require_float(name, t)
    require_same_dtype(q=q, ck=ck)
    require_same_device(q=q, ck=ck)
    b, n, H, d = q.shape
    if ck.shape[0] != b or ck.shape[3] != d:
        raise ValueError(f"ck shape {tuple(ck.shape)} must be (b, M + C, K, d) = ({b}, M + C, K, {d}) to match q")
    K = ck.shape[2]
    require_heads(H, K, note="ck.shape[2]")
    if n < 1:
        raise ValueError(f"q must hold at least one token (n >= 1), got n={n}")
    if not is_int(num_mem) or not 0 <= num_mem <= ck.shape[1]:
        raise ValueError(f"num_mem must be an int in [0, ck.shape[1] = {ck.shape[1]}], got {num_mem!r}")
    require_positive_int("stride", stride)
    if not is_int(compress_block_size) or compress_block_size < stride:
        raise ValueError(f"compress_block_size must be an int >= stride ({stride}), got {compress_block_size!r}")
    require_positive_int("selection_block_size", selection_block_size)
    require_int("num_selected", num_selected, 0)
    require_int("query_offset", query_offset, 0)
    for name, flag in (("causal", causal), ("share", share), ("interpolated", interpolated)):
        require_bool(name, flag)
    require_scale(scale)
    return selection_sizes(q, ck, num_mem, stride, selection_block_size, num_selected, share, interpolated,
                           query_offset)


def selection_sizes(q, ck, num_mem, stride, selection_block_size, num_selected, share, interpolated=False,
                    query_offset=0) -> dict:
    """The derived sizes (b, n, H, d, K, M, C, G, Hs, mapping, R, U, kk) of valid arguments (metadata only;
    `check_inputs` validates first)."""
    b, n, H, d = q.shape
    K = ck.shape[2]
    C = ck.shape[1] - num_mem
    G = H // K
    mapping = selection_mapping(stride, selection_block_size, interpolated)
    R = selection_block_size // stride if mapping != "c" else 0
    if mapping == "c":
        U = -(-(query_offset + n) // selection_block_size)
    else:
        U = C // R
    kk = min(num_selected, U) if (num_selected > 0 and C > 0) else 0
    return dict(b=b, n=n, H=H, d=d, K=K, M=num_mem, C=C, G=G, Hs=K if share else H, mapping=mapping, R=R,
                U=U, kk=kk)


def _check_kernel_limits(q, ck) -> None:
    """What only the kernels (not the reference) need: the dtypes and head dims they were generated for."""
    for name, t in (("q", q), ("ck", ck)):
        require_kernel_dtype(name, t)
    d = int(q.shape[3])
    if d > HEAD_DIM_MAX:
        raise ValueError(f"unsupported head dim d={d}: the Triton kernels take 1..{HEAD_DIM_MAX}; the reference "
                         f"path (CPU, or use_kernels=False) takes any head dim")


def _check_kernel_mapping(info: dict) -> None:
    if info["mapping"] == "c":
        raise ValueError(
            "the top-k kernels and torch.ops.nsa.select_topk implement mappings (a) (selection_block_size == "
            "stride) and (b) (selection_block_size a multiple of stride, > stride, interpolated=False); mapping "
            "(c) runs on the reference: use nsa_codegen.kernels.topk.select_topk"
        )


def _check_saved(info: dict, q, block_idx, values, lse, grad_values) -> None:
    """The backward's saved forward results and incoming gradient: block_idx, values, grad_values
    (b, n, Hs, kk), lse (b, n, Hs) float32, on q's device."""
    named = {"block_idx": block_idx, "values": values, "lse": lse, "grad_values": grad_values}
    for name, t in named.items():
        require_tensor(name, t)
    require_one_device({"q": q, **named})
    require_index_dtype("block_idx", block_idx)
    shape = (info["b"], info["n"], info["Hs"], info["kk"])
    for name in ("block_idx", "values", "grad_values"):
        if tuple(named[name].shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(named[name].shape)}")
    for name in ("values", "grad_values"):
        require_float(name, named[name])
    if tuple(lse.shape) != shape[:3] or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 of shape {shape[:3]}, got {lse.dtype} {tuple(lse.shape)}")


def _check_op(q, ck, num_mem, compress_block_size, stride, selection_block_size, num_selected, causal, share,
              scale, query_offset, saved=None) -> dict:
    """What every body of the ops runs first, on every device (the triton_op body is also the fake / meta
    implementation): the arguments, the mapping (the ops compute (a) and (b)), the backward's saved tensors
    (block_idx, values, lse, grad_values), and on CUDA tensors the kernels' limits. Returns the sizes."""
    info = check_inputs(q, ck, num_mem, compress_block_size, stride, selection_block_size, num_selected, causal,
                        share, scale, False, query_offset)
    _check_kernel_mapping(info)
    if saved is not None:
        _check_saved(info, q, *saved)
    if q.is_cuda:
        _check_kernel_limits(q, ck)
    return info


# ----------------------------------------------------------------------------------------------------
# launch helpers


def variant_specs(q, ck, *, selection_block_size: int, causal: bool, share: bool):
    """(forward, backward) VariantSpecs from metadata: group = G when the group shares its selection, else 1."""
    return FAMILIES["topk"].specs(head_group(q, ck) if share else 1, causal, selection_block_size)


def _config(module, d: int, dtype: torch.dtype, config: dict | None) -> tuple[dict, dict]:
    if config is not None:  # explicit override (tests force small tiles to exercise the streaming)
        config = {"num_warps": 4, "num_stages": 1, **config}
    return choose_config(module, d, dtype, override=config)


def _precision(dtype: torch.dtype) -> str:
    # fp32 dots on fp32 operands: exact products for fp32 inputs; for 16-bit inputs the group-averaged
    # query is not representable in 16 bits, so tf32x3 keeps the scores at ~fp32 accuracy.
    return "ieee" if dtype == torch.float32 else "tf32x3"


def _fwd(q, ck, info, num_mem, selection_block_size, causal, share, scale, query_offset, wrap, config=None):
    b, n, H, d = q.shape
    Hs, kk = info["Hs"], info["kk"]
    idx = torch.empty((b, n, Hs, kk), device=q.device, dtype=torch.int32)
    val = torch.empty((b, n, Hs, kk), device=q.device, dtype=torch.float32)
    valid = torch.empty((b, n, Hs, kk), device=q.device, dtype=torch.bool)
    lse = torch.empty((b, n, Hs), device=q.device, dtype=torch.float32)
    if kk == 0:
        lse.fill_(float("nan"))  # no selection: nothing to normalize (never read)
        return idx, valid, val, lse
    module = cache.load_variant(variant_specs(q, ck, selection_block_size=selection_block_size, causal=causal,
                                          share=share)[0])
    d, kp = int(d), max(2, pow2(int(kk)))  # constexprs: specialize (guard) on symbolic sizes
    constexprs, launch = _config(module, d, q.dtype, config)
    grid = (triton.cdiv(n, constexprs["BLOCK_M"]), b * Hs)
    wrap(module.kernel)[grid](
        q, ck, idx, val, valid, lse,
        *q.stride(), *ck.stride(), *idx.stride(), *lse.stride(),
        n, info["U"], kk, num_mem, 1 if share else info["G"], query_offset, float(scale), Hs,
        D=d, BLOCK_D=padded_head_dim(d), R=int(info["R"]), KP=kp, PREC=_precision(q.dtype),
        **constexprs, **launch,
    )
    return idx, valid, val, lse


def _bwd(q, ck, idx, val, lse, grad_values, info, num_mem, selection_block_size, causal, share, scale,
         query_offset, wrap, config=None):
    b, n, H, d = q.shape
    Hs, kk = info["Hs"], info["kk"]
    if kk == 0:
        return torch.zeros_like(q), torch.zeros_like(ck)
    alert_not_deterministic("nsa::select_topk backward", "d(compressed keys) adds the rows of several programs "
                            "with fp32 atomics")
    module = cache.load_variant(variant_specs(q, ck, selection_block_size=selection_block_size, causal=causal,
                                          share=share)[1])
    d, kp = int(d), max(2, pow2(int(kk)))  # constexprs: specialize (guard) on symbolic sizes
    constexprs, launch = _config(module, d, q.dtype, config)
    idx, val = idx.contiguous(), val.contiguous()  # the kernel reads both with one set of strides
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dck = torch.zeros(ck.shape, device=ck.device, dtype=torch.float32)  # atomics accumulate into it
    grid = (triton.cdiv(n, constexprs["BLOCK_M"]), b * Hs)
    wrap(module.kernel)[grid](
        q, ck, idx, val, grad_values, lse, dq, dck,
        *q.stride(), *ck.stride(), *idx.stride(), *grad_values.stride(), *lse.stride(), *dq.stride(),
        *dck.stride(),
        n, info["U"], kk, num_mem, 1 if share else info["G"], query_offset, float(scale), Hs,
        D=d, BLOCK_D=padded_head_dim(d), R=int(info["R"]), KP=kp, PREC=_precision(q.dtype),
        **constexprs, **launch,
    )
    return dq, dck.to(ck.dtype)


# ----------------------------------------------------------------------------------------------------
# plain launchers (interpreter-callable)


def select_topk_fwd_launch(q, ck, *, num_mem, compress_block_size, stride, selection_block_size, num_selected,
                           causal, share, scale, query_offset=0, config=None):
    """Launch the forward kernel; returns (block_idx int32, block_valid, values fp32, lse fp32 (b, n, Hs)).
    `config` ({'BLOCK_M', 'BLOCK_U', ...}) overrides the tile choice."""
    info = check_inputs(q, ck, num_mem, compress_block_size, stride, selection_block_size, num_selected, causal,
                        share, scale, False, query_offset)
    _check_kernel_mapping(info)
    require_launch_device(q, "nsa_codegen.kernels.topk.select_topk")
    _check_kernel_limits(q, ck)
    return _fwd(q, ck, info, num_mem, selection_block_size, causal, share, scale, query_offset, no_wrap, config)


def select_topk_bwd_launch(q, ck, block_idx, values, lse, grad_values, *, num_mem, compress_block_size, stride,
                           selection_block_size, num_selected, causal, share, scale, query_offset=0, config=None):
    """Launch the backward kernel; returns (dq, dck): the gradient of sum(values * grad_values)."""
    info = check_inputs(q, ck, num_mem, compress_block_size, stride, selection_block_size, num_selected, causal,
                        share, scale, False, query_offset)
    _check_kernel_mapping(info)
    require_launch_device(q, "nsa_codegen.kernels.topk.select_topk")
    _check_kernel_limits(q, ck)
    _check_saved(info, q, block_idx, values, lse, grad_values)
    return _bwd(q, ck, block_idx, values, lse, grad_values, info, num_mem, selection_block_size, causal, share,
                scale, query_offset, no_wrap, config)


class _LaunchFunction(torch.autograd.Function):
    """Autograd over the plain launchers (the interpreter path; CUDA code uses the torch.library op)."""

    @staticmethod
    def forward(ctx, q, ck, kwargs, config):
        idx, valid, val, lse = select_topk_fwd_launch(q, ck, **kwargs, config=config)
        ctx.save_for_backward(q, ck, idx, val, lse)
        ctx.kwargs, ctx.config = kwargs, config
        ctx.mark_non_differentiable(idx, valid, lse)
        return idx, valid, val, lse

    @staticmethod
    def backward(ctx, d_idx, d_valid, d_val, d_lse):
        q, ck, idx, val, lse = ctx.saved_tensors
        if d_val is None:
            return None, None, None, None
        dq, dck = select_topk_bwd_launch(q, ck, idx, val, lse, d_val.contiguous(), **ctx.kwargs, config=ctx.config)
        return dq, dck, None, None


def select_topk_launch(q, ck, *, num_mem, compress_block_size, stride, selection_block_size, num_selected,
                       causal, share, scale, query_offset=0, config=None):
    """Differentiable (values -> q, ck) forward through the plain launchers; returns
    (block_idx, block_valid, values). For the interpreter and for tests; mappings (a) and (b) only."""
    kwargs = dict(num_mem=num_mem, compress_block_size=compress_block_size, stride=stride,
                  selection_block_size=selection_block_size, num_selected=num_selected, causal=causal,
                  share=share, scale=scale, query_offset=query_offset)
    idx, valid, val, _ = _LaunchFunction.apply(q, ck, kwargs, config)
    return idx, valid, val


# ----------------------------------------------------------------------------------------------------
# torch.library: nsa::select_topk (+ its backward op)


# The op returns (values fp32, lse fp32, block_idx int32, block_valid bool): floating outputs first. Not
# cosmetic: torch.library.opcheck's test_aot_dispatch_dynamic sums the outputs as `sm = 0; sm += o.sum()`,
# so an integer first output makes `sm` a Long tensor and the in-place add of the float sum then raises
# "result type Float can't be cast to the desired output type Long" (torch 2.11 and 2.13; reproduced on
# CPU). The public select_topk keeps the (block_idx, block_valid, values) order of the reference.
OP_OUTPUTS = ("values", "lse", "block_idx", "block_valid")


@torch.library.triton_op("nsa::select_topk", mutates_args=())
def _select_topk_op(
    q: torch.Tensor, ck: torch.Tensor, num_mem: int, compress_block_size: int, stride: int,
    selection_block_size: int, num_selected: int, causal: bool, share: bool, scale: float, query_offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    info = _check_op(q, ck, num_mem, compress_block_size, stride, selection_block_size, num_selected, causal, share,
                     scale, query_offset)
    from torch.library import wrap_triton

    idx, valid, val, lse = _fwd(q, ck, info, num_mem, selection_block_size, causal, share, scale, query_offset,
                                wrap_triton)
    return val, lse, idx, valid  # float outputs first: see OP_OUTPUTS


@torch.library.triton_op("nsa::select_topk_backward", mutates_args=())
def _select_topk_bwd_op(
    q: torch.Tensor, ck: torch.Tensor, block_idx: torch.Tensor, values: torch.Tensor, lse: torch.Tensor,
    grad_values: torch.Tensor, num_mem: int, compress_block_size: int, stride: int, selection_block_size: int,
    num_selected: int, causal: bool, share: bool, scale: float, query_offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    info = _check_op(q, ck, num_mem, compress_block_size, stride, selection_block_size, num_selected, causal, share,
                     scale, query_offset, (block_idx, values, lse, grad_values))
    from torch.library import wrap_triton

    return _bwd(q, ck, block_idx, values, lse, grad_values, info, num_mem, selection_block_size, causal, share,
                scale, query_offset, wrap_triton)


@_select_topk_op.register_kernel("cpu")
def _select_topk_cpu(q, ck, num_mem, compress_block_size, stride, selection_block_size, num_selected, causal,
                     share, scale, query_offset):
    _check_op(q, ck, num_mem, compress_block_size, stride, selection_block_size, num_selected, causal, share, scale,
              query_offset)
    from .. import reference

    with torch.no_grad():
        idx, valid, val = reference.select_topk(
            q, ck, num_mem=num_mem, compress_block_size=compress_block_size, stride=stride,
            selection_block_size=selection_block_size, num_selected=num_selected, causal=causal, share=share,
            scale=scale, query_offset=query_offset)
        lse = reference.select_topk_lse(q, ck, num_mem=num_mem, stride=stride,
                                        selection_block_size=selection_block_size, causal=causal, share=share,
                                        scale=scale, query_offset=query_offset)
    return val.float().contiguous(), lse, idx.to(torch.int32).contiguous(), valid.contiguous()


@_select_topk_bwd_op.register_kernel("cpu")
def _select_topk_bwd_cpu(q, ck, block_idx, values, lse, grad_values, num_mem, compress_block_size, stride,
                         selection_block_size, num_selected, causal, share, scale, query_offset):
    _check_op(q, ck, num_mem, compress_block_size, stride, selection_block_size, num_selected, causal, share, scale,
              query_offset, (block_idx, values, lse, grad_values))
    from .. import reference

    # closed form (autograd cannot record below the op's Autograd key)
    return reference.select_topk_backward(q, ck, block_idx, grad_values, num_mem=num_mem, stride=stride,
                                          selection_block_size=selection_block_size, causal=causal, share=share,
                                          scale=scale, query_offset=query_offset)


def _setup_context(ctx, inputs, output):
    (q, ck, num_mem, compress_block_size, stride, selection_block_size, num_selected, causal, share, scale,
     query_offset) = inputs
    val, lse, idx, valid = output
    ctx.save_for_backward(q, ck, idx, val, lse)
    ctx.args = (num_mem, compress_block_size, stride, selection_block_size, num_selected, causal, share, scale,
                query_offset)
    ctx.mark_non_differentiable(idx, valid, lse)


def _backward(ctx, d_val, d_lse, d_idx, d_valid):
    q, ck, idx, val, lse = ctx.saved_tensors
    if d_val is None:
        d_val = torch.zeros_like(val)
    dq, dck = torch.ops.nsa.select_topk_backward(q, ck, idx, val, lse, d_val.contiguous(), *ctx.args)
    return dq, dck, None, None, None, None, None, None, None, None, None


_select_topk_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# public


def select_topk(q, ck, *, num_mem, compress_block_size, stride, selection_block_size, num_selected, causal, share,
                scale, interpolated=False, query_offset=0, use_kernels=True, paths=None):
    """Importance scores + top-k block selection (nsa-spec section 4) from q and the compressed keys.

    q (b, n, H, d), ck (b, M + C, K, d) (memory rows first). Returns (block_idx, block_valid, values),
    each (b, n, Hs, kk): block_idx int32 (on every path), values fp32
    (promote(dtype, fp32)), differentiable w.r.t. q and ck (use_diff_topk). Matches
    reference.compressed_attention + importance_scores + select_blocks. Runs on the generated kernels on
    CUDA (and `use_kernels`) for mappings (a) and (b); mapping (c) and other devices run the reference.
    The path taken is recorded in `paths["topk"]` when a dict is given. The arguments are checked here
    (the op's schema would coerce or refuse Python scalars before its own checks see them), and again by
    the op.
    """
    info = check_inputs(q, ck, num_mem, compress_block_size, stride, selection_block_size, num_selected, causal,
                        share, scale, interpolated, query_offset)
    path = route(q, use_kernels) if info["mapping"] != "c" else "reference"
    report(paths, "topk", path)
    if path == "reference":
        from .. import reference

        idx, valid, val = reference.select_topk(
            q, ck, num_mem=num_mem, compress_block_size=compress_block_size, stride=stride,
            selection_block_size=selection_block_size, num_selected=num_selected, causal=causal, share=share,
            scale=scale, interpolated=interpolated, query_offset=query_offset)
        return idx.to(torch.int32), valid, val
    val, _, idx, valid = torch.ops.nsa.select_topk(q, ck, num_mem, compress_block_size, stride, selection_block_size,
                                                    num_selected, causal, share, float(scale), query_offset)
    return idx, valid, val
