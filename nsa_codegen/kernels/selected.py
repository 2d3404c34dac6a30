"""Selected attention (nsa-spec section 5) on generated Triton kernels.

Layers, fla style: generated kernels (templates/select_{fwd,bwd}.py.j2) -> plain launchers
(`selected_attention_fwd_launch`, `selected_attention_bwd_launch`: callable under TRITON_INTERPRET=1,
no torch.library) -> `torch.ops.nsa.selected_attention` (a `torch.library.triton_op`, so
torch.compile sees the kernels; autograd via `register_autograd`; CPU kernel = the reference) ->
the public `selected_attention` (docs/interfaces.md).

Inputs (bnhd): q (b, n, H, d); k, v (b, n, K, d) with H % K == 0; block_idx (b, n, Hs, kk) int32 or
int64; block_valid (b, n, Hs, kk) bool; gates (b, n, Hs, kk) float or None; Hs = K (the G = H // K
heads of a group share the selection) or Hs = H (unshared). Only the slots `reference.usable_selection`
keeps take part (valid, id in [0, ceil(n / l')), causal: before the own block); the others are ignored,
as by the reference. Any strides, as long as the last dim of q, k, v is contiguous: nothing is copied.
Supported head dims: multiples of 8 in [16, 256] (tiles pad to the next power of two and mask).
Outputs: out (b, n, H, d) in q's dtype and lse (b, n, H) fp32 (natural log; -inf for a query with no
key, whose out is 0).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from ..codegen import cache
from ..reference import usable_selection  # one selection contract, shared with the reference
from . import FAMILIES, _launch
from ..codegen.spec import padded_head_dim, pow2
from ._launch import choose_config, no_wrap, report, require_launch_device, route, split
from .checks import (alert_not_deterministic, require_bool, require_float, require_head_dim, require_heads,
                     require_index_dtype, require_int, require_int32_extent, require_kernel_dtype,
                     require_last_dim_contiguous, require_one_device, require_positive_int, require_same_dtype,
                     require_same_shape, require_saved, require_scale, require_tensors)


# ----------------------------------------------------------------------------------------------------
# validation (before any launch)


def check_inputs(q, k, v, block_idx, block_valid, gates, block_size, causal, scale, query_offset=0) -> None:
    """Raise ValueError / TypeError naming the offending argument and the allowed values. Keys are the
    queries' tokens (n_k = n) unless the queries sit after a cache (query_offset > 0: the reference
    path, any n_k)."""
    named = {"q": q, "k": k, "v": v, "block_idx": block_idx, "block_valid": block_valid}
    if gates is not None:
        named["gates"] = gates
    require_tensors(**named)
    for name in ("q", "k", "v"):
        require_float(name, named[name])
    require_same_dtype(q=q, k=k, v=v)
    require_one_device(named)
    require_int("query_offset", query_offset, 0)
    b, n, h, d = q.shape
    require_same_shape("k", k, "v", v)
    same_tokens = query_offset != 0 or k.shape[1] == n
    if k.shape[0] != b or k.shape[3] != d or not same_tokens:
        n_k = "n_k" if query_offset else n
        raise ValueError(f"k/v shape {tuple(k.shape)} must be (b, n_k, K, d) = ({b}, {n_k}, K, {d}) to match q "
                         f"(n_k = n without a query_offset)")
    kh = k.shape[2]
    require_heads(h, kh)
    require_index_dtype("block_idx", block_idx)
    if block_valid.dtype != torch.bool:
        raise TypeError(f"block_valid dtype must be torch.bool, got {block_valid.dtype}")
    sel_shape = tuple(block_idx.shape)
    if sel_shape[:2] != (b, n) or sel_shape[2] not in (kh, h):
        raise ValueError(
            f"block_idx shape {sel_shape} must be (b, n, Hs, kk) with b={b}, n={n} and Hs = K = {kh} "
            f"(shared selection) or Hs = H = {h} (unshared), i.e. mismatched heads"
        )
    if tuple(block_valid.shape) != sel_shape:
        raise ValueError(f"block_valid shape {tuple(block_valid.shape)} must equal block_idx shape {sel_shape}")
    if gates is not None:
        if tuple(gates.shape) != sel_shape:
            raise ValueError(f"gates shape {tuple(gates.shape)} must equal block_idx shape {sel_shape}")
        require_float("gates", gates)
    require_positive_int("block_size", block_size)
    require_bool("causal", causal, note="")
    require_scale(scale)


def _check_kernel_limits(q, k, v, block_idx) -> None:
    """What only the kernels (not the reference) need beyond the device: the dtypes and head dims they
    were generated for, contiguous last dims, int32 offsets."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        require_kernel_dtype(name, t)
        require_last_dim_contiguous(name, t)
    require_head_dim(int(q.shape[3]))
    require_int32_extent("selected-attention", q=q, k=k, v=v, block_idx=block_idx)


def _check_op(q, k, v, block_idx, block_valid, gates, block_size, causal, scale, saved=None) -> None:
    """What every body of the ops runs first, on every device (the triton_op body is also the fake / meta
    implementation): the arguments, the backward's saved tensors (out, lse, dout), and on CUDA tensors
    the kernels' limits."""
    check_inputs(q, k, v, block_idx, block_valid, gates, block_size, causal, scale)
    if saved is not None:
        require_saved(q, *saved)
    if q.is_cuda:
        _check_kernel_limits(q, k, v, block_idx)


# ----------------------------------------------------------------------------------------------------
# launch helpers


def selection_group(num_heads: int, num_kv_heads: int, selection_heads: int) -> int:
    """Query heads packed per program: G = H // K when the group shares its selection (Hs = K),
    1 when every query head selects its own blocks (Hs = H)."""
    if selection_heads == num_kv_heads:
        return num_heads // num_kv_heads
    if selection_heads == num_heads:
        return 1
    raise ValueError(
        f"block_idx has {selection_heads} selection heads; expected {num_kv_heads} (kv heads, shared "
        f"selection) or {num_heads} (query heads, unshared selection)"
    )


def variant_specs(q, k, block_idx, *, block_size: int, causal: bool):
    """(forward, backward) VariantSpecs from metadata: q (b, n, H, d), k (b, n, K, d), block_idx
    (b, n, Hs, kk). Head counts are structural: int() specializes symbolic sizes."""
    group = selection_group(int(q.shape[2]), int(k.shape[2]), int(block_idx.shape[2]))
    return FAMILIES["selected"].specs(group, causal, block_size)


def _launch_fwd(module, cfg, wrap, q, k, v, block_idx, block_valid, gates, scale, out, lse):
    b, n = q.shape[:2]
    h, d, kh = int(q.shape[2]), int(q.shape[3]), int(k.shape[2])  # structural: specialize symbolic sizes
    hs, kk = int(block_idx.shape[2]), int(block_idx.shape[3])
    constexprs, launch = cfg
    g = gates if gates is not None else block_idx  # dummy pointer, never read when HAS_GATES=False
    g_strides = gates.stride() if gates is not None else (0, 0, 0, 0)
    grid = (triton.cdiv(n, module.TOKENS_PER_PROGRAM), b * hs)
    wrap(module.kernel)[grid](
        q, k, v, block_idx, block_valid, g, out, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *block_idx.stride(), *block_valid.stride(), *g_strides,
        *out.stride()[:3], *lse.stride(),
        n, hs, h // kh, kk, float(scale),
        HEAD_DIM=d, BLOCK_D=padded_head_dim(d), KK_PAD=max(2, pow2(kk)), HAS_GATES=gates is not None,
        **constexprs, **launch,
    )


def _fwd(q, k, v, block_idx, block_valid, gates, block_size, causal, scale, wrap, module=None, out=None, lse=None):
    """The forward launch; its tile config is tuned per (head dim, dtype, n bucket, GPU) through
    `_launch_fwd` into scratch outputs."""
    b, n, h = q.shape[:3]
    # the slots the reference uses, and no other: the kernels read a valid slot's block whatever its id
    # (outside K / V for an id out of range; a causal own or later block in full, future keys included)
    block_valid = usable_selection(block_idx, block_valid, n, block_size, causal)
    if module is None:
        module = cache.load_variant(variant_specs(q, k, block_idx, block_size=block_size, causal=causal)[0])
    if out is None:
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    if lse is None:
        lse = torch.empty((b, n, h), device=q.device, dtype=torch.float32)
    args = (q, k, v, block_idx, block_valid, gates, scale)

    def run(config):  # one launch into scratch out / lse: the caller's tensors stay untouched
        _launch_fwd(module, split(config), _launch.no_wrap, *args, torch.empty_like(out), torch.empty_like(lse))

    cfg = choose_config(module, int(q.shape[3]), q.dtype, tune=(None, q, run))
    _launch_fwd(module, cfg, wrap, *args, out, lse)
    return out, lse


def dkv_schedule(block_idx, block_valid, n: int, block_size: int, causal: bool, segment: int):
    """Invert the selection for the key-major dkv kernel, on the device, without a host sync.

    Returns (entries, segments): entries (b * Hs, n * kk) int32 holds token * kk + slot of every valid
    selection, grouped by key block (invalid ones last); segments (b * Hs, S, 4) int32 rows are
    (key block or -1, first entry, end entry, 1 if the first segment of its block). A block's entries
    are cut into ceil(count / segment) segments; when causal every block gets at least one (its
    own-block queries). S = ceil(n * kk / segment) + number of blocks bounds the count from metadata.
    """
    b, _, hs, kk = block_idx.shape
    bh = b * hs
    num_blocks = -(-n // block_size)
    dev = block_idx.device
    # int32 keys (a GPU radix sort passes over half the bits of int64); the slots selected attention
    # ignores (reference.usable_selection: invalid, out of range, causal own or later block) go to the
    # sentinel bucket num_blocks, sorted last; the test runs on the original dtype, before the cast
    live_entry = usable_selection(block_idx, block_valid, n, block_size, causal)
    key = block_idx.to(torch.int32, copy=True).masked_fill_(~live_entry, num_blocks)  # never the caller's tensor
    del live_entry
    key = key.permute(0, 2, 1, 3).reshape(bh, n * kk)
    # stable: tokens stay in ascending order within a block (locality of the q / dO gathers)
    key, order = torch.sort(key, dim=1, stable=True)
    entries = order.to(torch.int32)
    del order
    bounds = torch.searchsorted(key, torch.arange(num_blocks + 1, device=dev, dtype=torch.int32)
                                .expand(bh, num_blocks + 1).contiguous())
    entry_start, entry_end = bounds[:, :-1], bounds[:, 1:]
    counts = entry_end - entry_start
    nseg = (counts + segment - 1) // segment
    if causal:
        nseg = nseg.clamp(min=1)
    seg_end = nseg.cumsum(1)  # (bh, blocks) inclusive prefix: segments of blocks 0..j
    seg_total = -(-(n * kk) // segment) + num_blocks
    sid = torch.arange(seg_total, device=dev, dtype=torch.int64).expand(bh, seg_total).contiguous()
    owner = torch.searchsorted(seg_end, sid, right=True)  # block owning segment sid (num_blocks: none)
    live = owner < num_blocks
    owner = owner.clamp(max=num_blocks - 1)
    j = sid - (seg_end.gather(1, owner) - nseg.gather(1, owner))  # segment index within its block
    first = entry_start.gather(1, owner) + j * segment
    end = torch.minimum(first + segment, entry_end.gather(1, owner))
    segments = torch.stack([torch.where(live, owner, -1), first, end, (j == 0).to(torch.int64)], -1)
    return entries, segments.to(torch.int32).contiguous()


def dkv_launch(block_d: int) -> dict:
    """dkv kernel launch parameters by padded head dim. Measured on the H200 (bf16, d=128, l'=64, kk=16,
    G=16, n=64k; scripts/gpu_select_bwd_profile.py): 4 warps 16.4 ms, 8 warps 31.3 ms, stages 1 ~ 2 ~ 3.
    At d=256 the fp32 dk, dv accumulators (2 x 64 keys x 256) need 8 warps to stay in registers."""
    return dict(num_warps=8 if block_d >= 256 else 4, num_stages=1)


def _launch_dkv(module, wrap, q, k, v, g, g_strides, has_gates, dout, lse, delta, dk, dv, entries, segments, hs, kk,
                scale, num_warps, num_stages):
    """dk, dv (fp32, zeroed) += the key-major backward over the inverted selection `dkv_schedule` made."""
    b, n = q.shape[:2]  # may be symbolic under torch.compile(dynamic=True): not int()-specialized
    h, d = int(q.shape[2]), int(q.shape[3])
    grid = (segments.shape[1], module.DKV_KEY_TILES, b * hs)
    wrap(module.dkv_kernel)[grid](
        q, k, v, g, dout, lse, delta, dk, dv, entries, segments,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *g_strides,
        *dout.stride()[:3], *lse.stride(), *dk.stride()[:3], *dv.stride()[:3],
        entries.stride(0), segments.stride(0),
        n, hs, h // int(k.shape[2]), kk, float(scale),
        HEAD_DIM=d, BLOCK_D=padded_head_dim(d), HAS_GATES=has_gates,
        num_warps=num_warps, num_stages=num_stages,
    )


def _bwd(q, k, v, block_idx, block_valid, gates, out, lse, dout, block_size, causal, scale, wrap, module=None,
         dq=None):
    alert_not_deterministic("nsa::selected_attention backward", "dk and dv add partial sums of several programs "
                            "with fp32 atomics (segments of one key block, selection heads of one kv head)")
    b, n = q.shape[:2]
    block_valid = usable_selection(block_idx, block_valid, n, block_size, causal)  # as in _fwd
    h, d, kh = int(q.shape[2]), int(q.shape[3]), int(k.shape[2])  # structural: specialize symbolic sizes
    hs, kk = int(block_idx.shape[2]), int(block_idx.shape[3])
    if module is None:
        module = cache.load_variant(variant_specs(q, k, block_idx, block_size=block_size, causal=causal)[1])
    constexprs, launch = choose_config(module, d, q.dtype)
    block_d = padded_head_dim(d)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    if out.stride(-1) != 1:
        out = out.contiguous()
    # delta = rowsum(dout * out): written by the dq kernel, read by the dkv kernel
    delta = torch.empty_strided(lse.shape, lse.stride(), device=lse.device, dtype=torch.float32)
    if dq is None:
        dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
    dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
    if gates is not None:
        dg = torch.zeros(block_idx.shape, device=q.device, dtype=torch.float32)
        g, g_strides = gates, gates.stride()
    else:
        dg = torch.empty((0,), device=q.device, dtype=torch.float32)
        g, g_strides = block_idx, (0, 0, 0, 0)
    dg_strides = dg.stride() if gates is not None else (0, 0, 0, 0)
    # query-major: dq and d(gates)
    grid = (triton.cdiv(n, module.TOKENS_PER_PROGRAM), b * hs)
    wrap(module.kernel)[grid](
        q, k, v, block_idx, block_valid, g, dout, out, lse, delta, dq, dg,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *block_idx.stride(), *block_valid.stride(), *g_strides,
        *dout.stride()[:3], *out.stride()[:3], *lse.stride(),
        *dq.stride()[:3], *dg_strides,
        n, hs, h // kh, kk, float(scale),
        HEAD_DIM=d, BLOCK_D=block_d, KK_PAD=max(2, pow2(kk)), HAS_GATES=gates is not None,
        **constexprs, **launch,
    )
    # key-major: dk and dv over the inverted selection
    entries, segments = dkv_schedule(block_idx, block_valid, n, block_size, causal, module.DKV_SEGMENT)
    _launch_dkv(module, wrap, q, k, v, g, g_strides, gates is not None, dout, lse, delta, dk, dv, entries, segments,
                hs, kk, scale, **dkv_launch(block_d))
    dgates = dg.to(gates.dtype) if gates is not None else dg
    return dq, dk.to(k.dtype), dv.to(v.dtype), dgates


# ----------------------------------------------------------------------------------------------------
# plain launchers (interpreter-callable)


def selected_attention_fwd_launch(q, k, v, block_idx, block_valid, gates=None, *, block_size, causal, scale,
                                  module=None, out=None, lse=None):
    """Launch the forward kernel; returns (out, lse). `module` overrides the generated variant (e.g. a
    padding-baseline render for benchmarks); `out` (q's shape and dtype, any strides with a contiguous
    last dim) and `lse` ((b, n, H) float32) may be given preallocated."""
    check_inputs(q, k, v, block_idx, block_valid, gates, block_size, causal, scale)
    require_launch_device(q, "nsa_codegen.kernels.selected.selected_attention")
    _check_kernel_limits(q, k, v, block_idx)
    b, n, h, d = q.shape
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1):
        raise ValueError(f"out must have q's shape {tuple(q.shape)}, dtype {q.dtype} and a contiguous last dim")
    if lse is not None and (tuple(lse.shape) != (b, n, h) or lse.dtype != torch.float32):
        raise ValueError(f"lse must be float32 of shape {(b, n, h)}, got {lse.dtype} {tuple(lse.shape)}")
    return _fwd(q, k, v, block_idx, block_valid, gates, block_size, causal, scale, no_wrap, module, out, lse)


def selected_attention_bwd_launch(q, k, v, block_idx, block_valid, gates, out, lse, dout, *, block_size, causal,
                                  scale, module=None, dq=None):
    """Launch the backward kernel; returns (dq, dk, dv, dgates) (dgates is an empty tensor without gates)."""
    check_inputs(q, k, v, block_idx, block_valid, gates, block_size, causal, scale)
    require_launch_device(q, "nsa_codegen.kernels.selected.selected_attention")
    _check_kernel_limits(q, k, v, block_idx)
    require_saved(q, out, lse, dout)
    if dq is not None and (dq.shape != q.shape or dq.dtype != q.dtype or dq.stride(-1) != 1):
        raise ValueError(f"dq must have q's shape {tuple(q.shape)}, dtype {q.dtype} and a contiguous last dim")
    return _bwd(q, k, v, block_idx, block_valid, gates, out, lse, dout, block_size, causal, scale, no_wrap, module,
                dq)


# selected_attention_launch: the name docs/interfaces.md gives the plain forward launcher
selected_attention_launch = selected_attention_fwd_launch


# ----------------------------------------------------------------------------------------------------
# torch.library: nsa::selected_attention (+ its backward op)


@torch.library.triton_op("nsa::selected_attention", mutates_args=())
def _selected_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor, block_valid: torch.Tensor,
    gates: Optional[torch.Tensor], block_size: int, causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_op(q, k, v, block_idx, block_valid, gates, block_size, causal, scale)
    from torch.library import wrap_triton

    return _fwd(q, k, v, block_idx, block_valid, gates, block_size, causal, scale, wrap_triton)


@torch.library.triton_op("nsa::selected_attention_backward", mutates_args=())
def _selected_attention_bwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor, block_valid: torch.Tensor,
    gates: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
    block_size: int, causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_op(q, k, v, block_idx, block_valid, gates, block_size, causal, scale, (out, lse, dout))
    from torch.library import wrap_triton

    return _bwd(q, k, v, block_idx, block_valid, gates, out, lse, dout, block_size, causal, scale, wrap_triton)


@_selected_attention_op.register_kernel("cpu")
def _selected_attention_cpu(q, k, v, block_idx, block_valid, gates, block_size, causal, scale):
    _check_op(q, k, v, block_idx, block_valid, gates, block_size, causal, scale)
    from .. import reference

    kw = dict(block_size=block_size, causal=causal, scale=scale)
    with torch.no_grad():
        out = reference.selected_attention(q, k, v, block_idx, block_valid, gates, **kw)
        lse = reference.selected_attention_lse(q, k, block_idx, block_valid, gates, **kw)
    return out.contiguous(), lse


@_selected_attention_bwd_op.register_kernel("cpu")
def _selected_attention_bwd_cpu(q, k, v, block_idx, block_valid, gates, out, lse, dout, block_size, causal, scale):
    """Gradients of the reference by autograd. A custom op's kernel runs below the dispatcher's autograd
    layer (autograd keys excluded), and the reference checkpoints its chunks (no torch.func), so the
    autograd keys are re-enabled for this computation."""
    _check_op(q, k, v, block_idx, block_valid, gates, block_size, causal, scale, (out, lse, dout))
    from .. import reference

    excluded = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradCPU, torch._C.DispatchKey.ADInplaceOrView):
        excluded = excluded - torch._C.DispatchKeySet(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded), torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        g = gates.detach().requires_grad_() if gates is not None else None
        o = reference.selected_attention(*inputs, block_idx, block_valid, g, block_size=block_size,
                                         causal=causal, scale=scale)
        wrt = inputs + ([g] if g is not None else [])
        grads = torch.autograd.grad(o, wrt, dout)
    dgates = grads[3] if gates is not None else q.new_empty((0,), dtype=torch.float32)
    return grads[0], grads[1], grads[2], dgates


def _setup_context(ctx, inputs, output):
    q, k, v, block_idx, block_valid, gates, block_size, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, block_idx, block_valid, gates, out, lse)
    ctx.block_size, ctx.causal, ctx.scale = block_size, causal, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, block_idx, block_valid, gates, out, lse = ctx.saved_tensors
    dq, dk, dv, dgates = torch.ops.nsa.selected_attention_backward(
        q, k, v, block_idx, block_valid, gates, out, lse, dout, ctx.block_size, ctx.causal, ctx.scale
    )
    return dq, dk, dv, None, None, (dgates if gates is not None else None), None, None, None


_selected_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# public


def selected_attention(q, k, v, block_idx, block_valid, gates=None, *, block_size, causal, scale, query_offset=0,
                       use_kernels=True, paths=None):
    """Attention of each query over its selected key blocks (nsa-spec section 5); returns out (b, n, H, d).

    Same contract as `reference.selected_attention`. CUDA (and `use_kernels`), without a query offset:
    `torch.ops.nsa.selected_attention` on the generated Triton kernels (differentiable in q, k, v and
    gates). Elsewhere, and for queries placed after a cache (`query_offset` > 0, decoding): the
    reference. The path taken is recorded in `paths["selected"]` when a dict is given. The arguments are
    checked here (the op's schema would coerce or refuse Python scalars before its own checks see them),
    and again by the op.
    """
    check_inputs(q, k, v, block_idx, block_valid, gates, block_size, causal, scale, query_offset)
    path = "reference" if query_offset else route(q, use_kernels)
    report(paths, "selected", path)
    if path == "reference":
        from .. import reference

        return reference.selected_attention(q, k, v, block_idx, block_valid, gates, block_size=block_size,
                                            causal=causal, scale=scale, query_offset=query_offset)
    out, _ = torch.ops.nsa.selected_attention(q, k, v, block_idx, block_valid, gates, block_size, causal,
                                              float(scale))
    return out
