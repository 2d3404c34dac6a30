"""Shared-memory and register model of the dense-tile kernels (sliding window, compressed attention),
used at render time only.

Both families run FlashAttention-2 style tiles: BLOCK_M packed query rows ((token, head) pairs of one
kv head: BLOCK_M // G tokens x G heads) against BLOCK_N key rows. The formulas are sympy expressions over
the tile parameters (BLOCK_M, BLOCK_N, head dim D, pipeline stages S, element bytes B, warps W),
`lambdify`-ed once per process. `tile_configs(spec)` enumerates the candidates of a variant in order of
preference and drops those that cannot hold the group (BLOCK_M < G) or whose predicted shared memory
exceeds the H100/H200 limit (227 KiB per block) at the largest supported head dim (256) in a 16-bit
dtype. Every kept config records the largest head dim it fits (shared memory *and* registers) for 16-
and 32-bit inputs (`max_d16`, `max_d32`); the launcher picks the first config that fits the call's head
dim, without importing this module.

Model (per program; tl.dot operands are staged through shared memory, accumulators live in registers):
  *_fwd  smem = S * 2*BN*D*B (K, V tiles per stage) + BM*D*B (Q) + BM*BN*B (P for P @ V)
         regs = (BM*D + 3*BM*BN + BM*D*B/4 + 2*BN*D*B/4) / (32 W) + 32      (acc, S/P, q, k/v fragments)
  *_bwd  the larger of its two kernels:
         dkdv (keys outer, BN keys x BM query rows per step):
           smem = S * 2*BM*D*B (Q, dO per stage) + 2*BN*D*B (K, V) + 2*BM*BN*B (P^T, dS^T)
           regs = (2*BN*D + 4*BM*BN + 2*BN*D*B/4) / (32 W) + 100               (dk, dv, S^T..dS^T, k, v)
         dq (queries outer, like the forward):
           smem = S * 2*BN*D*B + 2*BM*D*B (Q, dO) + BM*BN*B (dS)
           regs = (BM*D + 3*BM*BN + 2*BM*D*B/4) / (32 W) + 40

Calibration (triton 3.9 compiling for sm_90 on the CPU machine, bf16, 70 kernel builds; cubin resource
usage from cuobjdump): the shared-memory model is conservative, 1.3x to 2.9x the compiled size (Hopper
keeps Q and P in registers as wgmma A operands and reuses buffers), never below it. Registers: ptxas uses
up to 255 whenever it can, so the model is calibrated on spills instead: the constants (the k/v fragment
term of the forward, the 100 of dkdv) put the configs that spilled at head dim 64 / 128 above 255 and the
spill-free ones below. Measured at d = 128: forward (128, 64, 8 warps) 16 B of stack, (128, 32, 8 warps)
none; backward (64, 64, 8 warps) 56-112 B, (64, 32, 8 warps) none; at d = 64 (128, 64, 8) forward and
(64, 64, 8) backward have none. The launcher therefore picks those. The GPU lane re-measures on the H200
(tests/test_window_kernels.py::test_gpu_dense_resource_model_vs_compiled).
"""
from __future__ import annotations

import sympy

from . import BM, BN, B, D, MAX_HEAD_DIM, S, W, Formula, prune
from ..spec import VariantSpec, padded_head_dim

_FWD_SMEM = S * 2 * BN * D * B + BM * D * B + BM * BN * B
_FWD_REGS = (BM * D + 3 * BM * BN + BM * D * B / 4 + 2 * BN * D * B / 4) / (32 * W) + 32
_DKDV_SMEM = S * 2 * BM * D * B + 2 * BN * D * B + 2 * BM * BN * B
_DKDV_REGS = (2 * BN * D + 4 * BM * BN + 2 * BN * D * B / 4) / (32 * W) + 100
_DQ_SMEM = S * 2 * BN * D * B + 2 * BM * D * B + BM * BN * B
_DQ_REGS = (BM * D + 3 * BM * BN + 2 * BM * D * B / 4) / (32 * W) + 40

FORMULAS = {
    "fwd": Formula(_FWD_SMEM, _FWD_REGS, (BM, BN, D, S, B, W)),
    "bwd": Formula(sympy.Max(_DKDV_SMEM, _DQ_SMEM), sympy.Max(_DKDV_REGS, _DQ_REGS), (BM, BN, D, S, B, W)),
}

# (BLOCK_M, BLOCK_N, num_warps, num_stages) in order of preference (larger tiles first, so that a head
# dim too large for them falls through to smaller ones)
CANDIDATES = {
    "fwd": (
        (128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2),
        (32, 32, 4, 2), (16, 64, 4, 2), (16, 32, 4, 2), (16, 16, 4, 1),
        (128, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 2),  # too much shared memory at head dim 256
    ),
    "bwd": (
        (64, 64, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2),
        (32, 32, 4, 2), (16, 64, 4, 2), (16, 32, 4, 2), (16, 16, 4, 1),
        (128, 64, 8, 2), (64, 128, 8, 2),  # too much shared memory at head dim 256
        (128, 32, 8, 1),  # the only fit for G = 128 at head dim 256
    ),
}


def _kind(family: str) -> str:
    """'fwd' or 'bwd': the dense families (window, compressed) share one model per direction."""
    return family.rsplit("_", 1)[1]


def predict(spec: VariantSpec, config: dict, head_dim: int, dtype_bytes: int) -> dict:
    """Predicted shared memory (bytes) and registers per thread of `spec` under `config`."""
    d = padded_head_dim(head_dim)
    pred = FORMULAS[_kind(spec.family)](config["BLOCK_M"], config["BLOCK_N"], d, config["num_stages"], dtype_bytes,
                                        config["num_warps"])
    return {**pred, "BLOCK_D": d}


def tile_configs(spec: VariantSpec) -> tuple[list[dict], list[str]]:
    """(kept, dropped): tile configs in order of preference, pruned by the packing rule BLOCK_M >= G and by
    the shared-memory model at head dim 256 in a 16-bit dtype; registers count toward each head-dim limit."""
    candidates = ({"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
                  for bm, bn, w, st in CANDIDATES[_kind(spec.family)])

    def whole_groups(config):
        if config["BLOCK_M"] < spec.group:
            return f"BLOCK_M < G={spec.group} (a tile holds whole groups of heads)"
        return None

    return prune(candidates, lambda c, d, nbytes: predict(spec, c, d, nbytes), check_registers=True,
                 must_fit_head_dim=MAX_HEAD_DIM, reject=whole_groups)
