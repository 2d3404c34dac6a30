"""Compressed attention (nsa-spec section 2) on generated Triton kernels.

Layers, fla style: generated kernels (templates/cmp_{fwd,bwd}.py.j2) -> plain launchers
(`compressed_attention_fwd_launch`, `compressed_attention_bwd_launch`: callable under TRITON_INTERPRET=1,
no torch.library) -> `torch.ops.nsa.compressed_attention` (a `torch.library.triton_op`; autograd via
`register_autograd`; CPU kernel = the reference) -> the public `compressed_attention` (same contract as
`reference.compressed_attention`).

Inputs (bnhd): q (b, n_q, H, d) unrotated; ck, cv (b, M + C, K, d) with the M memory rows first,
H % K == 0 (kv head h // G, never expanded). Query i sits at position query_offset + i. Causal: memory
rows always visible, compressed block w iff e_w = (w + 1) * stride - 1 < i (the invisible logits'
NEG / 10 weigh exactly 0 beside the always-visible memory rows, so the kernels skip them); non-causal:
all rows. The compress block size does not enter the rule. Any strides with a contiguous last dim:
nothing is copied. Head dims: multiples of 8 in [16, 256]. Kernel outputs: out (b, n_q, H, d) in q's
dtype and lse (b, n_q, H) fp32 (natural log). Gradients reach q, ck and cv (memory rows included).

Variant: `cmp_{fwd,bwd}_g{G}_{causal|noncausal}` with G = H // K; M, the stride, n, the offset are runtime.
"""
from __future__ import annotations

import torch
import triton

from ..codegen import cache
from . import FAMILIES, dense
from ._launch import head_group, no_wrap, report, route
from .checks import require_bool, require_int, require_saved, require_scale
from .dense import check_attention_tensors, check_launch, tuned_launch_config

PUBLIC = "nsa_codegen.kernels.compressed.compressed_attention"

# ----------------------------------------------------------------------------------------------------
# validation (before any launch)


def check_inputs(q, ck, cv, num_mem, block_size, stride, causal, scale, query_offset=0) -> None:
    """Raise ValueError / TypeError naming the offending argument and the allowed values. num_mem >= 1
    (nsa-spec: M >= 1): the memory rows are what a causal query that sees no compressed block attends to;
    without them it would have no key at all."""
    check_attention_tensors(q, ck, cv, "ck", "cv")
    require_int("num_mem", num_mem, 1)
    if num_mem > ck.shape[1]:
        raise ValueError(
            f"num_mem={num_mem} exceeds the {ck.shape[1]} rows of ck/cv (b, M + C, K, d): memory rows come first"
        )
    require_int("block_size", block_size, 1)
    require_int("stride", stride, 1)
    if stride > block_size:
        raise ValueError(f"stride must satisfy 0 < stride <= block_size={block_size}, got {stride}")
    require_bool("causal", causal)
    require_scale(scale, note=" (e.g. d ** -0.5)")
    require_int("query_offset", query_offset, 0)


def _check_op(q, ck, cv, num_mem, block_size, stride, causal, scale, query_offset, saved=None) -> None:
    """What every body of the ops runs first, on every device (the triton_op body is also the fake / meta
    implementation): the arguments, the backward's saved tensors (out, lse, dout), and on CUDA tensors
    the kernels' limits."""
    check_inputs(q, ck, cv, num_mem, block_size, stride, causal, scale, query_offset)
    if saved is not None:
        require_saved(q, *saved)
    if q.is_cuda:
        check_launch(q, ck, PUBLIC, cv, "ck", "cv")


# ----------------------------------------------------------------------------------------------------
# launch helpers


def variant_specs(q, ck, causal: bool):
    """(forward, backward) VariantSpecs from metadata only."""
    return FAMILIES["compressed"].specs(head_group(q, ck), causal)


def _fwd(q, ck, cv, num_mem, stride, causal, scale, query_offset, wrap, config=None):
    return dense.forward(variant_specs(q, ck, causal)[0], wrap, q, ck, cv, (num_mem, stride), scale, query_offset,
                         config)


def _bwd(q, ck, cv, out, lse, dout, num_mem, stride, causal, scale, query_offset, wrap, config=None):
    b, nq, h, d = q.shape
    nkv, kh = ck.shape[1], ck.shape[2]
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    if b == 0 or nq == 0:
        return dq.zero_(), ck.new_zeros(ck.shape), cv.new_zeros(cv.shape)
    module = cache.load_variant(variant_specs(q, ck, causal)[1])
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    lse = lse.contiguous()
    # delta0 = rowsum(dO * O) from the 16-bit output: only the starting point. dq_kernel (first) computes
    # the exact delta = sum_j P dP into `delta` and corrects dq; dkdv_kernel reads it (see cmp_bwd.py.j2).
    delta0 = (dout.float() * out.float()).sum(-1).contiguous()  # (b, n_q, H), the strides of lse
    delta = torch.empty(lse.shape, device=lse.device, dtype=torch.float32)
    common = (*q.stride()[:3], *ck.stride()[:3], *cv.stride()[:3], *dout.stride()[:3], *lse.stride())
    scalars = (nq, nkv, int(query_offset), kh, int(num_mem), int(stride), float(scale))

    def launch_dq(cfg, dq_out, delta_out):
        constexprs, launch = cfg
        tokens = constexprs["BLOCK_M"] // module.GROUP
        wrap(module.dq_kernel)[(triton.cdiv(nq, tokens), b * kh)](
            q, ck, cv, dout, lse, delta0, dq_out, delta_out, *common, *dq_out.stride()[:3], *scalars,
            **constexprs, **launch,
        )

    def launch_dkdv(cfg):
        """Returns (d(ck), d(cv)), summed from per-chunk fp32 partial sums in a fixed order (deterministic,
        no atomics). Also for one chunk (the same numbers: fp32, rounded once), so that no branch depends
        on the query count: under torch.compile(dynamic=True) the chunk count stays symbolic, no guard."""
        constexprs, launch = cfg
        chunks, chunk = dkdv_chunks(nq, constexprs["BLOCK_M"] // module.GROUP)
        dk_out = torch.empty((chunks, *ck.shape), device=ck.device, dtype=torch.float32)
        dv_out = torch.empty((chunks, *cv.shape), device=cv.device, dtype=torch.float32)
        wrap(module.dkdv_kernel)[(triton.cdiv(nkv, constexprs["BLOCK_N"]), b * kh, chunks)](
            q, ck, cv, dout, lse, delta, dk_out, dv_out, *common, *dk_out.stride()[1:4], *dv_out.stride()[1:4],
            dk_out.stride(0), dv_out.stride(0), chunk, *scalars,
            **constexprs, **launch,
        )
        return dk_out.sum(0).to(ck.dtype), dv_out.sum(0).to(cv.dtype)

    dq_cfg = tuned_launch_config(module, "dq_kernel", d, q, config,
                                 lambda c: launch_dq(c, torch.empty_like(dq), torch.empty_like(delta)))
    launch_dq(dq_cfg, dq, delta)
    dkdv_cfg = tuned_launch_config(module, "dkdv_kernel", d, q, config, launch_dkdv)
    dck, dcv = launch_dkdv(dkdv_cfg)
    return dq, dck, dcv


DKDV_MAX_CHUNKS = 16  # bounds the fp32 workspace at 16 x (d(ck) + d(cv)) = 8 n K d bytes for stride 16
DKDV_MIN_CHUNK = 256  # query tokens per chunk: fewer and each program's K/V tile set-up dominates


def dkdv_chunks(nq, tokens: int):
    """(number of query chunks, tokens per chunk) for dkdv_kernel: up to DKDV_MAX_CHUNKS chunks of at
    least DKDV_MIN_CHUNK tokens, each a multiple of the kernel's `tokens` per step (nq >= 1). Metadata
    only, and symbolic for a symbolic nq (torch.sym_min: no guard on the query count)."""
    chunks = torch.sym_min(DKDV_MAX_CHUNKS, -(-nq // DKDV_MIN_CHUNK))
    per = -(-nq // chunks)
    per = -(-per // tokens) * tokens
    return -(-nq // per), per


# ----------------------------------------------------------------------------------------------------
# plain launchers (interpreter-callable)


def compressed_attention_fwd_launch(q, ck, cv, *, num_mem, block_size, stride, causal, scale, query_offset=0,
                                    config=None):
    """Launch the forward kernel; returns (out, lse). `config` overrides the tile config
    ({'BLOCK_M', 'BLOCK_N', 'num_warps', 'num_stages'}; BLOCK_M >= G)."""
    check_inputs(q, ck, cv, num_mem, block_size, stride, causal, scale, query_offset)
    check_launch(q, ck, PUBLIC, cv, "ck", "cv")
    return _fwd(q, ck, cv, num_mem, stride, causal, scale, query_offset, no_wrap, config)


def compressed_attention_bwd_launch(q, ck, cv, out, lse, dout, *, num_mem, block_size, stride, causal, scale,
                                    query_offset=0, config=None):
    """Launch the backward kernels; returns (dq, dck, dcv) (memory rows included in dck, dcv)."""
    check_inputs(q, ck, cv, num_mem, block_size, stride, causal, scale, query_offset)
    check_launch(q, ck, PUBLIC, cv, "ck", "cv")
    require_saved(q, out, lse, dout)
    return _bwd(q, ck, cv, out, lse, dout, num_mem, stride, causal, scale, query_offset, no_wrap, config)


# ----------------------------------------------------------------------------------------------------
# torch.library: nsa::compressed_attention (+ its backward op)


def _reference(q, ck, cv, num_mem, block_size, stride, causal, scale, query_offset):
    from .. import reference

    return reference.compressed_attention(q, ck, cv, num_mem=num_mem, block_size=block_size, stride=stride,
                                          causal=causal, scale=scale, query_offset=query_offset)


@torch.library.triton_op("nsa::compressed_attention", mutates_args=())
def _compressed_attention_op(
    q: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor, num_mem: int, block_size: int, stride: int, causal: bool,
    scale: float, query_offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_op(q, ck, cv, num_mem, block_size, stride, causal, scale, query_offset)
    from torch.library import wrap_triton

    return _fwd(q, ck, cv, num_mem, stride, causal, scale, query_offset, wrap_triton)


@torch.library.triton_op("nsa::compressed_attention_backward", mutates_args=())
def _compressed_attention_bwd_op(
    q: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
    num_mem: int, block_size: int, stride: int, causal: bool, scale: float, query_offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_op(q, ck, cv, num_mem, block_size, stride, causal, scale, query_offset, (out, lse, dout))
    from torch.library import wrap_triton

    return _bwd(q, ck, cv, out, lse, dout, num_mem, stride, causal, scale, query_offset, wrap_triton)


@_compressed_attention_op.register_kernel("cpu")
def _compressed_attention_cpu(q, ck, cv, num_mem, block_size, stride, causal, scale, query_offset):
    _check_op(q, ck, cv, num_mem, block_size, stride, causal, scale, query_offset)
    from .. import reference

    with torch.no_grad():
        out, _ = _reference(q, ck, cv, num_mem, block_size, stride, causal, scale, query_offset)
        lse = reference.compressed_attention_lse(q, ck, num_mem=num_mem, stride=stride, causal=causal, scale=scale,
                                                 query_offset=query_offset)
    return out.contiguous(), lse


@_compressed_attention_bwd_op.register_kernel("cpu")
def _compressed_attention_bwd_cpu(q, ck, cv, out, lse, dout, num_mem, block_size, stride, causal, scale,
                                  query_offset):
    _check_op(q, ck, cv, num_mem, block_size, stride, causal, scale, query_offset, (out, lse, dout))
    from .. import reference

    return reference.compressed_attention_backward(q, ck, cv, out, dout, num_mem=num_mem, stride=stride,
                                                   causal=causal, scale=scale, query_offset=query_offset)


def _setup_context(ctx, inputs, output):
    q, ck, cv, num_mem, block_size, stride, causal, scale, query_offset = inputs
    out, lse = output
    ctx.save_for_backward(q, ck, cv, out, lse)
    ctx.args = (num_mem, block_size, stride, causal, scale, query_offset)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, ck, cv, out, lse = ctx.saved_tensors
    dq, dck, dcv = torch.ops.nsa.compressed_attention_backward(q, ck, cv, out, lse, dout, *ctx.args)
    return dq, dck, dcv, None, None, None, None, None, None


_compressed_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# public


def compressed_attention(q, ck, cv, *, num_mem, block_size, stride, causal, scale, query_offset=0,
                         return_logits=True, use_kernels=True, paths=None):
    """Compressed attention (nsa-spec section 2); returns (out, logits) like `reference.compressed_attention`:
    out (b, n_q, H, d), logits (b, n_q, H, C) (None when `return_logits=False`).

    CUDA (and `use_kernels`): out from `torch.ops.nsa.compressed_attention` on the generated Triton kernels
    (differentiable in q, ck, cv); the logits, only when asked for, from `reference.compressed_logits`.
    Elsewhere: the reference. The path taken is recorded in `paths["compressed"]` when a dict is given.
    The arguments are checked here (the op's schema would coerce or refuse Python scalars before its own
    checks see them), and again by the op.
    """
    check_inputs(q, ck, cv, num_mem, block_size, stride, causal, scale, query_offset)
    path = route(q, use_kernels)
    report(paths, "compressed", path)
    if path == "reference":
        out, logits = _reference(q, ck, cv, num_mem, block_size, stride, causal, scale, query_offset)
        return out, (logits if return_logits else None)
    out, _ = torch.ops.nsa.compressed_attention(q, ck, cv, int(num_mem), int(block_size), int(stride),
                                                bool(causal), float(scale), int(query_offset))
    logits = None
    if return_logits:
        from .. import reference

        logits = reference.compressed_logits(q, ck, num_mem=num_mem, stride=stride, causal=causal, scale=scale,
                                             query_offset=query_offset)
    return out, logits
