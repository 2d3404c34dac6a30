"""Shared-memory and register model of the fused importance + top-k kernels (topk_fwd, topk_bwd), used
at render time only.

A program owns BLOCK_M query tokens of one selection row (a kv head when the group shares its
selection, a query head when not) and streams BLOCK_U candidate blocks at a time. The r = l'/s
compressed keys of a candidate are summed by r dots against the row's (group-averaged) query held in
fp32; compressed keys are upcast to fp32 and the dots run in fp32 (`tf32x3` for 16-bit inputs, `ieee`
for fp32), so the importance scores carry no 16-bit rounding. Per row the kernel keeps a running
log-sum-exp and a top-KP list (key, index) in registers; KP = next power of two of kk is a runtime
specialization (not known at render time), modelled at KP = 32.

Model (per program), fitted to kernels compiled offline for sm_90 (triton 3.9, `triton.compile` with
GPUTarget('cuda', 90, 32); shared memory from the compiled metadata, registers and spills from
`cuobjdump -res-usage`). The dots take fp32 operands, staged through shared memory and, for tf32x3
(16-bit inputs), split into hi/lo halves: 16/B bytes per operand element. The candidate-key loads are
gathers (rows u*R + j) that the compiler does not pipeline through shared memory, so the number of
stages does not enter. The formulas are upper bounds of what was measured:
  topk_fwd  smem = (BM + BU)*D*16/B
            regs = (BM*D + 3*BM*BU + 2*BM*KP) / (32 W) + 40        (q, scores/keys/merge, top-k list)
  topk_bwd  smem = (BM + BU)*D*16/B + BM*D*8 + BM*BU*8
            regs = (2*BM*D + BU*D + 3*BM*BU + 2*BM*KP) / (32 W) + 48  (q, dq, ck sum, scores/ds)
Compiled (measured) vs model, shared memory in bytes, bf16, causal, G = 16, R = 4, KP = 16 unless noted:
  fwd 64x64 D128 8w: 131072 vs 131072, 217 regs, no spill   (4 warps: 255 regs, no spill)
  fwd 64x64 D64  4w:  65536 vs  65536       fwd 64x32 D128 fp16 non-causal: 98304 vs 98304
  fwd 64x64 D128 G1 4w: 131072 vs 131072, 200 regs, no spill
  bwd 32x32 D128 8w: 106496 vs 106496, 255 regs, 64 B spilled   (4 warps: 592 B spilled)
  bwd 32x64 D128 8w non-causal: 147456 vs 163840, 255 regs, 144 B spilled
  bwd 64x32 D128 8w: 163840 vs 180224, 255 regs, 832 B spilled
  bwd 64x32 D64  4w:  81920 vs  90112, 255 regs, 752 B spilled
The register formula is a rough guide only (it does not see tf32x3's operand copies); the preference
order below puts the configs measured without (or with the least) spilling first.

`tile_configs(spec)` enumerates the candidates in order of preference and records for each the largest
head dim (16..256) it fits (predicted shared memory <= 227 KiB on H100/H200, registers <= 255) for 16-
and 32-bit inputs (`max_d16`, `max_d32`); a config that fits no head dim is dropped with the reason.
The launcher picks the first kept config that fits the call's head dim, without importing this module.
"""
from __future__ import annotations

import itertools

import sympy

from . import B, D, S, W, Formula, prune
from ..spec import VariantSpec, padded_head_dim

MODEL_KP = 32  # top-k list width assumed at render time (kk <= 32 covers the paper's k = 16)

BM, BU, KP = sympy.symbols("BLOCK_M BLOCK_U KP", positive=True, integer=True)

_SYMBOLS = (BM, BU, D, S, B, W, KP)
FORMULAS = {
    "topk_fwd": Formula((BM + BU) * D * 16 / B, (BM * D + 3 * BM * BU + 2 * BM * KP) / (32 * W) + 40, _SYMBOLS),
    "topk_bwd": Formula((BM + BU) * D * 16 / B + BM * D * 8 + BM * BU * 8,
                        (2 * BM * D + BU * D + 3 * BM * BU + 2 * BM * KP) / (32 * W) + 48, _SYMBOLS),
}

# per family: (BLOCK_M, BLOCK_U) in order of preference, then (num_warps, num_stages)
TILES = {
    "topk_fwd": ((64, 64), (64, 32), (32, 64), (32, 32), (128, 64), (16, 64), (16, 32), (16, 16)),
    "topk_bwd": ((32, 32), (32, 64), (64, 32), (64, 64), (16, 64), (16, 32), (16, 16)),
}
LAUNCH = ((8, 2), (4, 2), (8, 1))


def predict(spec: VariantSpec, config: dict, head_dim: int, dtype_bytes: int, kp: int = MODEL_KP) -> dict:
    """Predicted shared memory (bytes) and registers per thread of `spec` under `config`."""
    d = padded_head_dim(head_dim)
    pred = FORMULAS[spec.family](config["BLOCK_M"], config["BLOCK_U"], d, config["num_stages"], dtype_bytes,
                                 config["num_warps"], kp)
    return {**pred, "BLOCK_D": d}


def tile_configs(spec: VariantSpec) -> tuple[list[dict], list[str]]:
    """(kept, dropped) tile configs of a top-k variant, in order of preference; a config that fits no head
    dim (shared memory and registers) is dropped."""
    candidates = ({"BLOCK_M": bm, "BLOCK_U": bu, "num_warps": w, "num_stages": st}
                  for (bm, bu), (w, st) in itertools.product(TILES[spec.family], LAUNCH))
    return prune(candidates, lambda c, d, nbytes: predict(spec, c, d, nbytes), check_registers=True,
                 must_fit_head_dim=None)
