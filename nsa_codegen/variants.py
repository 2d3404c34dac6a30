"""The default variant grid: exactly what `make generate` renders into generated/."""
from __future__ import annotations

import itertools
from collections.abc import Iterator

from .spec import VariantSpec

BLOCK_SIZES = (8, 16, 32, 64, 128)
GROUPS = (1, 2, 4, 8, 16)
CAUSAL = (True, False)
FAMILIES = ("select_fwd", "select_bwd")


def default_variants() -> Iterator[VariantSpec]:
    for family, block_size, group, causal in itertools.product(FAMILIES, BLOCK_SIZES, GROUPS, CAUSAL):
        yield VariantSpec(family, block_size, group, causal)
