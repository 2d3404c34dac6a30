"""Shared-memory and register model of the selected-attention kernels, used at render time.

The formulas are sympy expressions over the tile parameters (BLOCK_M rows, BLOCK_N key columns, head
dim D, pipeline stages S, element bytes B, warps W), `lambdify`-ed once into plain Python functions.
`tile_configs(spec)` enumerates the autotune candidates of a variant and drops those whose predicted
shared memory exceeds the H100/H200 limit (227 KiB per block) at the largest supported head dim in a
16-bit dtype; every kept config also records the largest head dim it fits for 16- and 32-bit inputs
(`max_d16`, `max_d32`), which the launcher uses to pick a config without touching this module.
Never on the per-call path: the launcher reads the generated file's CONFIGS.

Model (per program; operands of tl.dot are staged through shared memory, accumulators in registers):
  forward  smem = S * 2*BN*D*B  (K, V tiles per stage) + BM*D*B (Q) + BM*BN*B (P for P @ V)
  backward smem = S * 2*BN*D*B + 2*BM*D*B (Q, dO) + 2*BM*BN*B (P^T, dS^T)
  forward  regs/thread = (BM*D + 3*BM*BN + BM*D*B/4) / (32 W) + 32
  backward regs/thread = (BM*D + 2*BN*D + 5*BM*BN + 2*BM*D*B/4) / (32 W) + 40

Against the compiled kernels (H200, Triton 3.6, bf16, d = 128, l' = 64, BM = 16, BN = 64; committed bench
benchmarks/results/bench_nvidia-h200_20261129T090045Z.json) the shared-memory model is conservative:
the forward compiles to 22,528 / 38,912 / 71,680 B at 1 / 2 / 3 stages (model 38,912 / 71,680 /
104,448), which decomposes exactly as Q + P + K alone at 1 stage and Q + P + (stages - 1) x (K + V)
buffers above; the backward's query-major kernel is 43,008 B at 2 stages (model 77,824) = Q + dO +
K + V + dS. Registers are under-predicted (forward 115-168 compiled vs 56-80 modelled; the dq kernel
128-210 vs 240; dkv_kernel 255 with up to 28 spills vs 328): the model omits address arithmetic of the
gathered tiles and Triton's fixed overhead. The pruning keeps the conservative shared-memory formula
until a corrected one has been checked on a GPU (a smaller estimate would keep configs never compiled).
"""
from __future__ import annotations

import itertools
from functools import cache

import sympy

from ..spec import VariantSpec

SMEM_LIMIT = 227 * 1024  # bytes of shared memory per block on H100 / H200
REG_LIMIT = 255  # registers per thread before spilling
HEAD_DIMS = (16, 32, 64, 128, 256)  # supported head dims are multiples of 8 in [16, 256]; tiles pad to these
MAX_HEAD_DIM = HEAD_DIMS[-1]

BM, BN, D, S, B, W = sympy.symbols("BLOCK_M BLOCK_N D stages bytes num_warps", positive=True, integer=True)

SMEM = {
    "select_fwd": S * 2 * BN * D * B + BM * D * B + BM * BN * B,
    "select_bwd": S * 2 * BN * D * B + 2 * BM * D * B + 2 * BM * BN * B,
}
REGS = {
    "select_fwd": (BM * D + 3 * BM * BN + BM * D * B / 4) / (32 * W) + 32,
    "select_bwd": (BM * D + 2 * BN * D + 5 * BM * BN + 2 * BM * D * B / 4) / (32 * W) + 40,
}


# select_bwd's key-major dkv_kernel (one config per head dim, ops.dkv_launch; not autotuned): K, V tiles
# of BK keys resident, gathered Q and dO rows (R = DKV_TOKENS * GP) per stage, P^T and dS^T staged for
# the dk / dv dots; fp32 dk, dv accumulators plus five R x BK score-sized temporaries in registers
RK = sympy.symbols("DKV_ROWS", positive=True, integer=True)
DKV_SMEM = 2 * BN * D * B + S * 2 * RK * D * B + 2 * RK * BN * B
DKV_REGS = (2 * BN * D + 5 * RK * BN) / (32 * W) + 40


def predict_dkv(spec: VariantSpec, head_dim: int, dtype_bytes: int, num_warps: int, num_stages: int) -> dict:
    """Predicted shared memory (bytes) and registers per thread of `spec`'s dkv_kernel (select_bwd)."""
    gp = _pow2(spec.group)
    rows = max(1, 64 // gp) * gp
    block_k = min(max(16, _pow2(spec.block_size)), 64)
    d = _pow2(max(16, head_dim))
    subs = {BN: block_k, D: d, B: dtype_bytes, S: num_stages, W: num_warps, RK: rows}
    return {"shared": int(DKV_SMEM.subs(subs)), "n_regs": int(round(float(DKV_REGS.subs(subs)))),
            "DKV_ROWS": rows, "DKV_BLOCK_K": block_k, "BLOCK_D": d}


@cache
def _functions(family: str):
    """The family's formulas as numeric functions (lambdify once per process)."""
    args = (BM, BN, D, S, B, W)
    return sympy.lambdify(args, SMEM[family], "math"), sympy.lambdify(args, REGS[family], "math")


def _pow2(x: int) -> int:
    return 1 << (max(1, x) - 1).bit_length()


def layout(spec: VariantSpec, force_pad: bool = False, force_tpp: int | None = None) -> dict:
    """Structural layout of a selected-attention program (same rules as templates/_macros.j2)."""
    gp = _pow2(spec.group)
    lp = _pow2(spec.block_size)
    tpp = force_tpp or (1 if (gp >= 16 or force_pad) else 16 // gp)
    rows = max(gp * tpp, 16)
    gather = tpp == 1 and spec.block_size < 16
    return {
        "BLOCK_M": rows,
        "TOKENS_PER_PROGRAM": tpp,
        "LP": lp,
        "GATHER": gather,
        "BLOCK_DIAG": max(16, lp),
        # key-tile widths the template supports for this layout
        "BLOCK_N": (16, 32, 64) if gather else (max(16, lp),),
    }


def predict(spec: VariantSpec, config: dict, head_dim: int, dtype_bytes: int, force_pad: bool = False) -> dict:
    """Predicted shared memory (bytes) and registers per thread of `spec` under `config`."""
    lay = layout(spec, force_pad)
    smem_f, regs_f = _functions(spec.family)
    d = _pow2(max(16, head_dim))  # BLOCK_D
    args = (lay["BLOCK_M"], config["BLOCK_N"], d, config["num_stages"], dtype_bytes, config["num_warps"])
    return {"shared": int(smem_f(*args)), "n_regs": int(round(regs_f(*args))), "BLOCK_M": lay["BLOCK_M"], "BLOCK_D": d}


def _max_head_dim(spec: VariantSpec, config: dict, dtype_bytes: int) -> int:
    fits = [d for d in HEAD_DIMS if predict(spec, config, d, dtype_bytes)["shared"] <= SMEM_LIMIT]
    return max(fits, default=0)


def tile_configs(spec: VariantSpec) -> tuple[list[dict], list[str]]:
    """(kept, dropped): autotune candidates in order of preference, pruned by the shared-memory model
    at head dim 256 in a 16-bit dtype; one line per dropped config saying why."""
    if spec.family not in SMEM:
        raise ValueError(f"no resource model for family {spec.family!r}; known: {sorted(SMEM)}")
    lay = layout(spec)
    block_ns = sorted(lay["BLOCK_N"], key=lambda n: -n)  # wider gathered tiles first
    kept, dropped = [], []
    for n, (warps, stages) in itertools.product(block_ns, ((4, 2), (4, 1), (8, 2), (4, 3), (8, 1), (8, 3))):
        config = {"BLOCK_N": n, "num_warps": warps, "num_stages": stages}
        pred = predict(spec, config, MAX_HEAD_DIM, 2)
        if pred["shared"] > SMEM_LIMIT:
            dropped.append(
                f"BLOCK_N={n} num_warps={warps} num_stages={stages}: shared memory {pred['shared']} B "
                f"> {SMEM_LIMIT} B at head dim {MAX_HEAD_DIM} in 16-bit"
            )
            continue
        config["max_d16"] = _max_head_dim(spec, config, 2)
        config["max_d32"] = _max_head_dim(spec, config, 4)
        kept.append(config)
    return kept, dropped
