"""What every launcher needs, written once: the interpreter switch, the device check, head-dim
padding, and the choice of a tile config.

Config choice: a generated module's `CONFIGS` lists the tile configs its resource model kept, in
render-time preference order, each with the largest padded head dim it fits in a 16-bit and a 32-bit
dtype (`max_d16`, `max_d32`). The default is the first config that fits; if none fits, the one that
fits the largest head dim. Where a kernel is tuned, `nsa_codegen.kernels.tuning` benchmarks the
fitting configs through a launch function the caller hands it and persists the winner.
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Callable, Optional

import torch

from ..codegen.spec import padded_head_dim

LAUNCH_KEYS = ("num_warps", "num_stages")  # launch options; other non-`max_*` keys are constexprs


def interpreting() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1) runs the plain launchers on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def no_wrap(kernel):
    """The plain launchers call kernels directly; the ops pass `torch.library.wrap_triton`."""
    return kernel


def require_launch_device(q: torch.Tensor, public: str) -> None:
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"the Triton launchers need CUDA tensors (or TRITON_INTERPRET=1), got device {q.device}; "
            f"use {public}, which runs the reference on CPU"
        )


def head_group(q, kv) -> int:
    """G = H // K for q (b, n, H, d) and k / ck (b, *, K, d), as a Python int: head counts are
    structural (they pick the variant), so int() specializes symbolic sizes under
    torch.compile(dynamic=True) instead of handing a SymInt to VariantSpec."""
    return int(q.shape[2]) // int(kv.shape[2])


def _limit_key(dtype_bytes: int) -> str:
    return "max_d16" if dtype_bytes <= 2 else "max_d32"


def fitting_configs(configs, block_d: int, dtype_bytes: int) -> list[dict]:
    """The configs whose recorded head-dim limit fits `block_d`, in render-time preference order."""
    limit = _limit_key(dtype_bytes)
    return [c for c in configs if c[limit] >= block_d]


def default_config(configs, block_d: int, dtype_bytes: int) -> dict:
    """The untuned choice: the first fitting config, else the one with the largest head-dim limit."""
    fitting = fitting_configs(configs, block_d, dtype_bytes)
    if fitting:
        return fitting[0]
    return max(configs, key=lambda c: c[_limit_key(dtype_bytes)])


def split(config: dict) -> tuple[dict, dict]:
    """(constexpr kwargs, launch options) of one config; `max_*` entries are resource-model metadata."""
    constexprs = {k: v for k, v in config.items() if k not in LAUNCH_KEYS and not k.startswith("max_")}
    return constexprs, {k: config[k] for k in LAUNCH_KEYS if k in config}


@lru_cache(maxsize=None)
def _default_split(module, block_d: int, dtype_bytes: int) -> tuple[dict, dict]:
    return split(default_config(module.CONFIGS, block_d, dtype_bytes))


def choose_config(module, head_dim: int, dtype: torch.dtype, *, override: Optional[dict] = None,
                  tune: Optional[tuple[Optional[str], torch.Tensor, Callable[[dict], None]]] = None
                  ) -> tuple[dict, dict]:
    """(constexprs, launch options) for one kernel launch of `module`.

    `override`: an explicit config (tests, benchmarks), used as given. `tune`: (kernel name or None,
    probe tensor (b, n, ...), run) for a tuned kernel, where `run(config)` launches that kernel once
    with `config` into scratch outputs; the tuned choice is memoized per (kernel, head dim, dtype,
    n bucket, device) and persisted. Otherwise the default (first fitting config)."""
    if override is not None:
        return split(override)
    block_d, dtype_bytes = padded_head_dim(head_dim), torch.finfo(dtype).bits // 8
    if tune is None:
        return _default_split(module, block_d, dtype_bytes)
    from . import tuning

    kernel, probe, run = tune
    return tuning.kernel_config(module, kernel, head_dim, dtype, probe.shape[1], probe, run)


def route(x: torch.Tensor, use_kernels: bool = True) -> str:
    """Where a public op runs: 'triton' (the generated kernels) on CUDA tensors when enabled, else
    'reference' (pure PyTorch: the CPU path)."""
    return "triton" if use_kernels and x.is_cuda else "reference"


def report(paths: Optional[dict], branch: str, path: str) -> None:
    """Record the path an op took in the caller's dict (`SparseAttention.last_paths`)."""
    if paths is not None:
        paths[branch] = path
