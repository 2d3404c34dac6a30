"""Persisted tuning of launch configs: the kernels whose launchers pass `tune=` to
`_launch.choose_config` (the selected-attention forward and the two kernels of the compressed-attention
backward, each kernel of a module tuned on its own).

A generated module lists the tile configs the resource model kept (`CONFIGS`, render-time preference
order). Without tuning the launcher takes the first one that fits the head dim (the *default*). With
tuning, a CUDA forward looks its key up

  1. in an in-process dict (the hot path once warm: a dict lookup, no host sync),
  2. in a JSON table in the user cache dir (`cache.cache_dir() / "tuning.json"`),
  3. in the table the package ships (`tuning_shipped.json` beside this file, written by
     `python -m nsa_codegen tune` on the GPUs the project is checked on; matched without the Triton
     version; `NSA_CODEGEN_SHIPPED_TUNING=0` ignores it),
  4. else compiles every fitting config at once on a few threads (`NSA_CODEGEN_COMPILE_THREADS`),
     benchmarks each (`triton.testing.do_bench`, few reps, on the call's own inputs with scratch
     outputs: the caller's tensors are never written by a candidate) and persists the fastest (file
     lock, re-read, merge, write to a temp file, atomic rename). A line on stderr says so
     (`progress`).

Key (`TuneKey`): variant name, head dim, dtype, n bucket (next power of two of the sequence length),
GPU name, Triton version. An entry also records the fitting candidate list it was measured against;
an entry whose candidates differ from the current module's (templates or resource model changed) is
stale and ignored, as are entries of another table format and unreadable files. When two processes
tune the same key at once, the first to write wins and the other adopts its entry.

Never benchmarked (the table is used if it has the key, else the default config): under
`NSA_CODEGEN_TUNE=0` (then not even the table: always the default; read
when a key is first resolved in a process, so set it before the first call),
`TRITON_INTERPRET=1`, fake / meta / functional tensors (torch.compile tracing), an active dispatch mode
(make_fx, FakeTensorMode), `torch.compiler.is_compiling()`, CUDA graph capture, non-CUDA tensors.
The benchmark step is injectable (`bench_fn`: a callable timing a zero-argument function, in ms), so
the selection logic runs on CPU with a fake timer.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import torch
import triton

from ..codegen import cache
from ..codegen.cache import file_lock
from ..codegen.spec import padded_head_dim, pow2
from . import progress
from ._launch import _default_split, fitting_configs, interpreting, split

TABLE_FORMAT = 1
TABLE_NAME = "tuning.json"
SHIPPED_NAME = "tuning_shipped.json"  # beside this file: winners measured on the GPUs the project runs on
ENV_SHIPPED = "NSA_CODEGEN_SHIPPED_TUNING"
ENV_TUNE = "NSA_CODEGEN_TUNE"
ENV_THREADS = "NSA_CODEGEN_COMPILE_THREADS"
BENCH_WARMUP_MS = 5  # triton.testing.do_bench budgets: a few reps per candidate
BENCH_REP_MS = 25

_log = logging.getLogger(__name__)

# in-process memo: (module, head_dim, dtype, n_bucket, device) -> (constexprs, launch)
_MEMO: dict = {}
_MEMO_LOCK = threading.Lock()
_TABLE_CACHE: dict = {}  # path -> ((mtime_ns, size, ino), entries)
_WARNED: set = set()
_DECISIONS: dict = {}  # str(TuneKey) -> the last cold-path decision (diagnostics)


# ----------------------------------------------------------------------------------------------------
# configs


def candidates_digest(candidates) -> str:
    text = json.dumps([dict(sorted(c.items())) for c in candidates], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# key


@dataclass(frozen=True)
class TuneKey:
    variant: str  # generated module name, e.g. select_fwd_bs64_g16_causal
    head_dim: int
    dtype: str  # e.g. bfloat16
    n_bucket: int  # next power of two of the sequence length
    gpu: str  # torch.cuda.get_device_name, e.g. NVIDIA H200 ("cpu" under the interpreter)
    triton: str  # triton.__version__

    def __str__(self) -> str:  # the table's key
        return (f"{self.variant}|d{self.head_dim}|{self.dtype}|n{self.n_bucket}|{self.gpu}"
                f"|triton-{self.triton}")


def n_bucket(n: int) -> int:
    return pow2(int(n))


def variant_name(module) -> str:
    return module.__name__.rsplit(".", 1)[-1]


def device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    index = device.index
    if index is None:
        try:
            index = torch.cuda.current_device()
        except Exception:  # no driver (fake CUDA tensors on a CPU machine)
            return "cuda-unknown"
    return _cuda_name(index)


@lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    try:
        return torch.cuda.get_device_name(index)
    except Exception:  # no driver (fake CUDA tensors on a CPU machine)
        return "cuda-unknown"


def make_key(variant: str, head_dim: int, dtype: torch.dtype, n: int, device: torch.device) -> TuneKey:
    return TuneKey(variant, int(head_dim), str(dtype).removeprefix("torch."), n_bucket(n), device_name(device),
                   triton.__version__)


def _concrete(n) -> Optional[int]:
    """n as an int; for a symbolic size its hint (reading it adds no guard: the config never changes
    results), None when there is none."""
    if isinstance(n, int):
        return n
    try:
        hint = n.node.hint
        return int(hint) if hint is not None else None
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------------
# when not to benchmark


def tuning_enabled() -> bool:
    return os.environ.get(ENV_TUNE, "1").strip().lower() not in ("0", "false", "off", "no")


def benchmark_blocker(probe: torch.Tensor) -> Optional[str]:
    """Why a call with input `probe` must not benchmark (None: it may)."""
    if not tuning_enabled():
        return f"{ENV_TUNE}=0"
    if interpreting():
        return "TRITON_INTERPRET=1"
    if type(probe) not in (torch.Tensor, torch.nn.Parameter):
        return f"tensor subclass {type(probe).__name__} (fake / functional / traced)"
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(probe) or probe.device.type == "meta":
        return "fake or meta tensor"
    if probe.device.type != "cuda":
        return f"{probe.device.type} tensor"
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        if _get_current_dispatch_mode() is not None:
            return "dispatch mode active (tracing)"
    except ImportError:  # pragma: no cover - older torch
        pass
    if torch.compiler.is_compiling():
        return "torch.compile tracing"
    if torch.cuda.is_current_stream_capturing():
        return "CUDA graph capture"
    return None


# ----------------------------------------------------------------------------------------------------
# persisted table


def table_path() -> Path:
    return cache.cache_dir() / TABLE_NAME


def _lock_path() -> Path:
    return cache.cache_dir() / f".{TABLE_NAME}.lock"


def _read_entries(path: Path) -> dict:
    """The entries of the table at `path`; {} when missing, unreadable, corrupt or of another format."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        _warn_once(f"read:{path}", f"ignoring unreadable tuning table {path}: {exc}")
        return {}
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT or not isinstance(data.get("entries"), dict):
        _warn_once(f"format:{path}", f"ignoring tuning table {path} of another format")
        return {}
    return data["entries"]


def load_table(path: Optional[Path] = None) -> dict:
    """The persisted entries (re-read only when the file changed)."""
    path = Path(path) if path is not None else table_path()
    try:
        st = path.stat()
    except OSError:
        _TABLE_CACHE.pop(path, None)
        return {}
    stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    hit = _TABLE_CACHE.get(path)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    entries = _read_entries(path)
    _TABLE_CACHE[path] = (stamp, entries)
    return entries


def _valid_entry(entry, candidates) -> Optional[dict]:
    """The entry's config if it was measured against exactly these candidates, else None (stale)."""
    if not isinstance(entry, dict):
        return None
    config = entry.get("config")
    if entry.get("candidates_sha") != candidates_digest(candidates) or config not in candidates:
        return None
    return candidates[candidates.index(config)]


def lookup(key: TuneKey, candidates) -> Optional[dict]:
    """The persisted winner for `key` among `candidates`, None when absent or stale."""
    return _valid_entry(load_table().get(str(key)), candidates)


def shipped_table_path() -> Path:
    return Path(__file__).with_name(SHIPPED_NAME)


def shipped_key(key: TuneKey) -> str:
    """A shipped entry's key: the user table's without the Triton version (tile winners measured with
    one Triton release are a better start than the untuned default under the next; the candidate digest
    still guards against changed templates)."""
    return str(key).rsplit("|triton-", 1)[0]


def lookup_shipped(key: TuneKey, candidates) -> Optional[dict]:
    """The winner the package ships for `key` (measured on that GPU model), None when absent or stale,
    or when `NSA_CODEGEN_SHIPPED_TUNING=0`."""
    if os.environ.get(ENV_SHIPPED, "1").strip().lower() in ("0", "false", "off", "no"):
        return None
    return _valid_entry(load_table(shipped_table_path()).get(shipped_key(key)), candidates)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def store(key: TuneKey, candidates, winner: dict, times_ms) -> dict:
    """Persist `winner` for `key` and return the config the table holds afterwards: under the lock the
    table is re-read; a valid entry another process wrote meanwhile wins (all processes agree)."""
    path = table_path()
    with file_lock(_lock_path()):
        entries = dict(_read_entries(path))
        theirs = _valid_entry(entries.get(str(key)), candidates)
        if theirs is not None:
            return theirs
        entries[str(key)] = {
            "config": winner,
            "candidates_sha": candidates_digest(candidates),
            "times_ms": [{"config": c, "ms": (t if math.isfinite(t) else None)} for c, t in zip(candidates, times_ms)],
            "key": asdict(key),
            "torch": torch.__version__,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "pid": os.getpid(),
        }
        _atomic_write(path, json.dumps({"format": TABLE_FORMAT, "entries": entries}, indent=1, sort_keys=True))
    return winner


def _warn_once(tag: str, message: str) -> None:
    if tag not in _WARNED:
        _WARNED.add(tag)
        _log.warning(message)


# ----------------------------------------------------------------------------------------------------
# benchmark + choice


def default_bench(fn: Callable[[], None]) -> float:
    """Median time of `fn` in ms (few reps: tuning runs on a cold first call)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=BENCH_WARMUP_MS, rep=BENCH_REP_MS, return_mode="median"))


def compile_threads() -> int:
    """Worker threads that compile tuning candidates at once (`NSA_CODEGEN_COMPILE_THREADS`, default:
    the CPU count, at most 8; 1 compiles one after another)."""
    raw = os.environ.get(ENV_THREADS, "").strip()
    if not raw:
        return max(1, min(8, os.cpu_count() or 1))
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{ENV_THREADS}={raw!r}: expected a positive number of threads")
    return value


def precompile(candidates, run: Callable[[dict], None], stream=None) -> None:
    """Launch every candidate once from a pool of threads, so their compiles overlap (ptxas runs as a
    subprocess; how much of the rest overlaps depends on the Triton build, and the first-call benchmark
    measures the total). The launches write scratch outputs only; they run
    on the caller's stream and device, so they are ordered after whatever produced the inputs. A failure
    here is ignored: the timing loop meets it again and scores the candidate inf."""
    threads = min(compile_threads(), len(candidates))
    if threads <= 1:
        return

    def launch(config):
        with contextlib.ExitStack() as stack:
            if stream is not None:
                stack.enter_context(torch.cuda.device(stream.device))
                stack.enter_context(torch.cuda.stream(stream))
            with contextlib.suppress(Exception):
                run(config)

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="nsa-compile") as pool:
        list(pool.map(launch, candidates))


def benchmark(candidates, run: Callable[[dict], None], bench_fn: Callable) -> list[float]:
    """Time of each candidate (`run(config)` launches once); inf for one that fails (e.g. too little
    shared memory at compile time)."""
    times = []
    for config in candidates:
        try:
            t = float(bench_fn(lambda config=config: run(config)))
        except Exception as exc:  # a candidate that does not compile/launch is skipped, not fatal
            _log.info("tuning candidate %s failed: %s", config, exc)
            t = math.inf
        times.append(t if t == t else math.inf)  # NaN -> inf
    return times


def choose(key: TuneKey, candidates, run: Callable[[dict], None], *, may_bench: bool,
           bench_fn: Optional[Callable] = None, probe: Optional[torch.Tensor] = None) -> Optional[dict]:
    """The config for `key`: the user table's if valid, else the shipped table's, else (when
    `may_bench`) the fastest candidate, persisted; None when none of these (the caller uses its default
    and does not memoize it)."""
    persisted = lookup(key, candidates)
    if persisted is not None:
        return _note(key, "table", persisted)
    shipped = lookup_shipped(key, candidates)
    if shipped is not None:
        return _note(key, "shipped", shipped)
    if not may_bench:
        return _note(key, "none", None)
    progress.say(f"tuning {key.variant} (head dim {key.head_dim}, {key.dtype}, length <= {key.n_bucket}): "
                 f"compiling and timing {len(candidates)} tile configs, once per GPU (kept in {table_path()})")
    if probe is not None and probe.is_cuda:  # only a GPU compiles (the interpreter has nothing to overlap)
        precompile(candidates, run, torch.cuda.current_stream(probe.device))
    times = benchmark(candidates, run, bench_fn or default_bench)
    best = min(range(len(candidates)), key=lambda i: (times[i], i))  # ties: render-time order
    if not math.isfinite(times[best]):
        _warn_once(f"allfail:{key}", f"every tuning candidate failed for {key}; using the default config")
        return _note(key, "none", None, times_ms=times, reason="every candidate failed")
    try:
        config = store(key, candidates, candidates[best], times)
    except OSError as exc:  # read-only cache dir: keep the winner for this process only
        _warn_once(f"write:{table_path()}", f"could not persist tuning table {table_path()}: {exc}")
        config = candidates[best]
    return _note(key, "benchmark", config, times_ms=times)


def _note(key: TuneKey, source: str, config: Optional[dict], **extra) -> Optional[dict]:
    _DECISIONS[str(key)] = {"source": source, "config": config, **extra}
    _log.debug("tuning %s: %s %s", key, source, config)
    return config


def decisions() -> dict:
    """The last cold-path decision of this process per key: source 'table' | 'benchmark' | 'none' (the
    default config was used; `reason` says why no benchmark ran), the config, the times measured."""
    return {k: dict(v) for k, v in _DECISIONS.items()}


def kernel_config(module, kernel: Optional[str], head_dim: int, dtype: torch.dtype, n, probe: torch.Tensor,
                  run: Callable[[dict], None], *, bench_fn: Optional[Callable] = None) -> tuple[dict, dict]:
    """`forward_config` for one named kernel of a module with several (e.g. "dq_kernel"): each kernel
    gets its own table key (`<variant>:<kernel>`), candidates from the module's shared CONFIGS."""
    n = n if type(n) is int else _concrete(n)
    if n is not None:
        hit = _MEMO.get((module, kernel, head_dim, dtype, n_bucket(n), probe.device))
        if hit is not None:
            return hit
    return _resolve(module, kernel, head_dim, dtype, n, probe, run, bench_fn)


def _resolve(module, kernel, head_dim, dtype, n, probe, run, bench_fn) -> tuple[dict, dict]:
    """The cold path of `kernel_config`: table, else benchmark, else the default."""
    block_d, dtype_bytes = padded_head_dim(head_dim), torch.finfo(dtype).bits // 8
    if not tuning_enabled() or n is None:
        return _default_split(module, block_d, dtype_bytes)
    memo_key = (module, kernel, head_dim, dtype, n_bucket(n), probe.device)
    candidates = fitting_configs(module.CONFIGS, block_d, dtype_bytes)
    if len(candidates) <= 1:  # nothing to choose
        _MEMO[memo_key] = _default_split(module, block_d, dtype_bytes)
        return _MEMO[memo_key]
    with _MEMO_LOCK:  # one benchmark per key in this process
        hit = _MEMO.get(memo_key)
        if hit is not None:
            return hit
        variant = variant_name(module) + (f":{kernel}" if kernel else "")
        key = make_key(variant, head_dim, dtype, n, probe.device)
        reason = benchmark_blocker(probe)
        config = choose(key, candidates, run, may_bench=reason is None, bench_fn=bench_fn, probe=probe)
        if config is None:
            if reason is None:  # every candidate failed (e.g. out of memory): default, for this process
                _MEMO[memo_key] = _default_split(module, block_d, dtype_bytes)
                return _MEMO[memo_key]
            _DECISIONS[str(key)]["reason"] = reason  # no table entry, no benchmark: default, not memoized
            return _default_split(module, block_d, dtype_bytes)
        _MEMO[memo_key] = split(config)
        return _MEMO[memo_key]


def reset() -> None:
    """Forget in-process decisions (tests; the table on disk stays)."""
    _MEMO.clear()
    _TABLE_CACHE.clear()
    _WARNED.clear()
    _DECISIONS.clear()
