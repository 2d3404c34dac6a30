"""The default variant grid: exactly what `make generate` renders into generated/.

Selected attention (issue 3): l' x G x causal x {fwd, bwd} = 5 x 5 x 2 x 2 = 100 sources.
Sliding window and compressed attention have no selection block size: G x causal x 4 families = 40.
Anything else (l' = 2, 4, 20, G = 32, the fused top-k, ...) renders on first use into the user cache.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator

from .spec import VariantSpec

BLOCK_SIZES = (8, 16, 32, 64, 128)
GROUPS = (1, 2, 4, 8, 16)
CAUSAL = (True, False)
SELECT_FAMILIES = ("select_fwd", "select_bwd")
DENSE_FAMILIES = ("window_fwd", "window_bwd", "cmp_fwd", "cmp_bwd")


def select_variants() -> Iterator[VariantSpec]:
    for family, block_size, group, causal in itertools.product(SELECT_FAMILIES, BLOCK_SIZES, GROUPS, CAUSAL):
        yield VariantSpec(family, block_size, group, causal)


def dense_variants() -> Iterator[VariantSpec]:
    for family, group, causal in itertools.product(DENSE_FAMILIES, GROUPS, CAUSAL):
        yield VariantSpec(family, 0, group, causal)


def default_variants() -> Iterator[VariantSpec]:
    yield from select_variants()
    yield from dense_variants()
