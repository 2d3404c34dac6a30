"""Tensors + options -> VariantSpec, from metadata only (shapes, flags; never tensor values)."""
from __future__ import annotations

from .spec import VariantSpec


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


def select_specs(q, k, block_idx, *, block_size: int, causal: bool) -> tuple[VariantSpec, VariantSpec]:
    """(forward, backward) variants of selected attention for q (b, n, H, d), k (b, n, K, d) and
    block_idx (b, n, Hs, kk)."""
    # head counts are structural: int() specializes symbolic sizes under torch.compile(dynamic=True)
    group = selection_group(int(q.shape[2]), int(k.shape[2]), int(block_idx.shape[2]))
    return (
        VariantSpec("select_fwd", int(block_size), group, bool(causal)),
        VariantSpec("select_bwd", int(block_size), group, bool(causal)),
    )


def head_group(q, kv) -> int:
    """G = H // K for q (b, n, H, d) and k / ck (b, *, K, d), as a Python int: head counts are
    structural (they pick the variant), so int() specializes symbolic sizes under
    torch.compile(dynamic=True) instead of handing a SymInt to VariantSpec."""
    return int(q.shape[2]) // int(kv.shape[2])
