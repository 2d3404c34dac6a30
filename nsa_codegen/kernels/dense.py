"""Code shared by the dense-tile families (sliding window, compressed attention): argument checks of
(q, k, v)-shaped inputs, the launch-side checks, and the tile config of a dense kernel (its head dim,
padding and dot precision added to the chosen config). One tile holds whole groups of G query heads,
so G is bounded by the largest BLOCK_M of the configs.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from ..codegen import cache

from ._launch import choose_config, head_group, padded_head_dim, require_launch_device
from .checks import (require_4d, require_float, require_head_dim, require_kernel_dtype, require_heads, require_int32_extent,
                     require_last_dim_contiguous, require_same_device, require_same_dtype, require_same_shape,
                     require_tensor)

MAX_GROUP = 128  # the largest BLOCK_M of the tile configs: a tile holds whole groups


def check_attention_tensors(q, k, v, k_name: str = "k", v_name: str = "v") -> None:
    """q (b, n_q, H, d); k, v (b, n_k, K, d); float dtypes, one device, contiguous last dims."""
    named = {"q": q, k_name: k, v_name: v}
    for name, t in named.items():
        require_tensor(name, t)
        require_4d(name, t, "b, n, heads, d")
        require_float(name, t)
    require_same_dtype(**named)
    require_same_device(**named)
    b, _, h, d = q.shape
    require_same_shape(k_name, k, v_name, v)
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(
            f"{k_name}/{v_name} shape {tuple(k.shape)} must be (b, n, K, d) = ({b}, n, K, {d}) to match q"
        )
    require_heads(h, k.shape[2])


def check_launch(q, k, public: str, v=None, k_name: str = "k", v_name: str = "v") -> None:
    """What only the kernels (not the reference) need: the device, the dtypes and head dims they were
    generated for, contiguous last dims, whole groups in a tile, int32 offsets."""
    require_launch_device(q, public)
    named = {"q": q, k_name: k} if v is None else {"q": q, k_name: k, v_name: v}
    for name, t in named.items():
        require_kernel_dtype(name, t)
        require_last_dim_contiguous(name, t, allow_size_one=True)
    require_head_dim(int(q.shape[3]))
    group = head_group(q, k)
    if group > MAX_GROUP:
        raise ValueError(f"G = H // K = {group} query heads per kv head: the kernels support G <= {MAX_GROUP}")
    require_int32_extent("sliding-window / compressed", q=q, k=k)


def launch_config(module, d: int, dtype: torch.dtype, override: Optional[dict] = None,
                  tune=None) -> tuple[dict, dict]:
    """(constexprs, launch options) of a dense kernel: the chosen tile config (`override` for tests and
    benchmarks; `tune` = (kernel name, probe, run) for a tuned kernel, see `_launch.choose_config`) plus
    the head dim, its padding and the dot precision."""
    tile, launch = choose_config(module, d, dtype, override=override, tune=tune)
    bm, bn = tile["BLOCK_M"], tile["BLOCK_N"]
    if bm < max(16, module.GROUP) or bn < 16 or bm & (bm - 1) or bn & (bn - 1):
        raise ValueError(
            f"config {tile}: BLOCK_M, BLOCK_N must be powers of two >= 16 with BLOCK_M >= G = {module.GROUP}"
        )
    constexprs = {
        "HEAD_DIM": d,
        "BLOCK_D": padded_head_dim(d),
        "INPUT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "BLOCK_M": bm,
        "BLOCK_N": bn,
    }
    return constexprs, {"num_warps": launch.get("num_warps", 4), "num_stages": launch.get("num_stages", 2)}


def tuned_launch_config(module, kernel: str, d: int, q, override: Optional[dict], run) -> tuple[dict, dict]:
    """`launch_config` of one tuned kernel of a module with several: the kernels of one backward prefer
    different tiles, so each gets its own table key. `run((constexprs, launch))` launches the kernel
    once into scratch outputs (the tuning benchmark)."""
    if override is not None:
        return launch_config(module, d, q.dtype, override)
    return launch_config(module, d, q.dtype, tune=(kernel, q, lambda c: run(launch_config(module, d, q.dtype, c))))


def forward(spec, wrap, q, k, v, rule_args: tuple, scale, query_offset, config=None):
    """The forward launch of a dense family: (out, lse). The kernel's scalars are (n_q, n_k, query offset,
    K, *rule_args, scale); `rule_args` are the family's visibility parameters (the window; num_mem and
    stride)."""
    b, nq, h, d = q.shape
    nk, kh = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty((b, nq, h), device=q.device, dtype=torch.float32)
    if nq == 0 or b == 0:
        return out, lse
    module = cache.load_variant(spec)
    constexprs, launch = launch_config(module, d, q.dtype, config)
    grid = (triton.cdiv(nq, constexprs["BLOCK_M"] // module.GROUP), b * kh)
    wrap(module.kernel)[grid](
        q, k, v, out, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *lse.stride(),
        nq, nk, int(query_offset), kh, *(int(a) for a in rule_args), float(scale),
        **constexprs, **launch,
    )
    return out, lse
