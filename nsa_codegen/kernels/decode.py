"""Decoding attention (nsa-spec section 8) on generated Triton kernels: one query token per sequence
against keys chosen per sequence on the device, from the buffers of a preallocated decoding cache.

Layers, fla style: generated kernels (templates/decode_fwd.py.j2: `range_kernel`, `selected_kernel`,
`combine_kernel`) -> plain launchers (`decode_range_attention_launch`, `decode_selected_attention_launch`:
callable under TRITON_INTERPRET=1, no torch.library) -> `torch.ops.nsa.decode_range_attention` and
`torch.ops.nsa.decode_selected_attention` (`torch.library.triton_op`s, so torch.compile sees the kernels;
CPU kernel = the reference) -> the public `decode_range_attention` and `decode_selected_attention` (same
contracts as the reference functions of those names).

Forward only: decoding needs no gradient (the module decodes under no_grad), so the ops register no
autograd formula; a backward through them raises.

Inputs: q (b, H, d), one token per sequence; k, v (b, N, K, d) with H % K == 0 (kv head h // G, never
expanded), any strides with a contiguous last dim; per-sequence integers (b,) int32 or int64 on q's device.
- range: keys [lo, min(hi, lo + max_keys)) within [0, N): the sliding window ([t - W, t + 1)), the
  compressed rows with their memory rows ([0, M + t // s)). `max_keys` is a static bound on the range.
- selected: block_idx, block_valid (b, Hs, kk), Hs = K (shared selection) or H, positions (b,): the own
  block positions // l' restricted to keys <= position, and every usable slot's block (valid,
  0 <= id < own block: `reference.usable_selection` for n = position + 1). Gates are not taken (their
  forward value is 1).
Outputs: out (b, H, d) in q's dtype and lse (b, H) fp32 (natural log; out 0 and lse -inf for a query
without keys). Head dims: multiples of 8 in [16, 256].

Flash-decoding: grid axis 0 splits each sequence's keys (the range on the BLOCK_N grid; the selection's
slots, the own block being the last one) over `num_splits` programs, which write normalized partial
outputs and lse to fp32 scratch (b, splits, H, d) and (b, splits, H); `combine_kernel` merges them. The
split count is a launch parameter, chosen by default from metadata only (`choose_splits`: the static key
bound and the number of (sequence, head group) programs against the GPU's multiprocessors), so one
sequence of a long context fills the GPU and a large batch is not over-split. Nothing reads a tensor's
values on the host: a decoding step on these ops can be captured in a CUDA graph.

Variant: `decode_fwd_g{G}_causal`, G = H // K for the range kernel and a shared selection, 1 for an
unshared selection; N, the ranges, the positions, l' and the split count are runtime.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
import triton

from ..codegen import cache
from ..codegen.spec import padded_head_dim, pow2
from . import FAMILIES
from ._launch import choose_config, no_wrap, report, require_launch_device, route
from .checks import (require_float, require_head_dim, require_heads, require_index_dtype, require_int,
                     require_int32_extent, require_kernel_dtype, require_last_dim_contiguous, require_one_device,
                     require_positive_int, require_same_dtype, require_same_shape, require_scale, require_tensor)

PUBLIC_RANGE = "nsa_codegen.kernels.decode.decode_range_attention"
PUBLIC_SELECTED = "nsa_codegen.kernels.decode.decode_selected_attention"
MAX_SPLITS = 128  # the combine kernel holds every split of a head in one tile
MIN_KEYS_PER_SPLIT = 256  # below this, a split's fixed cost (q load, partial store, combine) dominates
NOMINAL_SMS = 132  # the multiprocessor count assumed off CUDA (the interpreter): an H100 / H200's


# ----------------------------------------------------------------------------------------------------
# validation (before any launch)


def _require_shape(name: str, t, shape: tuple, layout: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {layout} = {tuple(shape)}, got {tuple(t.shape)}")


def _check_common(q, k, v, scale, num_splits, ints: dict) -> None:
    """q (b, H, d), k, v (b, N, K, d), the per-sequence integer tensors `ints` (b,), scale, num_splits."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        require_tensor(name, t)
        require_float(name, t)
    if q.dim() != 3:
        raise ValueError(f"q must be 3-D (b, H, d): one token per sequence, got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (b, N, K, d), got shape {tuple(t.shape)}")
    require_same_dtype(q=q, k=k, v=v)
    require_same_shape("k", k, "v", v)
    b, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k/v shape {tuple(k.shape)} must be (b, N, K, d) = ({b}, N, K, {d}) to match q")
    require_heads(h, k.shape[2])
    for name, t in ints.items():
        require_tensor(name, t)
        require_index_dtype(name, t)
        _require_shape(name, t, (b,), "(b,)")
    require_one_device({"q": q, "k": k, "v": v, **ints})
    require_scale(scale, note=" (e.g. d ** -0.5)")
    if num_splits is not None:
        require_int("num_splits", num_splits, 1)
        if num_splits > MAX_SPLITS:
            raise ValueError(f"num_splits must be an int in [1, {MAX_SPLITS}], got {num_splits}")


def check_range_inputs(q, k, v, lo, hi, max_keys, scale, num_splits=None) -> None:
    """Raise ValueError / TypeError naming the offending argument and the allowed values."""
    _check_common(q, k, v, scale, num_splits, {"lo": lo, "hi": hi})
    require_int("max_keys", max_keys, 0)


def check_selected_inputs(q, k, v, block_idx, block_valid, positions, block_size, scale, num_splits=None) -> None:
    """Raise ValueError / TypeError naming the offending argument and the allowed values."""
    _check_common(q, k, v, scale, num_splits, {"positions": positions})
    b, h = q.shape[:2]
    kh = k.shape[2]
    require_tensor("block_idx", block_idx)
    require_tensor("block_valid", block_valid)
    require_index_dtype("block_idx", block_idx)
    if block_valid.dtype != torch.bool:
        raise TypeError(f"block_valid dtype must be torch.bool, got {block_valid.dtype}")
    if block_idx.dim() != 3 or block_idx.shape[0] != b or block_idx.shape[1] not in (kh, h):
        raise ValueError(f"block_idx shape {tuple(block_idx.shape)} must be (b, Hs, kk) with b={b} and Hs = K = {kh} "
                         f"(shared selection) or Hs = H = {h} (unshared)")
    _require_shape("block_valid", block_valid, block_idx.shape, "block_idx's shape")
    require_one_device({"q": q, "block_idx": block_idx, "block_valid": block_valid})
    require_positive_int("block_size", block_size)


def _check_kernel_limits(q, k, v, public: str, **index) -> None:
    """What only the kernels (not the reference) need: the device, the dtypes and head dims they were
    generated for, contiguous last dims, int32 offsets within a batch element."""
    require_launch_device(q, public)
    for name, t in (("q", q), ("k", k), ("v", v)):
        require_kernel_dtype(name, t)
        require_last_dim_contiguous(name, t)
    require_head_dim(int(q.shape[2]))
    require_int32_extent("decoding", q=q, k=k, v=v, **index)


# ----------------------------------------------------------------------------------------------------
# launch helpers


def variant_specs(q, k, selection_heads: Optional[int] = None):
    """(forward,) VariantSpec from metadata: q (b, H, d), k (b, N, K, d). The range kernel and a shared
    selection (`selection_heads` Hs = K) pack G = H // K query heads per program, an unshared selection
    (Hs = H) one. Head counts are structural: int() specializes symbolic sizes."""
    h, kh = int(q.shape[1]), int(k.shape[2])
    group = h // kh if selection_heads is None or int(selection_heads) == kh else 1
    return FAMILIES["decode"].specs(group, True)


@lru_cache(maxsize=None)
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; NOMINAL_SMS elsewhere (the interpreter runs any split count)."""
    if device.type != "cuda":
        return NOMINAL_SMS
    return _device_sms(device.index if device.index is not None else torch.cuda.current_device())


def choose_splits(max_keys: int, programs: int, num_sms: int) -> int:
    """Splits per sequence: enough programs for about two waves over the GPU, no split shorter than
    MIN_KEYS_PER_SPLIT keys (of the static bound `max_keys`), at most MAX_SPLITS. From metadata only."""
    if max_keys <= 0 or programs <= 0:
        return 1
    by_work = triton.cdiv(max_keys, MIN_KEYS_PER_SPLIT)
    by_fill = triton.cdiv(2 * num_sms, programs)
    return max(1, min(by_work, by_fill, MAX_SPLITS))


def _config(module, d: int, dtype: torch.dtype, override: Optional[dict]) -> tuple[dict, dict]:
    """(constexprs, launch options): the chosen tile config plus the head dim, its padding and the dot
    precision."""
    tile, launch = choose_config(module, d, dtype, override=override)
    bn = tile["BLOCK_N"]
    if bn < 16 or bn & (bn - 1):
        raise ValueError(f"config {tile}: BLOCK_N must be a power of two >= 16")
    constexprs = {"HEAD_DIM": d, "BLOCK_D": padded_head_dim(d),
                  "INPUT_PRECISION": "ieee" if dtype == torch.float32 else "tf32", "BLOCK_N": bn}
    return constexprs, {"num_warps": launch.get("num_warps", 4), "num_stages": launch.get("num_stages", 2)}


def _scratch(q, splits: int):
    b, h, d = q.shape
    return (torch.empty((b, splits, h, d), device=q.device, dtype=torch.float32),
            torch.empty((b, splits, h), device=q.device, dtype=torch.float32))


def _combine(module, wrap, part_o, part_lse, out, lse) -> None:
    b, splits, h, d = part_o.shape
    wrap(module.combine_kernel)[(b * h,)](
        part_o, part_lse, out, lse, *part_o.stride()[:3], *part_lse.stride(), *out.stride()[:2], *lse.stride(),
        h, splits, HEAD_DIM=d, BLOCK_D=padded_head_dim(d), BLOCK_S=max(2, pow2(splits)), num_warps=4, num_stages=1,
    )


def _outputs(q):
    b, h, _ = q.shape
    return (torch.empty(q.shape, device=q.device, dtype=q.dtype),
            torch.empty((b, h), device=q.device, dtype=torch.float32))


def _range_fwd(q, k, v, lo, hi, max_keys, scale, num_splits, wrap, config=None):
    b, h, d = q.shape
    n_k, kh = int(k.shape[1]), int(k.shape[2])
    out, lse = _outputs(q)
    if b == 0:
        return out, lse
    module = cache.load_variant(variant_specs(q, k)[0])
    constexprs, launch = _config(module, int(d), q.dtype, config)
    part_o, part_lse = _scratch(q, num_splits)
    wrap(module.range_kernel)[(num_splits, b * kh)](
        q, k, v, lo, hi, part_o, part_lse,
        *q.stride()[:2], *k.stride()[:3], *v.stride()[:3], lo.stride(0), hi.stride(0),
        *part_o.stride()[:3], *part_lse.stride(),
        n_k, int(max_keys), kh, float(scale),
        **constexprs, **launch,
    )
    _combine(module, wrap, part_o, part_lse, out, lse)
    return out, lse


def _selected_fwd(q, k, v, block_idx, block_valid, positions, block_size, scale, num_splits, wrap, config=None):
    b, h, d = q.shape
    n_k, kh = int(k.shape[1]), int(k.shape[2])
    hs, kk = int(block_idx.shape[1]), int(block_idx.shape[2])
    out, lse = _outputs(q)
    if b == 0:
        return out, lse
    module = cache.load_variant(variant_specs(q, k, hs)[0])
    constexprs, launch = _config(module, int(d), q.dtype, config)
    splits = min(num_splits, kk + 1)  # the slots are what is split
    part_o, part_lse = _scratch(q, splits)
    if kk:
        idx, valid, idx_strides, valid_strides = block_idx, block_valid, block_idx.stride(), block_valid.stride()
    else:  # no slot: the own block alone; the pointers are never read
        idx = valid = positions
        idx_strides = valid_strides = (0, 0, 0)
    wrap(module.selected_kernel)[(splits, b * hs)](
        q, k, v, idx, valid, positions, part_o, part_lse,
        *q.stride()[:2], *k.stride()[:3], *v.stride()[:3], *idx_strides, *valid_strides, positions.stride(0),
        *part_o.stride()[:3], *part_lse.stride(),
        n_k, hs, int(h) // kh, kk, int(block_size), float(scale),
        **constexprs, **launch,
    )
    _combine(module, wrap, part_o, part_lse, out, lse)
    return out, lse


def range_splits(q, k, max_keys: int) -> int:
    """The default split count of a range call (metadata only)."""
    return choose_splits(min(int(max_keys), int(k.shape[1])), int(q.shape[0]) * int(k.shape[2]), sm_count(q.device))


def selected_splits(q, block_idx, block_size: int) -> int:
    """The default split count of a selected call (metadata only): its slots and own block hold at most
    (kk + 1) * l' keys."""
    keys = (int(block_idx.shape[2]) + 1) * int(block_size)
    return choose_splits(keys, int(q.shape[0]) * int(block_idx.shape[1]), sm_count(q.device))


# ----------------------------------------------------------------------------------------------------
# plain launchers (interpreter-callable)


def decode_range_attention_launch(q, k, v, lo, hi, *, max_keys, scale, num_splits=None, config=None):
    """Launch the range kernel and the combine; returns (out, lse). `num_splits` defaults to
    `range_splits`; `config` overrides the tile config ({'BLOCK_N', 'num_warps', 'num_stages'})."""
    check_range_inputs(q, k, v, lo, hi, max_keys, scale, num_splits)
    _check_kernel_limits(q, k, v, PUBLIC_RANGE)
    splits = range_splits(q, k, max_keys) if num_splits is None else num_splits
    return _range_fwd(q, k, v, lo, hi, max_keys, scale, splits, no_wrap, config)


def decode_selected_attention_launch(q, k, v, block_idx, block_valid, positions, *, block_size, scale,
                                     num_splits=None, config=None):
    """Launch the selected kernel and the combine; returns (out, lse). At most kk + 1 splits are used."""
    check_selected_inputs(q, k, v, block_idx, block_valid, positions, block_size, scale, num_splits)
    _check_kernel_limits(q, k, v, PUBLIC_SELECTED, block_idx=block_idx)
    splits = selected_splits(q, block_idx, block_size) if num_splits is None else num_splits
    return _selected_fwd(q, k, v, block_idx, block_valid, positions, block_size, scale, splits, no_wrap, config)


# ----------------------------------------------------------------------------------------------------
# torch.library: nsa::decode_range_attention, nsa::decode_selected_attention (forward only)


@torch.library.triton_op("nsa::decode_range_attention", mutates_args=())
def _range_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, max_keys: int,
              scale: float, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    check_range_inputs(q, k, v, lo, hi, max_keys, scale, num_splits)
    if q.is_cuda:
        _check_kernel_limits(q, k, v, PUBLIC_RANGE)
    from torch.library import wrap_triton

    return _range_fwd(q, k, v, lo, hi, max_keys, scale, num_splits, wrap_triton)


@_range_op.register_kernel("cpu")
def _range_cpu(q, k, v, lo, hi, max_keys, scale, num_splits):
    check_range_inputs(q, k, v, lo, hi, max_keys, scale, num_splits)
    from .. import reference

    with torch.no_grad():
        out, lse = reference.decode_range_attention(q, k, v, lo, hi, max_keys=max_keys, scale=scale)
    return out.contiguous(), lse.contiguous()


@torch.library.triton_op("nsa::decode_selected_attention", mutates_args=())
def _selected_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                 block_valid: torch.Tensor, positions: torch.Tensor, block_size: int, scale: float,
                 num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    check_selected_inputs(q, k, v, block_idx, block_valid, positions, block_size, scale, num_splits)
    if q.is_cuda:
        _check_kernel_limits(q, k, v, PUBLIC_SELECTED, block_idx=block_idx)
    from torch.library import wrap_triton

    return _selected_fwd(q, k, v, block_idx, block_valid, positions, block_size, scale, num_splits, wrap_triton)


@_selected_op.register_kernel("cpu")
def _selected_cpu(q, k, v, block_idx, block_valid, positions, block_size, scale, num_splits):
    check_selected_inputs(q, k, v, block_idx, block_valid, positions, block_size, scale, num_splits)
    from .. import reference

    with torch.no_grad():
        out, lse = reference.decode_selected_attention(q, k, v, block_idx, block_valid, positions,
                                                       block_size=block_size, scale=scale)
    return out.contiguous(), lse.contiguous()


# ----------------------------------------------------------------------------------------------------
# public


def decode_range_attention(q, k, v, lo, hi, *, max_keys, scale, num_splits=None, use_kernels=True, paths=None,
                           branch="decode"):
    """One query per sequence over keys [lo, min(hi, lo + max_keys)) within [0, N); returns out (b, H, d).

    Same contract as `reference.decode_range_attention`. CUDA (and `use_kernels`):
    `torch.ops.nsa.decode_range_attention` on the generated kernels, split `num_splits` ways (default:
    `range_splits`). Elsewhere: the reference. The path taken is recorded in `paths[branch]` when a dict is
    given. Forward only."""
    check_range_inputs(q, k, v, lo, hi, max_keys, scale, num_splits)
    path = route(q, use_kernels)
    report(paths, branch, path)
    if path == "reference":
        from .. import reference

        return reference.decode_range_attention(q, k, v, lo, hi, max_keys=max_keys, scale=scale)[0]
    splits = range_splits(q, k, max_keys) if num_splits is None else num_splits
    out, _ = torch.ops.nsa.decode_range_attention(q, k, v, lo, hi, int(max_keys), float(scale), int(splits))
    return out


def decode_selected_attention(q, k, v, block_idx, block_valid, positions, *, block_size, scale, num_splits=None,
                              use_kernels=True, paths=None, branch="selected"):
    """Selected attention (spec 5, causal) of one query per sequence at `positions`; returns out (b, H, d).

    Same contract as `reference.decode_selected_attention`. CUDA (and `use_kernels`):
    `torch.ops.nsa.decode_selected_attention` on the generated kernels, the slots split `num_splits` ways
    (default: `selected_splits`; at most kk + 1). Elsewhere: the reference. The path taken is recorded in
    `paths[branch]` when a dict is given. Forward only."""
    check_selected_inputs(q, k, v, block_idx, block_valid, positions, block_size, scale, num_splits)
    path = route(q, use_kernels)
    report(paths, branch, path)
    if path == "reference":
        from .. import reference

        return reference.decode_selected_attention(q, k, v, block_idx, block_valid, positions,
                                                   block_size=block_size, scale=scale)[0]
    splits = selected_splits(q, block_idx, block_size) if num_splits is None else num_splits
    out, _ = torch.ops.nsa.decode_selected_attention(q, k, v, block_idx, block_valid, positions, int(block_size),
                                                     float(scale), int(splits))
    return out
