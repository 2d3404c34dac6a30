"""Shared-memory and register model of the decoding kernels (templates/decode_fwd.py.j2), used at render
time only.

A decoding program attends ROWS query rows (the G heads of one selection row, padded to at least 16 for
the MMA: `layout`) to BLOCK_N keys per step, flash-decoding style: the key set of one sequence is split
over programs, each keeps FlashAttention-2 accumulators for its rows. The range and the selected kernel
run the same tile step; the combine kernel holds (splits x head dim) fp32 values and is not modelled.

Model (per program; tl.dot operands staged through shared memory, accumulators in registers), the dense
forward's with BLOCK_M = ROWS:
  smem = S * 2*BN*D*B (K, V tiles per stage) + ROWS*D*B (q) + ROWS*BN*B (P for P @ V)
  regs = (ROWS*D + 3*ROWS*BN + ROWS*D*B/4 + 2*BN*D*B/4) / (32 W) + 32
Decoding reads each key once per kv head and is bound by memory bandwidth, so the preferred tiles are
the ones that keep enough loads in flight (BLOCK_N 64, two stages) rather than large MMA tiles.

Against kernels compiled for sm_90 without a GPU (Triton 3.9's bundled ptxas,
benchmarks/profile/compile_decode_offline.py; the range and the selected kernel compile to the same
size) the shared-memory model is conservative, 1.8x to 1.9x: BLOCK_N 64, 2 stages, bf16 at d = 64 / 128 /
256: 20,480 / 38,912 / 75,776 B compiled against 36,864 / 71,680 / 141,312 B modelled, at G = 1 and
G = 16 alike (ROWS = 16). Registers are known only when a kernel loads on a GPU: not yet measured.
"""
from __future__ import annotations

import sympy

from . import BN, B, D, S, W, Formula, prune
from ..spec import VariantSpec, padded_head_dim, pow2

R = sympy.symbols("ROWS", positive=True, integer=True)

FORMULA = Formula(S * 2 * BN * D * B + R * D * B + R * BN * B,
                  (R * D + 3 * R * BN + R * D * B / 4 + 2 * BN * D * B / 4) / (32 * W) + 32,
                  (R, BN, D, S, B, W))

# (BLOCK_N, num_warps, num_stages) in order of preference
CANDIDATES = ((64, 4, 2), (32, 4, 2), (64, 8, 2), (128, 4, 2), (128, 4, 1), (32, 4, 1), (16, 4, 1))


def layout(spec: VariantSpec) -> dict:
    """ROWS: MMA rows of a program, the G query heads of a selection row padded to a power of two >= 16."""
    return {"ROWS": max(16, pow2(spec.group))}


def predict(spec: VariantSpec, config: dict, head_dim: int, dtype_bytes: int) -> dict:
    """Predicted shared memory (bytes) and registers per thread of `spec` under `config`."""
    d = padded_head_dim(head_dim)
    pred = FORMULA(layout(spec)["ROWS"], config["BLOCK_N"], d, config["num_stages"], dtype_bytes, config["num_warps"])
    return {**pred, "BLOCK_D": d}


def tile_configs(spec: VariantSpec) -> tuple[list[dict], list[str]]:
    """(kept, dropped): the candidates in order of preference; a config is kept when it fits some head dim in
    16- and in 32-bit (shared memory and registers), with the largest it fits recorded, so the launcher takes
    the first config that fits the call's head dim (at 256, the smaller tiles further down the list)."""
    candidates = ({"BLOCK_N": bn, "num_warps": w, "num_stages": st} for bn, w, st in CANDIDATES)
    return prune(candidates, lambda c, d, nbytes: predict(spec, c, d, nbytes), check_registers=True,
                 must_fit_head_dim=None)
