"""The shipped grid: exactly what `make generate` renders into generated/.

Each family of the registry (nsa_codegen.kernels) contributes its forward and backward sources over
its grid axes: G {1, 2, 4, 8, 16} x causal, times l' {8, 16, 32, 64, 128} where the selection block
size is structural (selected attention, top-k). Anything else (l' = 2, 4, 20, G = 32, ...) renders on
first use into the user cache.
"""
from __future__ import annotations

from collections.abc import Iterator

from ..kernels import shipped_grid
from .spec import VariantSpec


def default_variants() -> Iterator[VariantSpec]:
    yield from shipped_grid()
