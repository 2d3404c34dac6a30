"""Argument checks shared by the kernel families (nsa_codegen.kernels.*).

Each function raises TypeError / ValueError naming the offending argument and the allowed values
(tests match words in the messages). Checks that only one family needs (selection shapes, num_mem
bounds, ...) stay in that family's module, in its `check_inputs`.

Where they run: every op body (the `triton_op` body, which is also the op's fake / meta implementation,
and its CPU kernel, forward and backward) calls its family's `check_inputs` before anything else, so the
public functions, the plain launchers, `torch.ops.nsa.<op>` on any device and meta tensors raise the
same errors. Everything here reads metadata only (types, shapes, strides, dtypes, devices); under
torch.compile the integer arguments may arrive as symbolic ints, which the integer checks accept (a
comparison becomes a guard).
"""
from __future__ import annotations

import torch

HEAD_DIM_MIN, HEAD_DIM_MAX, HEAD_DIM_MULTIPLE = 16, 256, 8
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def _names_and(names) -> str:
    """'q and ck' for two names, 'q, k, v' for more."""
    return " and ".join(names) if len(names) == 2 else ", ".join(names)


def require_tensors(layout: str = "", **named) -> None:
    """Each value a torch.Tensor with 4 dims; `layout` (e.g. '(b, n, heads, d)') goes into the message."""
    for name, t in named.items():
        require_tensor(name, t)
        require_4d(name, t, layout)


def require_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def require_4d(name: str, t, layout: str = "") -> None:
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D{f' ({layout})' if layout else ''}, got shape {tuple(t.shape)}")


def require_float(name: str, t) -> None:
    """Any floating dtype: the reference computes in the inputs' dtype."""
    if not t.is_floating_point():
        raise TypeError(f"{name} dtype must be a floating-point dtype (float16, bfloat16, float32, float64), "
                        f"got {t.dtype}")


def require_kernel_dtype(name: str, t) -> None:
    """The dtypes the generated kernels take (the reference takes any floating dtype)."""
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} dtype must be one of float16, bfloat16, float32 for the Triton kernels, got "
                        f"{t.dtype}; the reference path (CPU, or use_kernels=False) takes any floating dtype")


def require_index_dtype(name: str, t) -> None:
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} dtype must be torch.int32 or torch.int64, got {t.dtype}")


def require_last_dim_contiguous(name: str, t, allow_size_one: bool = False) -> None:
    """stride(-1) == 1; with allow_size_one a last dim of size <= 1 passes whatever its stride."""
    if allow_size_one and t.shape[-1] <= 1:
        return
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")


def require_same_dtype(**named) -> None:
    dtypes = [t.dtype for t in named.values()]
    if any(dt != dtypes[0] for dt in dtypes):
        raise TypeError(f"{_names_and(list(named))} must share one dtype, got {_names_and([str(x) for x in dtypes])}")


def require_same_device(**named) -> None:
    devices = [t.device for t in named.values()]
    if any(dev != devices[0] for dev in devices):
        raise ValueError(f"{_names_and(list(named))} must be on one device, got {_names_and([str(x) for x in devices])}")


def require_one_device(named: dict) -> None:
    """Like require_same_device, but the message lists the devices as a {name: device} dict."""
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


def require_same_shape(a_name: str, a, b_name: str, b) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{a_name} and {b_name} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def require_heads(h: int, kh: int, note: str = "mismatched heads") -> None:
    """H query heads a multiple of K >= 1 kv heads."""
    if kh < 1 or h % kh != 0:
        raise ValueError(f"query heads H={h} must be a multiple of kv heads K={kh} ({note})")


def require_head_dim(d: int) -> None:
    """The dense kernels' head dims: multiples of HEAD_DIM_MULTIPLE in [HEAD_DIM_MIN, HEAD_DIM_MAX]."""
    if not (HEAD_DIM_MIN <= d <= HEAD_DIM_MAX and d % HEAD_DIM_MULTIPLE == 0):
        raise ValueError(
            f"unsupported head dim d={d}: the Triton kernels take multiples of {HEAD_DIM_MULTIPLE} in "
            f"[{HEAD_DIM_MIN}, {HEAD_DIM_MAX}] (e.g. 16, 32, 64, 128, 256); the reference path (CPU, or "
            f"use_kernels=False) takes any head dim"
        )


def is_int(x) -> bool:
    """A Python int that is not a bool, or a symbolic int (torch.compile)."""
    return isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool)


def require_int(name: str, value, minimum: int) -> None:
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def require_positive_int(name: str, value) -> None:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def require_bool(name: str, value, note: str = " (True or False)") -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool{note}, got {value!r}")


def require_scale(scale, note: str = "") -> None:
    """A Python int or float (not a bool); `note` follows 'a Python float' in the message."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"scale must be a Python float{note}, got {type(scale).__name__}")


def require_saved(q, out, lse, dout) -> None:
    """The backward's saved forward results and incoming gradient: out and dout of q's shape, lse (b, n, H)
    float32, all on q's device."""
    require_tensors(out=out, dout=dout)
    require_tensor("lse", lse)
    require_one_device({"q": q, "out": out, "lse": lse, "dout": dout})
    if tuple(out.shape) != tuple(q.shape) or tuple(dout.shape) != tuple(q.shape):
        raise ValueError(
            f"out and dout must have q's shape {tuple(q.shape)}, got {tuple(out.shape)} and {tuple(dout.shape)}"
        )
    if tuple(lse.shape) != tuple(q.shape[:3]) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 of shape {tuple(q.shape[:3])}, got {lse.dtype} {tuple(lse.shape)}")


INT32_OFFSET_LIMIT = 2 ** 31


def require_int32_extent(family: str, **named) -> None:
    """The select / window / compressed kernels address one batch element with int32 offsets (only the
    batch offset is int64): the elements a tensor spans within one batch element, and its contiguous
    gradient buffer, must stay below 2**31. Metadata only (shapes and strides; symbolic sizes under
    torch.compile become guards, not specializations)."""
    for name, t in named.items():
        if t is None or t.numel() == 0:
            continue
        dims = list(zip(t.shape[1:], t.stride()[1:]))
        extent = 1
        for size, _ in dims:
            extent = extent * size
        spanned = sum((size - 1) * abs(stride) for size, stride in dims) + 1
        if extent >= INT32_OFFSET_LIMIT or spanned >= INT32_OFFSET_LIMIT:
            raise ValueError(
                f"{name} of shape {tuple(t.shape)} and strides {tuple(t.stride())} spans "
                f"{max(extent, spanned)} elements per batch element: the {family} kernels use int32 offsets "
                f"within a batch element (limit 2**31); split the sequence or the heads across calls"
            )


def alert_not_deterministic(op: str, why: str) -> None:
    """PyTorch's convention for a nondeterministic backward: under torch.use_deterministic_algorithms(True)
    raise (or warn with warn_only=True), naming the op and why its result depends on scheduling."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (f"{op} is not deterministic: {why}. You enabled torch.use_deterministic_algorithms(True); "
               "pass warn_only=True to allow it with a warning")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        import warnings

        warnings.warn(message, stacklevel=3)
    else:
        raise RuntimeError(message)

