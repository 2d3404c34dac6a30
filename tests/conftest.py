"""Shared test settings: the interpreter switch, the numerics rule and the poison fixture.

Test modules import the helpers below with `from conftest import ...` (tests/ is on sys.path).
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

# ----------------------------------------------------------------------------------------------------
# interpreter switch
#
# Triton decides interpreted-vs-compiled when a kernel is *defined* and reads TRITON_INTERPRET then:
# set it here, before any test module (or a dependency such as native-sparse-attention-pytorch) loads
# a generated kernel, so every kernel of the CPU lane runs under the interpreter.

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if INTERPRET:
    # Test-only speed-up (5x on the selected-attention kernels): the interpreter checks every int32 op for
    # overflow; the kernels' offsets are bounded by the shapes (launchers refuse int32-overflowing
    # extents). Device kernels are unaffected.
    import triton.runtime.interpreter as _interpreter

    _interpreter.interpreter_builder.options = dataclasses.replace(
        _interpreter.interpreter_builder.options, sanitize_overflow=False)

# Under pytest-xdist every worker is its own process: one intra-op thread each, so `-n 2` on two cores
# does not oversubscribe (measured: 3x the CPU time for the decoding tests without this).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

interpreter_lane = pytest.mark.skipif(not INTERPRET, reason="interpreter lane (TRITON_INTERPRET=1, CPU)")
needs_cuda = pytest.mark.skipif(not CUDA or INTERPRET, reason="needs CUDA (GPU lane)")


# ----------------------------------------------------------------------------------------------------
# the numerics rule
#
# A kernel result `got` is compared with the fp32 reference `ref32` on the same inputs:
# - 16-bit kernels: max|got - ref32| <= 2 * max|ref_lowp - ref32| + 1e-5, where ref_lowp is the reference
#   computed in the kernel's dtype (the error a plain low-precision implementation makes);
# - fp32 kernels (the interpreter lane): max|got - ref32| <= 1e-4 * max|ref32| + 1e-5 (relative; the same
#   absolute floor keeps a reference that is exactly 0 by cancellation, e.g. dq of a query attending to
#   one key, from demanding an exact 0 of fp32 sums).

FP32_REL = 1e-4
FLOOR = 1e-5


def _max_abs(x: torch.Tensor) -> float:
    return x.abs().max().item() if x.numel() else 0.0


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` at |x| (its smallest normal spacing below the normal range)."""
    fi = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(fi.tiny)))) * fi.eps


def tolerance(ref32: torch.Tensor, ref_lowp: torch.Tensor | None = None, *, rel: float = FP32_REL,
              floor: float = FLOOR, rel_slack: float = 0.0) -> float:
    """The rule's bound on max|got - ref32|: `rel` * max|ref32| + `floor` without `ref_lowp` (fp32 kernels),
    else 2 * max|ref_lowp - ref32| + `floor` (+ `rel_slack` * max|ref32|: a relative floor for long GPU
    sums)."""
    ref32 = ref32.detach().double().cpu()
    scale = _max_abs(ref32)
    if ref_lowp is None:
        return rel * scale + floor
    return 2 * _max_abs(ref_lowp.detach().double().cpu() - ref32) + floor + rel_slack * scale


def assert_numerics(name: str, got: torch.Tensor, ref32: torch.Tensor, ref_lowp: torch.Tensor | None = None, *,
                    rel: float = FP32_REL, floor: float = FLOOR, rel_slack: float = 0.0,
                    ulp_dtype: torch.dtype | None = None) -> tuple[float, float]:
    """Assert the numerics rule for one tensor; returns (max|got - ref32|, tolerance).

    NaN in `got` fails first (with the poison fixture: an element no kernel wrote). `ulp_dtype`: results
    stored in that low-precision dtype may differ by one unit in the last place at each element's
    magnitude on top of the rule (both sides end on a rounding of the same sum)."""
    assert got.shape == ref32.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref32.shape)}"
    nan = torch.isnan(got)
    assert not nan.any(), f"{name}: NaN (an element left unwritten?) at {nan.nonzero()[:5].tolist()}"
    tol = tolerance(ref32, ref_lowp, rel=rel, floor=floor, rel_slack=rel_slack)
    got64, ref64 = got.detach().double().cpu(), ref32.detach().double().cpu()
    diff = (got64 - ref64).abs()
    if ulp_dtype is not None:
        diff = diff - ulp(ref64, ulp_dtype)
    err = diff.max().item() if diff.numel() else 0.0
    if err > tol:
        at = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise AssertionError(
            f"{name}: max|kernel - ref32|{' - ulp' if ulp_dtype else ''} = {err:.3e} > tolerance {tol:.3e} at "
            f"{at}: kernel {got64[at].item():.6g}, ref32 {ref64[at].item():.6g}"
            + ("" if ref_lowp is None else f" (max|ref_lowp - ref32| = {_max_abs(ref_lowp.detach().double().cpu() - ref64):.3e})"))
    return err, tol


# ----------------------------------------------------------------------------------------------------
# poison: every allocation the launchers make starts as NaN / a sentinel
#
# The launchers allocate their outputs with torch.empty / empty_like / empty_strided and leave their
# values to the kernels. Under `poison` those allocations come back filled (floating: NaN, bool: True,
# integers: -7, unsigned: their maximum), so an element no kernel writes shows up in the comparison
# (NaN fails `assert_numerics`, -7 is no block index). Allocations that are zero-filled by design
# (accumulators: torch.zeros) stay zero.

POISON_INT = -7


def poison_fill(t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        elif t.dtype == torch.bool:
            t.fill_(True)
        elif str(t.dtype).startswith("torch.uint"):
            t.fill_(torch.iinfo(t.dtype).max)
        else:
            t.fill_(POISON_INT)
    return t


@pytest.fixture
def poison(monkeypatch):
    """For the duration of a test, torch.empty, torch.empty_like and torch.empty_strided return
    poisoned tensors (see `poison_fill`)."""
    for name in ("empty", "empty_like", "empty_strided"):
        real = getattr(torch, name)

        def poisoned(*args, _real=real, **kwargs):
            return poison_fill(_real(*args, **kwargs))

        monkeypatch.setattr(torch, name, poisoned)
