"""Sliding-window attention (nsa-spec section 6) on generated Triton kernels.

Layers, fla style: generated kernels (templates/window_{fwd,bwd}.py.j2) -> plain launchers
(`sliding_window_fwd_launch`, `sliding_window_bwd_launch`: callable under TRITON_INTERPRET=1, no
torch.library) -> `torch.ops.nsa.sliding_window_attention` (a `torch.library.triton_op`, so
torch.compile sees the kernels; autograd via `register_autograd`; CPU kernel = the reference) -> the
public `sliding_window_attention` (same contract as `reference.sliding_window_attention`).

Inputs (bnhd): q (b, n_q, H, d) rotated; k, v (b, n, K, d) rotated keys / values, H % K == 0 (GQA: kv
head h // G, never expanded). Query i sits at position query_offset + i. Causal: keys j in [i - W, i];
non-causal: |i - j| <= W; always 0 <= j < n. Any strides with a contiguous last dim: nothing is
copied. Head dims: multiples of 8 in [16, 256]. Outputs: out (b, n_q, H, d) in q's dtype and lse
(b, n_q, H) fp32 (natural log; -inf and out = 0 for a query with no key, only possible with an
out-of-range query_offset).

Variant: `window_{fwd,bwd}_g{G}_{causal|noncausal}` with G = H // K; W, n, the offset are runtime.
"""
from __future__ import annotations

import torch
import triton

from ..codegen import cache
from . import FAMILIES
from ._launch import head_group, no_wrap, report, route
from .checks import require_bool, require_int, require_saved, require_scale
from . import dense
from .dense import check_attention_tensors, check_launch, launch_config

PUBLIC = "nsa_codegen.kernels.window.sliding_window_attention"


def check_inputs(q, k, v, window, causal, scale, query_offset=0) -> None:
    """Raise ValueError / TypeError naming the offending argument and the allowed values."""
    check_attention_tensors(q, k, v)
    require_int("window", window, 0)
    require_bool("causal", causal)
    require_scale(scale, note=" (e.g. d ** -0.5)")
    require_int("query_offset", query_offset, 0)


def _check_op(q, k, v, window, causal, scale, query_offset, saved=None) -> None:
    """What every body of the ops runs first, on every device (the triton_op body is also the fake / meta
    implementation): the arguments, the backward's saved tensors (out, lse, dout), and on CUDA tensors
    the kernels' limits."""
    check_inputs(q, k, v, window, causal, scale, query_offset)
    if saved is not None:
        require_saved(q, *saved)
    if q.is_cuda:
        check_launch(q, k, PUBLIC, v)


def variant_specs(q, k, causal: bool):
    """(forward, backward) VariantSpecs from metadata only."""
    return FAMILIES["window"].specs(head_group(q, k), causal)


def _fwd(q, k, v, window, causal, scale, query_offset, wrap, config=None):
    return dense.forward(variant_specs(q, k, causal)[0], wrap, q, k, v, (window,), scale, query_offset, config)


def _bwd(q, k, v, out, lse, dout, window, causal, scale, query_offset, wrap, config=None):
    b, nq, h, d = q.shape
    nk, kh = k.shape[1], k.shape[2]
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    if b == 0 or nk == 0 or nq == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    module = cache.load_variant(variant_specs(q, k, causal)[1])
    constexprs, launch = launch_config(module, d, q.dtype, config)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    lse = lse.contiguous()
    # delta0 = rowsum(dO * O) from the 16-bit output: only the starting point. dq_kernel (first) computes
    # the exact delta = sum_j P dP into `delta` and corrects dq; dkdv_kernel reads it (see window_bwd.py.j2).
    delta0 = (dout.float() * out.float()).sum(-1).contiguous()  # (b, n_q, H), the strides of lse
    delta = torch.empty(lse.shape, device=lse.device, dtype=torch.float32)
    common = (
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *lse.stride(),
    )
    scalars = (nq, nk, int(query_offset), kh, int(window), float(scale))
    tokens = constexprs["BLOCK_M"] // module.GROUP
    wrap(module.dq_kernel)[(triton.cdiv(nq, tokens), b * kh)](
        q, k, v, dout, lse, delta0, dq, delta, *common, *dq.stride()[:3], *scalars,
        **constexprs, **launch,
    )
    wrap(module.dkdv_kernel)[(triton.cdiv(nk, constexprs["BLOCK_N"]), b * kh)](
        q, k, v, dout, lse, delta, dk, dv, *common, *dk.stride()[:3], *dv.stride()[:3], *scalars,
        **constexprs, **launch,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# plain launchers (interpreter-callable)


def sliding_window_fwd_launch(q, k, v, *, window, causal, scale, query_offset=0, config=None):
    """Launch the forward kernel; returns (out, lse). `config` overrides the tile config
    ({'BLOCK_M', 'BLOCK_N', 'num_warps', 'num_stages'}; BLOCK_M >= G)."""
    check_inputs(q, k, v, window, causal, scale, query_offset)
    check_launch(q, k, PUBLIC, v)
    return _fwd(q, k, v, window, causal, scale, query_offset, no_wrap, config)


def sliding_window_bwd_launch(q, k, v, out, lse, dout, *, window, causal, scale, query_offset=0, config=None):
    """Launch the backward kernels; returns (dq, dk, dv)."""
    check_inputs(q, k, v, window, causal, scale, query_offset)
    check_launch(q, k, PUBLIC, v)
    require_saved(q, out, lse, dout)
    return _bwd(q, k, v, out, lse, dout, window, causal, scale, query_offset, no_wrap, config)


# ----------------------------------------------------------------------------------------------------
# torch.library: nsa::sliding_window_attention (+ its backward op)


@torch.library.triton_op("nsa::sliding_window_attention", mutates_args=())
def _sliding_window_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, causal: bool, scale: float, query_offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_op(q, k, v, window, causal, scale, query_offset)
    from torch.library import wrap_triton

    return _fwd(q, k, v, window, causal, scale, query_offset, wrap_triton)


@torch.library.triton_op("nsa::sliding_window_attention_backward", mutates_args=())
def _sliding_window_bwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
    window: int, causal: bool, scale: float, query_offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_op(q, k, v, window, causal, scale, query_offset, (out, lse, dout))
    from torch.library import wrap_triton

    return _bwd(q, k, v, out, lse, dout, window, causal, scale, query_offset, wrap_triton)


@_sliding_window_op.register_kernel("cpu")
def _sliding_window_cpu(q, k, v, window, causal, scale, query_offset):
    _check_op(q, k, v, window, causal, scale, query_offset)
    from .. import reference

    kw = dict(window=window, causal=causal, scale=scale, query_offset=query_offset)
    with torch.no_grad():
        out = reference.sliding_window_attention(q, k, v, **kw)
        lse = reference.sliding_window_lse(q, k, **kw)
    return out.contiguous(), lse


@_sliding_window_bwd_op.register_kernel("cpu")
def _sliding_window_bwd_cpu(q, k, v, out, lse, dout, window, causal, scale, query_offset):
    _check_op(q, k, v, window, causal, scale, query_offset, (out, lse, dout))
    from .. import reference

    return reference.sliding_window_backward(q, k, v, out, dout, window=window, causal=causal, scale=scale,
                                             query_offset=query_offset)


def _setup_context(ctx, inputs, output):
    q, k, v, window, causal, scale, query_offset = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.window, ctx.causal, ctx.scale, ctx.query_offset = window, causal, scale, query_offset
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.nsa.sliding_window_attention_backward(
        q, k, v, out, lse, dout, ctx.window, ctx.causal, ctx.scale, ctx.query_offset
    )
    return dq, dk, dv, None, None, None, None


_sliding_window_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# public


def sliding_window_attention(q, k, v, *, window, causal, scale, query_offset=0, chunk_size=None, use_kernels=True,
                             paths=None):
    """Sliding-window attention (nsa-spec section 6); returns out (b, n_q, H, d).

    Same contract as `reference.sliding_window_attention`. CUDA (and `use_kernels`):
    `torch.ops.nsa.sliding_window_attention` on the generated Triton kernels (differentiable in q, k, v;
    `chunk_size` is not used there). Elsewhere: the reference. The path taken is recorded in
    `paths["sliding"]` when a dict is given. The arguments are checked here (the op's schema would coerce
    or refuse Python scalars before its own checks see them), and again by the op.
    """
    check_inputs(q, k, v, window, causal, scale, query_offset)
    path = route(q, use_kernels)
    report(paths, "sliding", path)
    if path == "reference":
        from .. import reference

        return reference.sliding_window_attention(q, k, v, window=window, causal=causal, scale=scale,
                                                  query_offset=query_offset, chunk_size=chunk_size)
    out, _ = torch.ops.nsa.sliding_window_attention(q, k, v, int(window), bool(causal), float(scale),
                                                    int(query_offset))
    return out
