"""Shared-memory and register model of the fused importance + top-k kernels (topk_fwd, topk_bwd), used
at render time only.

A program owns BLOCK_M query tokens of one selection row (a kv head when the group shares its
selection, a query head when not) and streams BLOCK_U candidate blocks at a time. The r = l'/s
compressed keys of a candidate are summed by r dots against the row's (group-averaged) query held in
fp32; compressed keys are upcast to fp32 and the dots run in fp32 (`tf32x3` for 16-bit inputs, `ieee`
for fp32), so the importance scores carry no 16-bit rounding. Per row the kernel keeps a running
log-sum-exp and a top-KP list (key, index) in registers; KP = next power of two of kk is a runtime
specialization (not known at render time), modelled at KP = 32.

Model (per program):
  topk_fwd  smem = S*BU*D*B (ck tile per stage) + BU*D*4 (ck as fp32 dot operand) + BM*D*4 (q operand)
            regs = (BM*D + 3*BM*BU + 2*BM*KP) / (32 W) + 40        (q, scores/keys/merge, top-k list)
  topk_bwd  smem = S*BU*D*B + BU*D*4 + 2*BM*D*4 + 2*BM*BU*4        (ck, q, dS and dS^T operands)
            regs = (2*BM*D + BU*D + 3*BM*BU + 2*BM*KP) / (32 W) + 48  (q, dq, dck tile, scores/ds)

`tile_configs(spec)` enumerates the candidates in order of preference, drops those whose predicted
shared memory exceeds 227 KiB (H100/H200) at head dim 256 in a 16-bit dtype, and records for every kept
config the largest head dim it fits (shared memory and registers) for 16- and 32-bit inputs
(`max_d16`, `max_d32`); the launcher picks the first config that fits the call, without this module.
"""
from __future__ import annotations

import itertools
from functools import cache

import sympy

from .spec import VariantSpec

SMEM_LIMIT = 227 * 1024  # bytes of shared memory per block on H100 / H200
REG_LIMIT = 255  # registers per thread before spilling
HEAD_DIMS = (16, 32, 64, 128, 256)
MAX_HEAD_DIM = HEAD_DIMS[-1]
MODEL_KP = 32  # top-k list width assumed at render time (kk <= 32 covers the paper's k = 16)

BM, BU, D, S, B, W, KP = sympy.symbols("BLOCK_M BLOCK_U D stages bytes num_warps KP", positive=True, integer=True)

SMEM = {
    "topk_fwd": S * BU * D * B + BU * D * 4 + BM * D * 4,
    "topk_bwd": S * BU * D * B + BU * D * 4 + 2 * BM * D * 4 + 2 * BM * BU * 4,
}
REGS = {
    "topk_fwd": (BM * D + 3 * BM * BU + 2 * BM * KP) / (32 * W) + 40,
    "topk_bwd": (2 * BM * D + BU * D + 3 * BM * BU + 2 * BM * KP) / (32 * W) + 48,
}

# (BLOCK_M, BLOCK_U) in order of preference, then (num_warps, num_stages)
TILES = ((64, 64), (64, 32), (32, 64), (32, 32), (128, 64), (16, 64), (16, 32), (16, 16))
LAUNCH = ((4, 2), (8, 2), (4, 1))


@cache
def _functions(family: str):
    args = (BM, BU, D, S, B, W, KP)
    return sympy.lambdify(args, SMEM[family], "math"), sympy.lambdify(args, REGS[family], "math")


def predict(spec: VariantSpec, config: dict, head_dim: int, dtype_bytes: int, kp: int = MODEL_KP) -> dict:
    """Predicted shared memory (bytes) and registers per thread of `spec` under `config`."""
    smem_f, regs_f = _functions(spec.family)
    d = 1 << (max(16, head_dim) - 1).bit_length()  # BLOCK_D
    args = (config["BLOCK_M"], config["BLOCK_U"], d, config["num_stages"], dtype_bytes, config["num_warps"], kp)
    return {"shared": int(smem_f(*args)), "n_regs": int(round(regs_f(*args))), "BLOCK_D": d}


def _max_head_dim(spec: VariantSpec, config: dict, dtype_bytes: int) -> int:
    fits = [
        d for d in HEAD_DIMS
        if (p := predict(spec, config, d, dtype_bytes))["shared"] <= SMEM_LIMIT and p["n_regs"] <= REG_LIMIT
    ]
    return max(fits, default=0)


def tile_configs(spec: VariantSpec) -> tuple[list[dict], list[str]]:
    """(kept, dropped) tile configs of a topk variant, in order of preference."""
    if spec.family not in SMEM:
        raise ValueError(f"no resource model for family {spec.family!r}; known: {sorted(SMEM)}")
    kept, dropped = [], []
    for (bm, bu), (warps, stages) in itertools.product(TILES, LAUNCH):
        config = {"BLOCK_M": bm, "BLOCK_U": bu, "num_warps": warps, "num_stages": stages}
        pred = predict(spec, config, MAX_HEAD_DIM, 2)
        if pred["shared"] > SMEM_LIMIT:
            dropped.append(
                f"BLOCK_M={bm} BLOCK_U={bu} num_warps={warps} num_stages={stages}: shared memory "
                f"{pred['shared']} B > {SMEM_LIMIT} B at head dim {MAX_HEAD_DIM} in 16-bit"
            )
            continue
        config["max_d16"] = _max_head_dim(spec, config, 2)
        config["max_d32"] = _max_head_dim(spec, config, 4)
        if config["max_d16"] == 0:
            dropped.append(
                f"BLOCK_M={bm} BLOCK_U={bu} num_warps={warps} num_stages={stages}: registers "
                f"{predict(spec, config, 16, 2)['n_regs']} > {REG_LIMIT} per thread even at head dim 16"
            )
            continue
        kept.append(config)
    return kept, dropped
