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

import sympy

from . import BM, BN, B, D, MAX_HEAD_DIM, S, W, Formula, prune
from ..spec import VariantSpec, padded_head_dim, pow2

FORMULAS = {
    "select_fwd": Formula(S * 2 * BN * D * B + BM * D * B + BM * BN * B,
                          (BM * D + 3 * BM * BN + BM * D * B / 4) / (32 * W) + 32, (BM, BN, D, S, B, W)),
    "select_bwd": Formula(S * 2 * BN * D * B + 2 * BM * D * B + 2 * BM * BN * B,
                          (BM * D + 2 * BN * D + 5 * BM * BN + 2 * BM * D * B / 4) / (32 * W) + 40,
                          (BM, BN, D, S, B, W)),
}
LAUNCH = ((4, 2), (4, 1), (8, 2), (4, 3), (8, 1), (8, 3))  # (num_warps, num_stages) in order of preference


# select_bwd's key-major dkv_kernel (one config per head dim, ops.dkv_launch; not autotuned): K, V tiles
# of BK keys resident, gathered Q and dO rows (R = DKV_TOKENS * GP) per stage, P^T and dS^T staged for
# the dk / dv dots; fp32 dk, dv accumulators plus five R x BK score-sized temporaries in registers
RK = sympy.symbols("DKV_ROWS", positive=True, integer=True)
DKV_SMEM = 2 * BN * D * B + S * 2 * RK * D * B + 2 * RK * BN * B
DKV_REGS = (2 * BN * D + 5 * RK * BN) / (32 * W) + 40


def predict_dkv(spec: VariantSpec, head_dim: int, dtype_bytes: int, num_warps: int, num_stages: int) -> dict:
    """Predicted shared memory (bytes) and registers per thread of `spec`'s dkv_kernel (select_bwd)."""
    lay = layout(spec)
    rows, block_k = lay["DKV_ROWS"], lay["DKV_BLOCK_K"]
    d = padded_head_dim(head_dim)
    subs = {BN: block_k, D: d, B: dtype_bytes, S: num_stages, W: num_warps, RK: rows}
    return {"shared": int(DKV_SMEM.subs(subs)), "n_regs": int(round(float(DKV_REGS.subs(subs)))),
            "DKV_ROWS": rows, "DKV_BLOCK_K": block_k, "BLOCK_D": d}


def layout(spec: VariantSpec, force_pad: bool = False, force_tpp: int | None = None) -> dict:
    """Program layout of a selected-attention variant, from its structural fields only: the one place
    these rules live. The templates read every layout constant from it (render passes it as `layout`),
    the generated module's constants come from it (so the launchers read it too), and this model reads
    it. `force_pad`, `force_tpp`: experiment layouts (render.load_with_layout).

      GP                  group size padded to a power of two: MMA rows per query token
      LP                  selection block size l' padded to a power of two
      TOKENS_PER_PROGRAM  query tokens per program: force_tpp when given; else 1 when the group fills the
                          MMA M dim (GP >= 16) or force_pad (the padding baseline); else 16 // GP
                          consecutive tokens packed into 16 rows
      BLOCK_M             MMA rows: max(GP * TOKENS_PER_PROGRAM, 16)
      GATHERED            several selected blocks per key tile: one token per program and l' < 16
      BLOCK_TILE          key tile holding one selected block: max(LP, 16)
      BLOCK_DIAG          key tile of the causal own-block diagonal: BLOCK_TILE
      BLOCK_N             key-tile widths the kernels support (autotune candidates): (16, 32, 64) when
                          GATHERED, else (BLOCK_TILE,)
      PADDING_BASELINE    force_pad
    select_bwd's key-major dkv_kernel (one program: one segment of a key block's entries x one key tile):
      DKV_BLOCK_K         keys per program: min(BLOCK_TILE, 64)
      DKV_KEY_TILES       programs per key block: ceil(BLOCK_TILE / DKV_BLOCK_K); both are powers of two, so
                          the tiles cover exactly BLOCK_TILE keys
      DKV_TOKENS          (token, slot) entries gathered per step: max(1, 64 // GP), so 64+ rows a step
      DKV_ROWS            rows per step: DKV_TOKENS * GP
      DKV_SEGMENT         entries per program: max(DKV_TOKENS, 4096 // GP), about 4096 rows
    """
    gp = pow2(spec.group)
    lp = pow2(spec.block_size)
    tpp = force_tpp or (1 if (gp >= 16 or force_pad) else 16 // gp)
    gathered = tpp == 1 and spec.block_size < 16
    block_tile = max(16, lp)
    dkv_block_k = min(block_tile, 64)
    dkv_tokens = max(1, 64 // gp)
    return {
        "GP": gp,
        "LP": lp,
        "TOKENS_PER_PROGRAM": tpp,
        "BLOCK_M": max(gp * tpp, 16),
        "GATHERED": gathered,
        "BLOCK_TILE": block_tile,
        "BLOCK_DIAG": block_tile,
        "BLOCK_N": (16, 32, 64) if gathered else (block_tile,),
        "PADDING_BASELINE": bool(force_pad),
        "DKV_BLOCK_K": dkv_block_k,
        "DKV_KEY_TILES": -(-block_tile // dkv_block_k),
        "DKV_TOKENS": dkv_tokens,
        "DKV_ROWS": dkv_tokens * gp,
        "DKV_SEGMENT": max(dkv_tokens, 4096 // gp),
    }


def predict(spec: VariantSpec, config: dict, head_dim: int, dtype_bytes: int, force_pad: bool = False) -> dict:
    """Predicted shared memory (bytes) and registers per thread of `spec` under `config`."""
    lay = layout(spec, force_pad)
    d = padded_head_dim(head_dim)
    pred = FORMULAS[spec.family](lay["BLOCK_M"], config["BLOCK_N"], d, config["num_stages"], dtype_bytes,
                                 config["num_warps"])
    return {**pred, "BLOCK_M": lay["BLOCK_M"], "BLOCK_D": d}


def tile_configs(spec: VariantSpec) -> tuple[list[dict], list[str]]:
    """(kept, dropped): autotune candidates in order of preference (wider gathered tiles first), pruned by
    the shared-memory model at head dim 256 in a 16-bit dtype. Registers do not count toward the head-dim
    limits: the register model under-predicts the forward and over-predicts the backward (compiled
    figures in the module docstring), so it would keep configs that spill and drop ones that do not."""
    if spec.family not in FORMULAS:
        raise ValueError(f"no resource model for family {spec.family!r}; known: {sorted(FORMULAS)}")
    block_ns = sorted(layout(spec)["BLOCK_N"], key=lambda n: -n)
    candidates = ({"BLOCK_N": n, "num_warps": w, "num_stages": st} for n, (w, st) in itertools.product(block_ns, LAUNCH))
    return prune(candidates, lambda c, d, nbytes: predict(spec, c, d, nbytes), check_registers=False,
                 must_fit_head_dim=MAX_HEAD_DIM)
