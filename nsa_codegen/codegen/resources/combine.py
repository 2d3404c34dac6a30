"""Register model of the gated-combine kernels (combine_fwd, combine_bwd), used at render time only.

Both kernels stream: a program owns BLOCK_R rows ((token, head) pairs) x the padded head dim BLOCK_D,
reads each input tile once and writes each output tile once. There is no dot and no pipelining, so no
operand is staged through shared memory; the backward's row sums over d need at most BR * W fp32 of
reduction scratch when a row spans warps (a few KiB), which the model counts as 0. What bounds the tile
is the registers holding the tiles in fp32 at once:
  combine_fwd  regs = 4 * BR * D / (32 W) + 32      (three branch tiles and the fp32 sum)
  combine_bwd  regs = 4 * BR * D / (32 W) + 32      (dout and three branch tiles; each gradient is
                                                     stored as soon as it is computed)
Every candidate runs 4 warps; the limit of 255 registers per thread leaves each BLOCK_R the head dims
where BR * D <= 4096 elements, i.e. 32 elements per thread and tensor: four 16-byte vector loads per
thread and input in a 16-bit dtype (eight in fp32), enough bytes in flight per SM to cover DRAM latency
at the occupancy these registers allow. Candidates run from the most rows to the fewest, so the first
config that fits a head dim (the launcher's rule) is the one with 4096 elements per tile.
"""
from __future__ import annotations

import sympy

from . import D, W, Formula, prune
from ..spec import VariantSpec, padded_head_dim

BR = sympy.Symbol("BLOCK_R", positive=True, integer=True)
_SYMBOLS = (BR, D, W)
_REGS = 4 * BR * D / (32 * W) + 32
FORMULAS = {
    "combine_fwd": Formula(sympy.Integer(0), _REGS, _SYMBOLS),
    "combine_bwd": Formula(sympy.Integer(0), _REGS, _SYMBOLS),
}

ROWS = (256, 128, 64, 32, 16)  # BLOCK_R candidates, in order of preference
NUM_WARPS = 4


def predict(spec: VariantSpec, config: dict, head_dim: int, dtype_bytes: int) -> dict:
    """Predicted shared memory (bytes) and registers per thread of `spec` under `config`; the tiles are
    held in fp32 whatever the input dtype."""
    d = padded_head_dim(head_dim)
    return {**FORMULAS[spec.family](config["BLOCK_R"], d, config["num_warps"]), "BLOCK_D": d}


def tile_configs(spec: VariantSpec) -> tuple[list[dict], list[str]]:
    """(kept, dropped) configs of a combine kernel, in order of preference, each with the largest head dim
    it fits (`max_d16`, `max_d32`)."""
    candidates = ({"BLOCK_R": rows, "num_warps": NUM_WARPS, "num_stages": 1} for rows in ROWS)
    return prune(candidates, lambda c, d, nbytes: predict(spec, c, d, nbytes), check_registers=True,
                 must_fit_head_dim=None)
