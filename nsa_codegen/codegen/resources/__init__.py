"""Resource models: predicted shared memory and registers of a generated kernel, used at render time to
prune its tile configs (never on the per-call path).

The core is shared: the hardware limits, the sympy symbols, the head dims a config is checked at, and
the pruning loop. Each family's model (`selected.py`, `dense.py`, `topk.py`, named by the registry in
`nsa_codegen.kernels`) supplies its formulas, its candidate configs in order of preference and its
`tile_configs(spec)`. Every kept config records the largest padded head dim it fits for 16- and 32-bit
inputs (`max_d16`, `max_d32`); the launchers choose among the kept configs with that record
(`nsa_codegen.kernels._launch`), without importing these modules.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import sympy

SMEM_LIMIT = 227 * 1024  # bytes of shared memory per block on H100 / H200
REG_LIMIT = 255  # registers per thread before spilling
HEAD_DIMS = (16, 32, 64, 128, 256)  # supported head dims are multiples of 8 in [16, 256]; tiles pad to these
MAX_HEAD_DIM = HEAD_DIMS[-1]

# tile rows, key columns, padded head dim, pipeline stages, element bytes, warps
BM, BN, D, S, B, W = sympy.symbols("BLOCK_M BLOCK_N D stages bytes num_warps", positive=True, integer=True)


@dataclass(frozen=True)
class Formula:
    """Shared memory (bytes) and registers per thread as sympy expressions over `symbols`."""
    smem: sympy.Expr
    regs: sympy.Expr
    symbols: tuple
    _fns: dict = field(default_factory=dict, compare=False, repr=False)

    def __call__(self, *values) -> dict:
        if not self._fns:  # lambdify once per process
            self._fns["smem"] = sympy.lambdify(self.symbols, self.smem, "math")
            self._fns["regs"] = sympy.lambdify(self.symbols, self.regs, "math")
        return {"shared": int(self._fns["smem"](*values)), "n_regs": int(round(self._fns["regs"](*values)))}


def fits(pred: dict, check_registers: bool) -> bool:
    return pred["shared"] <= SMEM_LIMIT and (not check_registers or pred["n_regs"] <= REG_LIMIT)


def max_head_dim(predict_at: Callable[[int, int], dict], dtype_bytes: int, check_registers: bool) -> int:
    """The largest head dim of HEAD_DIMS whose prediction `predict_at(head_dim, dtype_bytes)` fits."""
    return max((d for d in HEAD_DIMS if fits(predict_at(d, dtype_bytes), check_registers)), default=0)


def prune(candidates: Iterable[dict], predict: Callable[[dict, int, int], dict], *, check_registers: bool,
          must_fit_head_dim: Optional[int], reject: Callable[[dict], Optional[str]] = lambda c: None
          ) -> tuple[list[dict], list[str]]:
    """(kept, dropped) of `candidates` (in order of preference), one line per dropped config saying why.

    A config is dropped when `reject(config)` names a structural reason, when its shared memory does
    not fit `must_fit_head_dim` in a 16-bit dtype (None: when it fits no head dim in 16- or 32-bit), else it
    is kept with its `max_d16` / `max_d32`. `predict(config, head_dim, dtype_bytes)` is the family's
    model; registers count toward a fit when `check_registers`."""
    kept, dropped = [], []
    for config in candidates:
        label = " ".join(f"{k}={v}" for k, v in config.items())
        reason = reject(config)
        if reason is None and must_fit_head_dim is not None:
            pred = predict(config, must_fit_head_dim, 2)
            if pred["shared"] > SMEM_LIMIT:
                reason = f"shared memory {pred['shared']} B > {SMEM_LIMIT} B at head dim {must_fit_head_dim} in 16-bit"
        if reason is None:
            limits = {f"max_d{8 * nbytes}": max_head_dim(lambda d, b: predict(config, d, b), nbytes, check_registers)
                      for nbytes in (2, 4)}
            if must_fit_head_dim is None and 0 in limits.values():
                pred = predict(config, HEAD_DIMS[0], 4)
                reason = (f"fits no head dim (at head dim {HEAD_DIMS[0]} in fp32: shared memory {pred['shared']} B "
                          f"of {SMEM_LIMIT} B, {pred['n_regs']} of {REG_LIMIT} registers per thread)")
        if reason is not None:
            dropped.append(f"{label}: {reason}")
            continue
        kept.append({**config, **limits})
    return kept, dropped
