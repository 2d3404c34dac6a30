"""Say on stderr what a slow first call is doing, so that compiling and tuning never look like a hang.

A cold first call compiles each generated kernel it launches (seconds each) and, for the tuned kernels,
compiles and times every fitting tile config. Two notices, each printed at most once per process:

- compiling: Triton's JIT hooks (`triton.knobs.runtime.jit_cache_hook` / `jit_post_compile_hook`) time
  every compile of a kernel of ours; one that is still running after `NSA_CODEGEN_NOTICE_S` seconds
  (default 1; a load from Triton's disk cache takes milliseconds) prints one line. Hooks another
  library installed keep being called.
- tuning: `tuning` announces each benchmark it starts (variant, head dim, dtype, length bucket, the
  number of candidates) and where the winner is kept.

`NSA_CODEGEN_NOTICE_S=off` silences both; they also go to the `nsa_codegen` logger at INFO level.
"""
from __future__ import annotations

import logging
import os
import sys
import threading

_log = logging.getLogger("nsa_codegen")
ENV_NOTICE = "NSA_CODEGEN_NOTICE_S"
OUR_MODULES = ("nsa_codegen.", "nsa_layout_")  # generated kernels load as nsa_codegen._variants.* etc.

_state = threading.local()
_said: set = set()
_installed = False
_lock = threading.Lock()


def notice_delay() -> float | None:
    """Seconds a compile may take before the notice; None when notices are off."""
    raw = os.environ.get(ENV_NOTICE, "1").strip().lower()
    if raw in ("off", "no", "none", "false"):
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        raise ValueError(f"{ENV_NOTICE}={raw!r}: expected a number of seconds or 'off'") from None


def say_once(tag: str, message: str) -> None:
    """Print `message` to stderr the first time `tag` is seen in this process (and log it then)."""
    with _lock:
        if tag in _said:
            return
        _said.add(tag)
    _log.info(message)
    if notice_delay() is None:
        return
    print(f"nsa_codegen: {message}", file=sys.stderr, flush=True)


def say(message: str) -> None:
    """Print `message` to stderr (and log it) unless notices are off."""
    _log.info(message)
    if notice_delay() is not None:
        print(f"nsa_codegen: {message}", file=sys.stderr, flush=True)


def _ours(fn) -> bool:
    module = getattr(fn, "module", "") or ""
    return module.startswith(OUR_MODULES)


def _compile_started(**kwargs) -> None:
    delay = notice_delay()
    if delay is None or not _ours(kwargs.get("fn")):
        return
    timer = threading.Timer(delay, say_once, args=(
        "compile", "compiling Triton kernels on first use of these shapes and dtypes (seconds per kernel; "
        "cached on disk afterwards, later processes load them in milliseconds)"))
    timer.daemon = True
    timer.start()
    _state.timer = timer


def _compile_finished(**kwargs) -> None:
    timer = getattr(_state, "timer", None)
    if timer is not None:
        timer.cancel()
        _state.timer = None


def _chain(ours, theirs):
    if theirs is None:
        return ours

    def hook(**kwargs):
        ours(**kwargs)
        return theirs(**kwargs)  # its answer decides (a cache hook may skip the compile)

    return hook


def install() -> None:
    """Install the compile hooks once (chained with any already set). A Triton without knobs: no-op."""
    global _installed
    if _installed:  # the per-load fast path
        return
    with _lock:
        if _installed:
            return
        _installed = True
    try:
        from triton import knobs
    except ImportError:
        return
    runtime = knobs.runtime
    runtime.jit_cache_hook = _chain(_compile_started, runtime.jit_cache_hook)
    runtime.jit_post_compile_hook = _chain(_compile_finished, runtime.jit_post_compile_hook)
