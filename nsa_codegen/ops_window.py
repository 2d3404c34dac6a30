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

import os
from functools import lru_cache
from typing import Optional

import torch
import triton

from . import cache, tuning
from .checks import FLOAT_DTYPES, HEAD_DIM_MAX, HEAD_DIM_MIN, HEAD_DIM_MULTIPLE  # noqa: F401
from .checks import (require_bool, require_float, require_head_dim, require_heads, require_int,
                     require_last_dim_contiguous, require_same_device, require_same_dtype, require_same_shape,
                     require_scale, require_tensor, require_4d, require_int32_extent)
from .dispatch import head_group
from .spec import VariantSpec

MAX_GROUP = 128  # the largest BLOCK_M of the tile configs: a tile holds whole groups


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(x: int) -> int:
    return 1 << (max(1, x) - 1).bit_length()


# ----------------------------------------------------------------------------------------------------
# validation (before any launch); shared with ops_compressed


def check_attention_tensors(q, k, v, k_name: str = "k", v_name: str = "v") -> None:
    """q (b, n_q, H, d); k, v (b, n_k, K, d); float dtypes, one device, contiguous last dims."""
    named = {"q": q, k_name: k, v_name: v}
    for name, t in named.items():
        require_tensor(name, t)
        require_4d(name, t, "b, n, heads, d")
        require_float(name, t)
        require_last_dim_contiguous(name, t, allow_size_one=True)
    require_same_dtype(**named)
    require_same_device(**named)
    b, _, h, d = q.shape
    require_same_shape(k_name, k, v_name, v)
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(
            f"{k_name}/{v_name} shape {tuple(k.shape)} must be (b, n, K, d) = ({b}, n, K, {d}) to match q"
        )
    require_heads(h, k.shape[2])
    require_head_dim(d)


def check_inputs(q, k, v, window, causal, scale, query_offset=0) -> None:
    """Raise ValueError / TypeError naming the offending argument and the allowed values."""
    check_attention_tensors(q, k, v)
    require_int("window", window, 0)
    require_bool("causal", causal)
    require_scale(scale, note=" (e.g. d ** -0.5)")
    require_int("query_offset", query_offset, 0)


def check_launch(q, k) -> None:
    """What only the kernels (not the reference) need."""
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"the Triton launchers need CUDA tensors (or TRITON_INTERPRET=1), got device {q.device}; "
            "use the public function, which runs the reference on CPU"
        )
    group = head_group(q, k)
    if group > MAX_GROUP:
        raise ValueError(f"G = H // K = {group} query heads per kv head: the kernels support G <= {MAX_GROUP}")
    require_int32_extent("sliding-window / compressed", q=q, k=k)


# ----------------------------------------------------------------------------------------------------
# launch helpers


@lru_cache(maxsize=None)
def _pick_config(module, block_d: int, dtype_bytes: int) -> dict:
    """First kept config of the generated module (render-time preference order) whose recorded head-dim
    limit fits; memoized, so the per-call path is a dict lookup."""
    key = "max_d16" if dtype_bytes <= 2 else "max_d32"
    fitting = [c for c in module.CONFIGS if c[key] >= block_d]
    return fitting[0] if fitting else module.CONFIGS[-1]


def launch_config(module, d: int, dtype: torch.dtype, config: Optional[dict] = None) -> tuple[dict, dict]:
    """(constexprs, launch options) of the chosen tile config; `config` overrides (tests, benchmarks)."""
    c = config if config is not None else _pick_config(module, _pow2(max(16, d)), torch.finfo(dtype).bits // 8)
    bm, bn = c["BLOCK_M"], c["BLOCK_N"]
    if bm < max(16, module.GROUP) or bn < 16 or bm & (bm - 1) or bn & (bn - 1):
        raise ValueError(
            f"config {c}: BLOCK_M, BLOCK_N must be powers of two >= 16 with BLOCK_M >= G = {module.GROUP}"
        )
    constexprs = {
        "HEAD_DIM": d,
        "BLOCK_D": _pow2(max(16, d)),
        "INPUT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "BLOCK_M": c["BLOCK_M"],
        "BLOCK_N": c["BLOCK_N"],
    }
    return constexprs, {"num_warps": c.get("num_warps", 4), "num_stages": c.get("num_stages", 2)}


def tuned_kernel_config(module, kernel: str, d: int, q, config, run) -> tuple[dict, dict]:
    """(constexprs, launch) for one kernel of a module with several: `config` when given (tests,
    benchmarks), else the kernel's own tuned config (nsa_codegen.tuning). The compressed backward's two
    kernels prefer different tiles (H200, n = 64k, d = 128: dq_kernel 41.3 ms at BLOCK_M 64 / 8 warps,
    19.5 at BLOCK_M 128; dkdv_kernel 63.6 vs 44.9 at 32 x 32 / 4 warps). `run((constexprs, launch))`
    launches the kernel once into scratch outputs (the tuning benchmark)."""
    if config is not None:
        return launch_config(module, d, q.dtype, config)

    def run_config(c):
        run(launch_config(module, d, q.dtype, c))

    constexprs, launch = tuning.kernel_config(module, kernel, d, q.dtype, q.shape[1], q, run_config)
    return launch_config(module, d, q.dtype, {**constexprs, **launch})  # + HEAD_DIM, BLOCK_D, precision


def _no_wrap(kernel):
    return kernel


def alloc_output(shape, device, dtype) -> torch.Tensor:
    """Every kernel output is allocated here (uninitialised; every element is written by a kernel).
    Tests replace it with a NaN-filling allocator to check that."""
    return torch.empty(shape, device=device, dtype=dtype)


def variant_specs(q, k, causal: bool) -> tuple[VariantSpec, VariantSpec]:
    """(forward, backward) variants from metadata only."""
    group = head_group(q, k)
    return VariantSpec("window_fwd", 0, group, bool(causal)), VariantSpec("window_bwd", 0, group, bool(causal))


def _fwd(q, k, v, window, causal, scale, query_offset, wrap, config=None):
    b, nq, h, d = q.shape
    nk, kh = k.shape[1], k.shape[2]
    out = alloc_output(q.shape, q.device, q.dtype)
    lse = alloc_output((b, nq, h), q.device, torch.float32)
    if nq == 0 or b == 0:
        return out, lse
    module = cache.load_variant(variant_specs(q, k, causal)[0])
    constexprs, launch = launch_config(module, d, q.dtype, config)
    grid = (triton.cdiv(nq, constexprs["BLOCK_M"] // module.GROUP), b * kh)
    wrap(module.kernel)[grid](
        q, k, v, out, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *lse.stride(),
        nq, nk, int(query_offset), kh, int(window), float(scale),
        **constexprs, **launch,
    )
    return out, lse


def _bwd(q, k, v, out, lse, dout, window, causal, scale, query_offset, wrap, config=None):
    b, nq, h, d = q.shape
    nk, kh = k.shape[1], k.shape[2]
    dq = alloc_output(q.shape, q.device, q.dtype)
    dk = alloc_output(k.shape, k.device, k.dtype)
    dv = alloc_output(v.shape, v.device, v.dtype)
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
    check_launch(q, k)
    return _fwd(q, k, v, window, causal, scale, query_offset, _no_wrap, config)


def sliding_window_bwd_launch(q, k, v, out, lse, dout, *, window, causal, scale, query_offset=0, config=None):
    """Launch the backward kernels; returns (dq, dk, dv)."""
    check_inputs(q, k, v, window, causal, scale, query_offset)
    check_launch(q, k)
    check_saved(q, out, lse, dout)
    return _bwd(q, k, v, out, lse, dout, window, causal, scale, query_offset, _no_wrap, config)


def check_saved(q, out, lse, dout) -> None:
    if tuple(out.shape) != tuple(q.shape) or tuple(dout.shape) != tuple(q.shape):
        raise ValueError(
            f"out and dout must have q's shape {tuple(q.shape)}, got {tuple(out.shape)} and {tuple(dout.shape)}"
        )
    if tuple(lse.shape) != tuple(q.shape[:3]) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 of shape {tuple(q.shape[:3])}, got {lse.dtype} {tuple(lse.shape)}")


# ----------------------------------------------------------------------------------------------------
# torch.library: nsa::sliding_window_attention (+ its backward op)


def _window_keys(i0, i1, nk, window, causal, query_offset):
    """Key range [j0, j1) of the queries [i0, i1) (local indices) and the chunk's (i, j) visibility."""
    j0 = max(0, i0 + query_offset - window)
    j1 = min(nk, i1 + query_offset + (0 if causal else window))
    return j0, j1


def _window_visible(i0, i1, j0, j1, window, causal, query_offset, device):
    pos = torch.arange(i0, i1, device=device) + query_offset
    keys = torch.arange(j0, j1, device=device)
    upper = pos[:, None] if causal else pos[:, None] + window
    return (keys[None, :] >= pos[:, None] - window) & (keys[None, :] <= upper)


def dense_attention_backward(q, k, v, out, dout, scale, key_range, visible, chunk=128):
    """Attention gradients in plain torch without autograd (usable inside a custom op's CPU kernel,
    where autograd does not record), chunked over queries. key_range(i0, i1) -> (j0, j1);
    visible(i0, i1, j0, j1) -> (i1 - i0, j1 - j0) bool. Returns (dq, dk, dv) in the inputs' dtypes."""
    b, nq, h, d = q.shape
    kh = k.shape[2]
    g = h // kh
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
    dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
    for i0 in range(0, nq, chunk):
        i1 = min(nq, i0 + chunk)
        j0, j1 = key_range(i0, i1)
        if j1 <= j0:
            continue
        c = i1 - i0
        qi = q[:, i0:i1].float().reshape(b, c, kh, g, d)
        doi = dout[:, i0:i1].float().reshape(b, c, kh, g, d)
        oi = out[:, i0:i1].float().reshape(b, c, kh, g, d)
        kj, vj = k[:, j0:j1].float(), v[:, j0:j1].float()
        s = torch.einsum("bnkgd,bmkd->bnkgm", qi, kj) * scale
        s = s.masked_fill(~visible(i0, i1, j0, j1)[None, :, None, None, :], float("-inf"))
        lse = torch.logsumexp(s, -1, keepdim=True)
        p = torch.exp(s - lse.nan_to_num(posinf=0.0, neginf=0.0)).nan_to_num(0.0)  # rows without keys: 0
        dp = torch.einsum("bnkgd,bmkd->bnkgm", doi, vj)
        ds = p * (dp - (doi * oi).sum(-1, keepdim=True))
        dq[:, i0:i1] = (torch.einsum("bnkgm,bmkd->bnkgd", ds, kj) * scale).reshape(b, c, h, d)
        dk[:, j0:j1] += torch.einsum("bnkgm,bnkgd->bmkd", ds, qi) * scale
        dv[:, j0:j1] += torch.einsum("bnkgm,bnkgd->bmkd", p, doi)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def reference_lse(q, k, window, causal, scale, query_offset=0, chunk=128):
    """lse (b, n_q, H) fp32 of the window logits, chunked over queries (any device)."""
    b, nq, h, d = q.shape
    nk, kh = k.shape[1], k.shape[2]
    g = h // kh
    lse = torch.empty((b, nq, h), device=q.device, dtype=torch.float32)
    for i0 in range(0, nq, chunk):
        i1 = min(nq, i0 + chunk)
        j0, j1 = _window_keys(i0, i1, nk, window, causal, query_offset)
        if j1 <= j0:
            lse[:, i0:i1] = float("-inf")
            continue
        vis = _window_visible(i0, i1, j0, j1, window, causal, query_offset, q.device)
        qi = q[:, i0:i1].float().reshape(b, i1 - i0, kh, g, d)
        s = torch.einsum("bnkgd,bmkd->bnkgm", qi, k[:, j0:j1].float()) * scale
        s = s.masked_fill(~vis[None, :, None, None, :], float("-inf"))
        lse[:, i0:i1] = torch.logsumexp(s, -1).reshape(b, i1 - i0, h)
    return lse


@torch.library.triton_op("nsa::sliding_window_attention", mutates_args=())
def _sliding_window_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, causal: bool, scale: float, query_offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.library import wrap_triton

    return _fwd(q, k, v, window, causal, scale, query_offset, wrap_triton)


@torch.library.triton_op("nsa::sliding_window_attention_backward", mutates_args=())
def _sliding_window_bwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
    window: int, causal: bool, scale: float, query_offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from torch.library import wrap_triton

    return _bwd(q, k, v, out, lse, dout, window, causal, scale, query_offset, wrap_triton)


@_sliding_window_op.register_kernel("cpu")
def _sliding_window_cpu(q, k, v, window, causal, scale, query_offset):
    from . import reference

    with torch.no_grad():
        out = reference.sliding_window_attention(q, k, v, window=window, causal=causal, scale=scale,
                                                 query_offset=query_offset)
        lse = reference_lse(q, k, window, causal, scale, query_offset)
    return out.contiguous(), lse


@_sliding_window_bwd_op.register_kernel("cpu")
def _sliding_window_bwd_cpu(q, k, v, out, lse, dout, window, causal, scale, query_offset):
    nk = k.shape[1]
    return dense_attention_backward(
        q, k, v, out, dout, scale,
        key_range=lambda i0, i1: _window_keys(i0, i1, nk, window, causal, query_offset),
        visible=lambda i0, i1, j0, j1: _window_visible(i0, i1, j0, j1, window, causal, query_offset, q.device),
    )


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


def sliding_window_attention(q, k, v, *, window, causal, scale, query_offset=0, chunk_size=None):
    """Sliding-window attention (nsa-spec section 6); returns out (b, n_q, H, d).

    Same contract as `reference.sliding_window_attention`. CUDA: `torch.ops.nsa.sliding_window_attention`
    on the generated Triton kernels (differentiable in q, k, v; `chunk_size` is not used there).
    Elsewhere: the reference.
    """
    check_inputs(q, k, v, window, causal, scale, query_offset)
    if q.device.type != "cuda":
        from . import reference

        return reference.sliding_window_attention(q, k, v, window=window, causal=causal, scale=scale,
                                                  query_offset=query_offset, chunk_size=chunk_size)
    check_launch(q, k)
    out, _ = torch.ops.nsa.sliding_window_attention(q, k, v, int(window), bool(causal), float(scale),
                                                    int(query_offset))
    return out
