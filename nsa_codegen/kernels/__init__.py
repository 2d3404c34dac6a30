"""The family registry: the one list of kernel families.

A family is one step of NSA computed by generated kernels (a branch, the top-k, decoding, the gated
combine). Its entry names everything the rest of the package needs to find it: the generated sources
(forward, then backward where the family has one; one template each under `templates/`), the resource
model that prunes their tile configs at render time (`nsa_codegen.codegen.resources.<resources>`), the
module with its launchers and `torch.library` op (`nsa_codegen.kernels.<name>`), and the axes of the grid
shipped in `generated/`.

`codegen` (spec validation, the shipped grid, rendering) and the launchers read this table; adding a
family is one entry here, one template per source, one resource model and one test file
(docs/architecture.md). This module imports nothing heavy: no torch, no Triton.
"""
from __future__ import annotations

import importlib
import itertools
from dataclasses import dataclass

BLOCK_SIZES = (8, 16, 32, 64, 128)  # selection block sizes l' of the shipped grid
GROUPS = (1, 2, 4, 8, 16)  # query heads per kv head G of the shipped grid
CAUSAL = (True, False)


@dataclass(frozen=True)
class Family:
    name: str  # module under nsa_codegen.kernels
    sources: tuple[str, ...]  # generated sources (forward, then backward if any): templates/<source>.py.j2
    spec_section: int  # section of docs/nsa-spec.md the family computes
    has_block_size: bool  # the selection block size l' changes the code (else it is a runtime argument)
    resources: str  # resource model: nsa_codegen.codegen.resources.<resources>
    ops: tuple[str, ...]  # torch.library ops it registers (namespace nsa)
    causal_modes: tuple[bool, ...] = CAUSAL  # the causal flags it has code for (decoding is causal only)
    # the code depends on no spec field (no block size, head group or causal mask): one variant per
    # source, named by the source alone (its spec holds block_size 0, group 1, causal False)
    one_variant: bool = False

    def specs(self, group: int, causal: bool, block_size: int = 0):
        """One VariantSpec per source ((forward, backward), or (forward,) for a forward-only family);
        arguments are Python ints / bools (structural)."""
        from ..codegen.spec import VariantSpec

        if self.one_variant:
            return tuple(VariantSpec(source, 0, 1, False) for source in self.sources)
        block_size = int(block_size) if self.has_block_size else 0
        return tuple(VariantSpec(source, block_size, int(group), bool(causal)) for source in self.sources)

    def grid(self):
        """The VariantSpecs `make generate` ships for this family."""
        if self.one_variant:
            yield from self.specs(1, False)
            return
        block_sizes = BLOCK_SIZES if self.has_block_size else (0,)
        for block_size, group, causal in itertools.product(block_sizes, GROUPS, self.causal_modes):
            yield from self.specs(group, causal, block_size)

    def resource_model(self):
        return importlib.import_module(f"nsa_codegen.codegen.resources.{self.resources}")

    def module(self):
        return importlib.import_module(f"nsa_codegen.kernels.{self.name}")


FAMILIES = {
    family.name: family
    for family in (
        Family("selected", ("select_fwd", "select_bwd"), 5, True, "selected",
               ("selected_attention", "selected_attention_backward")),
        Family("window", ("window_fwd", "window_bwd"), 6, False, "dense",
               ("sliding_window_attention", "sliding_window_attention_backward")),
        Family("compressed", ("cmp_fwd", "cmp_bwd"), 2, False, "dense",
               ("compressed_attention", "compressed_attention_backward")),
        Family("topk", ("topk_fwd", "topk_bwd"), 4, True, "topk", ("select_topk", "select_topk_backward")),
        # forward only (decoding needs no gradient); l' is a runtime argument of its selected kernel
        Family("decode", ("decode_fwd",), 8, False, "decode", ("decode_range_attention", "decode_selected_attention"),
               causal_modes=(True,)),
        Family("combine", ("combine_fwd", "combine_bwd"), 7, False, "combine",
               ("gated_combine", "gated_combine_backward"), one_variant=True),
    )
}

# generated source (VariantSpec.family) -> its family
SOURCES = {source: family for family in FAMILIES.values() for source in family.sources}


def family_of(source: str) -> Family:
    try:
        return SOURCES[source]
    except KeyError:
        raise ValueError(f"family must be one of {tuple(SOURCES)}, got {source!r}") from None


def shipped_grid():
    """Every VariantSpec of the shipped grid, family by family."""
    for family in FAMILIES.values():
        yield from family.grid()
