"""Find the source of a variant and import it, rendering on demand.

Lookup order: shipped `generated/` (when rendered from the current templates) -> user cache
(`$NSA_CODEGEN_CACHE`, default `~/.cache/nsa_codegen/<version>`) -> render into the user cache.
Imported modules are cached in-process. Compiled binaries live in Triton's own cache
(TRITON_CACHE_DIR), not here.

Integrity. An entry is `<name>-<key>/kernel.py` plus `meta.json`; the meta keys the entry on generator
version + template hash and records the sha256 of kernel.py. A source is read once, its bytes checked
against that hash (shipped files: against `source_sha256` in generated/manifest.json when the manifest
has it), and the module is executed from exactly those checked bytes: a truncated, edited or
half-replaced file is re-rendered, never imported, and a file removed or replaced after the check
cannot change what runs (the checked text is also what `inspect`, and so Triton's JIT, sees).

Locking. Every render holds the cache-wide lock shared plus the entry's lock exclusively: check ->
lock -> check again -> render -> atomic renames, so concurrent processes asking for the same new
variant all succeed with one render. `clear` holds the cache-wide lock exclusively, so it never
removes an entry under a render and no render starts while it runs. Reading a verified entry takes no
lock (a read-only shared cache serves its entries); a read that loses its entry to a concurrent `clear`
falls through to a render under the locks. Lock files are removed by `clear` while it holds them; a
process that waited on a removed lock file notices (the path no longer names the file it locked) and
locks the new one.

Unwritable cache. If the cache dir cannot be written (read-only, another user's, below a regular file),
this process renders into a private temporary dir instead and warns once, naming NSA_CODEGEN_CACHE.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import linecache
import logging
import os
import re
import secrets
import shutil
import sys
import tempfile
import types
import warnings
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from ..kernels import progress
from . import render as _render
from .spec import GENERATOR_VERSION, VariantSpec

_log = logging.getLogger(__name__)

CACHE_LOCK = ".cache.lock"  # cache-wide: shared by renders, exclusive for `clear`
RENDERS_LOG = "renders.log"  # one line per render (tests, the cli)
_ENTRY_RE = re.compile(r"^[a-z][a-z0-9_]*-[0-9a-f]{16}$")  # <spec.name>-<spec.key>
_ENTRY_LOCK_RE = re.compile(r"^\.[a-z][a-z0-9_]*-[0-9a-f]{16}\.lock$")
# errors that mean "this process may not write here" (as opposed to a race or a full disk)
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST}


class CacheError(RuntimeError):
    """The user render cache could not provide a variant, or could not be cleared."""


def cache_dir() -> Path:
    """The configured cache dir (see the module doc for what happens when it cannot be written)."""
    root = os.environ.get("NSA_CODEGEN_CACHE")
    if root:
        return Path(root).expanduser()
    return Path("~/.cache/nsa_codegen").expanduser() / GENERATOR_VERSION


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _expected_meta(spec: VariantSpec) -> dict:
    return {
        "name": spec.name,
        "spec": spec.as_dict(),
        "generator_version": GENERATOR_VERSION,
        "template_sha256": _render.template_sha256(spec.template),
    }


def _entry_name(spec: VariantSpec) -> str:
    return f"{spec.name}-{spec.key}"


def _entry_dir(spec: VariantSpec) -> Path:
    return cache_dir() / _entry_name(spec)


# ----------------------------------------------------------------------------------------------------
# locks and writes


@contextmanager
def file_lock(path: Path, shared: bool = False):
    """Inter-process lock on `path` (created if missing) for the duration of the block; exclusive
    unless `shared`. Safe against the lock file being removed (by `clear`) while others wait on it."""
    path = Path(path)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                now = os.stat(path)
                current = (now.st_ino, now.st_dev) == (held.st_ino, held.st_dev)
            except FileNotFoundError:
                current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            break
        os.close(fd)  # we locked a file that was removed meanwhile: lock the one at `path` now
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same dir and a rename (readers see the
    old file or the new one, never a part). Mode 0o666 less the umask, like any created file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ----------------------------------------------------------------------------------------------------
# the user cache


def _read_verified(entry: Path, spec: VariantSpec, report: bool = False) -> tuple[Path, str] | None:
    """(path, text) of the entry's kernel.py if meta.json is current and records the hash of exactly
    these bytes; None if missing, stale or damaged (logged if `report`: checked under the lock, a
    mismatch is damage, not a render in flight). Takes no lock."""
    try:
        meta = json.loads((entry / "meta.json").read_bytes())
        data = (entry / "kernel.py").read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    recorded = meta.pop("source_sha256", None)
    if meta != _expected_meta(spec) or recorded is None:
        return None
    if recorded != _sha256(data):
        if report:
            _log.warning("%s does not match the hash in its meta.json (truncated or edited): rendering it again",
                         entry / "kernel.py")
        return None
    try:
        return entry / "kernel.py", data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _make_entry_dir(entry: Path) -> None:
    """Create the entry dir; something else at its path (a file or dangling link with our entry
    name, left by a crash or by hand) is ours to replace."""
    if not entry.is_dir() and (entry.exists() or entry.is_symlink()):
        _log.warning("replacing %s (not a directory) with a cache entry", entry)
        try:
            entry.unlink()
        except OSError as exc:
            raise CacheError(f"cache entry path {entry} is not a directory and cannot be removed: {exc}") from exc
    entry.mkdir(parents=True, exist_ok=True)


def _render_locked(root: Path, spec: VariantSpec) -> tuple[Path, str]:
    entry = root / _entry_name(spec)
    with file_lock(root / CACHE_LOCK, shared=True), file_lock(root / f".{entry.name}.lock"):
        found = _read_verified(entry, spec, report=True)
        if found is not None:  # another process rendered it while we waited
            return found
        text = _render.render(spec)
        data = text.encode("utf-8")
        _make_entry_dir(entry)
        (entry / "meta.json").unlink(missing_ok=True)  # invalidate before replacing the source
        _atomic_write(entry / "kernel.py", data)
        meta = dict(_expected_meta(spec), source_sha256=_sha256(data))
        _atomic_write(entry / "meta.json", json.dumps(meta, indent=1).encode())
        with open(root / RENDERS_LOG, "a") as log:
            log.write(f"{spec.name} pid={os.getpid()}\n")
    return entry / "kernel.py", text


_private: dict[Path, Path] = {}  # configured cache dir -> this process's temporary stand-in
_private_pid = os.getpid()


def _private_dir(root: Path, reason: OSError) -> Path:
    """The temporary dir this process renders into instead of the unwritable `root` (made, and
    warned about, once per process)."""
    global _private_pid
    if _private_pid != os.getpid():  # a forked child makes its own
        _private.clear()
        _private_pid = os.getpid()
    if root not in _private:
        tmp = Path(tempfile.mkdtemp(prefix="nsa_codegen_cache_"))
        owner = os.getpid()
        atexit.register(lambda: os.getpid() == owner and shutil.rmtree(tmp, ignore_errors=True))
        _private[root] = tmp
        warnings.warn(
            f"nsa_codegen: the kernel cache {root} cannot be written ({reason.strerror or reason}); "
            f"rendering kernels into {tmp} for this process only. Set NSA_CODEGEN_CACHE to a writable "
            f"directory to keep them between runs.",
            RuntimeWarning,
            stacklevel=4,
        )
    return _private[root]


def _cached_source(spec: VariantSpec) -> tuple[Path, str]:
    root = cache_dir()
    last: OSError | None = None
    for _ in range(2):  # once more if a concurrent `clear` (or anything else) made the first try fail
        found = _read_verified(root / _entry_name(spec), spec)
        if found is not None:
            return found
        target = _private.get(root) if _private_pid == os.getpid() else None
        if target is not None:
            found = _read_verified(target / _entry_name(spec), spec)
            if found is not None:
                return found
        try:
            try:
                return _render_locked(target or root, spec)
            except OSError as exc:
                if target is not None or exc.errno not in _DENIED:
                    raise
                target = _private_dir(root, exc)
            return _render_locked(target, spec)
        except OSError as exc:
            last = exc
    raise CacheError(f"could not load variant {spec.name} from the kernel cache {target or root} "
                     f"(NSA_CODEGEN_CACHE): {last}") from last


# ----------------------------------------------------------------------------------------------------
# shipped files


_manifest_memo: dict[Path, tuple[tuple, dict]] = {}
_damaged_shipped: set[Path] = set()  # warned about once per process


def _manifest_hashes(root: Path) -> dict[str, str]:
    """file (relative to generated/) -> source_sha256 from generated/manifest.json; {} when the manifest
    is missing or records no hashes (then shipped files are trusted on their header alone)."""
    path = root / "manifest.json"
    try:
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        hit = _manifest_memo.get(path)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        variants = json.loads(path.read_bytes()).get("variants", [])
        hashes = {v["file"]: v["source_sha256"] for v in variants if isinstance(v, dict) and "source_sha256" in v}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return {}
    _manifest_memo[path] = (stamp, hashes)
    return hashes


def _shipped_source(spec: VariantSpec) -> tuple[Path, str] | None:
    root = _render.GENERATED_DIR
    path = _render.generated_path(spec, root)
    if _render.read_header_sha(path) != _render.template_sha256(spec.template):
        return None  # absent, or rendered from other templates
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    expected = _manifest_hashes(root).get(str(path.relative_to(root)))
    if expected is not None and expected != _sha256(data):
        if path in _damaged_shipped:
            return None
        _damaged_shipped.add(path)
        warnings.warn(f"nsa_codegen: shipped kernel {path} does not match generated/manifest.json (damaged "
                      f"install?); rendering {spec.name} into the user cache instead", RuntimeWarning, stacklevel=3)
        return None
    return path, text


def shipped_path(spec: VariantSpec) -> Path | None:
    """The committed generated/ file, if it exists, was rendered from the current templates and
    matches the manifest's hash (when recorded)."""
    found = _shipped_source(spec)
    return found[0] if found else None


def source_path(spec: VariantSpec) -> Path:
    return (_shipped_source(spec) or _cached_source(spec))[0]


# ----------------------------------------------------------------------------------------------------
# import


class _VerifiedSourceLoader(importlib.abc.InspectLoader):
    """Executes the checked text, never re-reading the file (and writing no bytecode next to it)."""

    def __init__(self, path: Path, text: str):
        self.path, self.text = str(path), text

    def get_filename(self, fullname: str) -> str:
        return self.path

    def get_source(self, fullname: str) -> str:
        return self.text

    def get_code(self, fullname: str):
        return compile(self.text, self.path, "exec", dont_inherit=True)

    def is_package(self, fullname: str) -> bool:
        return False


def _import_text(module_name: str, path: Path, text: str) -> types.ModuleType:
    loader = _VerifiedSourceLoader(path, text)
    module_spec = importlib.machinery.ModuleSpec(module_name, loader, origin=str(path))
    module_spec.has_location = True  # sets __file__: Triton and tracebacks name the file
    module = importlib.util.module_from_spec(module_spec)
    # `inspect.getsource` (Triton's JIT reads each kernel's source through it) serves these lines
    # instead of the file on disk; mtime None keeps linecache.checkcache from dropping them.
    linecache.cache[str(path)] = (len(text), None, text.splitlines(keepends=True), str(path))
    sys.modules[module_name] = module  # triton's JIT resolves globals through the module
    try:
        loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


@cache
def load_variant(spec: VariantSpec) -> types.ModuleType:
    """Import the generated module of `spec` (cached in-process)."""
    progress.install()  # a cold first call says on stderr that it is compiling
    path, text = _shipped_source(spec) or _cached_source(spec)
    return _import_text(f"nsa_codegen._variants.{spec.name}", path, text)


# ----------------------------------------------------------------------------------------------------
# clear


def clear() -> int:
    """Delete everything the render cache keeps in the user cache dir (entries, their lock files,
    renders.log, the cache-wide lock); returns how many entries were removed. Other files there (the
    tuning table) are left alone. Waits for renders in progress; loads racing it re-render."""
    root = cache_dir()
    if not root.is_dir():
        return 0
    removed = 0
    try:
        with file_lock(root / CACHE_LOCK):
            for item in sorted(root.iterdir()):
                name = item.name
                if _ENTRY_RE.match(name):
                    if item.is_dir() and not item.is_symlink():
                        shutil.rmtree(item)
                    else:
                        item.unlink()
                    removed += 1
                elif _ENTRY_LOCK_RE.match(name) or name == RENDERS_LOG:
                    item.unlink(missing_ok=True)
            # removed while held: a process waiting on it notices and locks a fresh file
            (root / CACHE_LOCK).unlink(missing_ok=True)
    except OSError as exc:
        raise CacheError(f"could not clear the kernel cache {root} (NSA_CODEGEN_CACHE): {exc}") from exc
    return removed
