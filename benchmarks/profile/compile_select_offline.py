"""Compile selected-attention variants for sm_90 without a GPU (Triton's bundled ptxas) and compare the
compiled shared memory with the resource model (nsa_codegen.codegen.resources.selected.predict).
Registers are only known at load time (on a GPU: select_check.py's `resources` section).

    python3 benchmarks/profile/compile_select_offline.py [variant names...]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from nsa_codegen.codegen import cache  # noqa: E402
from nsa_codegen.codegen.resources import selected as resources  # noqa: E402
from nsa_codegen.codegen.spec import VariantSpec  # noqa: E402

PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def signature(kernel, dtype: str, idx: str = "i64"):
    sig = {}
    for name in kernel.arg_names:
        if name in ("Q", "K", "V", "OUT", "DO", "DQ", "GATES"):
            sig[name] = PTR[dtype]
        elif name in ("IDX",):
            sig[name] = f"*{idx}"
        elif name == "VALID":
            sig[name] = "*i1"
        elif name in ("LSE", "DELTA", "DK", "DV", "DG"):
            sig[name] = "*fp32"
        elif name == "scale":
            sig[name] = "fp32"
        elif name.isupper() and name not in ("N", "HS", "GQA", "NUM_SEL"):
            sig[name] = "constexpr"
        else:
            sig[name] = "i32"
    return sig


def compile_variant(spec: VariantSpec, d: int = 128, dtype: str = "bf16", config=None):
    mod = cache.load_variant(spec)
    config = config or mod.CONFIGS[0]
    const = {"HEAD_DIM": d, "BLOCK_D": d, "KK_PAD": 16, "HAS_GATES": True, "BLOCK_N": config["BLOCK_N"]}
    sig = signature(mod.kernel, dtype)
    # the JIT specializes 16-byte-aligned pointers and strides divisible by 16; without these hints the
    # loads do not vectorize and Triton does not pipeline them, so the compile would not match a launch
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(mod.kernel.arg_names)
             if sig[name].startswith("*") or name.startswith("stride_")}
    src = ASTSource(mod.kernel, sig, constexprs=const, attrs=attrs)
    opts = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    return k.metadata.shared, config


if __name__ == "__main__":
    names = sys.argv[1:] or ["select_fwd_bs64_g16_causal", "select_bwd_bs64_g16_causal", "select_fwd_bs64_g1_causal",
                             "select_bwd_bs8_g4_noncausal", "select_fwd_bs8_g16_causal", "select_bwd_bs128_g16_noncausal"]
    print(f"{'variant':36s} {'config':40s} {'shared':>8s} {'model':>8s}")
    for name in names:
        spec = VariantSpec.from_name(name)
        shared, config = compile_variant(spec)
        pred = resources.predict(spec, config, 128, 2)
        cfg = f"BN={config['BLOCK_N']} w={config['num_warps']} s={config['num_stages']}"
        print(f"{name:36s} {cfg:40s} {shared:8d} {pred['shared']:8d}", flush=True)
