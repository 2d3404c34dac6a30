"""Compile the decoding kernels (range, selected, combine) for sm_90 without a GPU (Triton's bundled
ptxas) and print their shared memory next to the resource model's prediction
(nsa_codegen.codegen.resources.decode.predict). Registers are only known at load time, on a GPU.

    python3 benchmarks/profile/compile_decode_offline.py [variant names...]
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from nsa_codegen.codegen import cache  # noqa: E402
from nsa_codegen.codegen.resources import decode as resources  # noqa: E402
from nsa_codegen.codegen.spec import VariantSpec  # noqa: E402
from nsa_codegen.kernels._launch import default_config  # noqa: E402

PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
CONSTEXPRS = ("HEAD_DIM", "BLOCK_D", "INPUT_PRECISION", "BLOCK_N", "BLOCK_S")
UNALIGNED = ("stride_lo", "stride_hi", "stride_p", "stride_is", "stride_as", "stride_qh")  # may be 1


def signature(kernel, dtype: str) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in ("Q", "K", "V", "OUT"):
            sig[name] = PTR[dtype]
        elif name in ("IDX", "LO", "HI", "POS"):
            sig[name] = "*i64"
        elif name == "VALID":
            sig[name] = "*i1"
        elif name in ("PART_O", "PART_LSE", "LSE"):
            sig[name] = "*fp32"
        elif name == "scale":
            sig[name] = "fp32"
        elif name in CONSTEXPRS:
            sig[name] = "constexpr"
        else:
            sig[name] = "i32"
    return sig


def compile_kernel(mod, name: str, d: int, dtype: str):
    kernel = getattr(mod, name)
    nbytes = 4 if dtype == "fp32" else 2
    config = default_config(mod.CONFIGS, d, nbytes)
    if name == "combine_kernel":
        const = {"HEAD_DIM": d, "BLOCK_D": d, "BLOCK_S": 32}
        opts = {"num_warps": 4, "num_stages": 1}
    else:
        const = {"HEAD_DIM": d, "BLOCK_D": d, "INPUT_PRECISION": "ieee" if dtype == "fp32" else "tf32",
                 "BLOCK_N": config["BLOCK_N"]}
        opts = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
    sig = signature(kernel, dtype)
    # the JIT specializes 16-byte-aligned pointers and strides divisible by 16 (see compile_select_offline.py)
    attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(kernel.arg_names)
             if sig[arg].startswith("*") or (arg.startswith("stride_") and arg not in UNALIGNED)}
    compiled = triton.compile(ASTSource(kernel, sig, constexprs=const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                              options=opts)
    return compiled.metadata.shared, config


if __name__ == "__main__":
    names = sys.argv[1:] or [f"decode_fwd_g{g}_causal" for g in (1, 4, 16)]
    print(f"{'variant':24s} {'kernel':16s} {'d':>4s} {'dtype':5s} {'config':22s} {'shared':>8s} {'model':>8s}")
    for variant in names:
        spec = VariantSpec.from_name(variant)
        mod = cache.load_variant(spec)
        for d in (64, 128, 256):
            for dtype in ("bf16", "fp32"):
                for kernel in ("range_kernel", "selected_kernel", "combine_kernel"):
                    shared, config = compile_kernel(mod, kernel, d, dtype)
                    model = resources.predict(spec, config, d, 4 if dtype == "fp32" else 2)["shared"]
                    cfg = ("w=4 s=1" if kernel == "combine_kernel" else
                           f"BN={config['BLOCK_N']} w={config['num_warps']} s={config['num_stages']}")
                    print(f"{variant:24s} {kernel:16s} {d:4d} {dtype:5s} {cfg:22s} {shared:8d} "
                          f"{model if kernel != 'combine_kernel' else '-':>8}", flush=True)
