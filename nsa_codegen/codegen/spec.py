"""VariantSpec: every structural parameter a kernel template specializes on.

Head dim and dtype are deliberately *not* here: they stay Triton constexpr / JIT specializations of
the same generated source. Everything here changes the shape of the code (loops, masks, packing).
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

from ..kernels import family_of


def pow2(x: int) -> int:
    """The next power of two >= x (>= 1)."""
    return 1 << (max(1, x) - 1).bit_length()


def padded_head_dim(head_dim: int) -> int:
    """BLOCK_D: tiles pad the head dim to a power of two >= 16 and mask the rest."""
    return pow2(max(16, head_dim))

GENERATOR_VERSION = "0.1.0"

@dataclass(frozen=True)
class VariantSpec:
    family: str  # generated source of a registered family (nsa_codegen.kernels): templates/<family>.py.j2
    block_size: int  # selection block size l' (0 for families without one)
    group: int  # query heads packed per program: G for shared selection, 1 for unshared (and one-variant families)
    causal: bool  # causal adds the own-block diagonal with its intra-block mask (False for one-variant families)

    def __post_init__(self):
        family = family_of(self.family)
        if family.one_variant:
            if self.block_size != 0 or self.group != 1 or isinstance(self.group, bool) or self.causal is not False:
                raise ValueError(f"{self.family} has one variant: block_size must be 0, group 1 and causal False, "
                                 f"got block_size={self.block_size!r}, group={self.group!r}, causal={self.causal!r}")
            return
        if family.has_block_size:
            if not isinstance(self.block_size, int) or self.block_size < 1:
                raise ValueError(f"block_size must be a positive int for {self.family}, got {self.block_size!r}")
        elif self.block_size != 0:
            raise ValueError(f"block_size must be 0 for {self.family} (not a parameter of it), got {self.block_size!r}")
        if not isinstance(self.group, int) or self.group < 1:
            raise ValueError(f"group must be a positive int, got {self.group!r}")
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal must be a bool, got {self.causal!r}")
        if self.causal not in family.causal_modes:
            raise ValueError(f"causal must be one of {family.causal_modes} for {self.family}, got {self.causal!r}")

    @property
    def name(self) -> str:
        """Readable and unique: select_fwd_bs64_g16_causal, window_fwd_g4_noncausal; a family with one
        variant is named by its source (combine_fwd)."""
        if family_of(self.family).one_variant:
            return self.family
        mode = "causal" if self.causal else "noncausal"
        block = f"_bs{self.block_size}" if self.block_size else ""
        return f"{self.family}{block}_g{self.group}_{mode}"

    @property
    def key(self) -> str:
        """Short content hash of the fields (stable across processes)."""
        text = ",".join(f"{k}={v}" for k, v in sorted(asdict(self).items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def template(self) -> str:
        return f"{self.family}.py.j2"

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_name(cls, name: str) -> "VariantSpec":
        """Inverse of `name`, e.g. for `python -m nsa_codegen cache show select_fwd_bs64_g16_causal`."""
        try:
            if family_of(name).one_variant:
                return cls(name, 0, 1, False)
        except ValueError:
            pass
        try:
            head, g, mode = name.rsplit("_", 2)
            block_size = 0
            if head.rsplit("_", 1)[-1].startswith("bs"):
                head, bs = head.rsplit("_", 1)
                block_size = int(bs[2:])
            if not (g.startswith("g") and mode in ("causal", "noncausal")):
                raise ValueError
            return cls(head, block_size, int(g[1:]), mode == "causal")
        except ValueError:
            raise ValueError(
                f"not a variant name: {name!r} (expected <family>[_bs<l'>]_g<G>_<causal|noncausal>, or the source "
                f"name of a family with one variant)"
            ) from None
