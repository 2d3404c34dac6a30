"""Find the source of a variant and import it, rendering on demand.

Lookup order: shipped `generated/` (when rendered from the current templates) -> user cache
(`$NSA_CODEGEN_CACHE`, default `~/.cache/nsa_codegen/<version>`) -> render into the user cache.
The render follows check -> lock -> check again -> render -> atomic rename, so concurrent processes
asking for the same new variant all succeed with one render. `meta.json` keys an entry on generator
version + template hash, so a stale file is never imported. Imported modules are cached in-process.
Compiled binaries live in Triton's own cache (TRITON_CACHE_DIR), not here.
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import sys
import types
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from . import render as _render
from .spec import GENERATOR_VERSION, VariantSpec


def cache_dir() -> Path:
    root = os.environ.get("NSA_CODEGEN_CACHE")
    if root:
        return Path(root).expanduser()
    return Path("~/.cache/nsa_codegen").expanduser() / GENERATOR_VERSION


def _expected_meta(spec: VariantSpec) -> dict:
    return {
        "name": spec.name,
        "spec": spec.as_dict(),
        "generator_version": GENERATOR_VERSION,
        "template_sha256": _render.template_sha256(spec.template),
    }


def _entry_dir(spec: VariantSpec) -> Path:
    return cache_dir() / f"{spec.name}-{spec.key}"


def _is_fresh(entry: Path, spec: VariantSpec) -> bool:
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta == _expected_meta(spec) and (entry / "kernel.py").is_file()


@contextmanager
def file_lock(path: Path):
    """Exclusive inter-process lock on `path` (created if missing) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _render_into_cache(spec: VariantSpec) -> Path:
    entry = _entry_dir(spec)
    if _is_fresh(entry, spec):
        return entry / "kernel.py"
    with file_lock(cache_dir() / f".{spec.name}-{spec.key}.lock"):
        if _is_fresh(entry, spec):  # another process rendered it while we waited
            return entry / "kernel.py"
        entry.mkdir(parents=True, exist_ok=True)
        (entry / "meta.json").unlink(missing_ok=True)  # invalidate before replacing the source
        _render.write_if_changed(entry / "kernel.py", _render.render(spec))
        _render.write_if_changed(entry / "meta.json", json.dumps(_expected_meta(spec), indent=1))
        with open(cache_dir() / "renders.log", "a") as log:  # one line per render, for tests/cli
            log.write(f"{spec.name} pid={os.getpid()}\n")
    return entry / "kernel.py"


def shipped_path(spec: VariantSpec) -> Path | None:
    """The committed generated/ file, if it exists and was rendered from the current templates."""
    path = _render.generated_path(spec, _render.GENERATED_DIR)
    if path.is_file() and _render.read_header_sha(path) == _render.template_sha256(spec.template):
        return path
    return None


def source_path(spec: VariantSpec) -> Path:
    return shipped_path(spec) or _render_into_cache(spec)


def _import_file(module_name: str, path: Path) -> types.ModuleType:
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # triton's JIT resolves globals through the module
    module_spec.loader.exec_module(module)
    return module


@cache
def load_variant(spec: VariantSpec) -> types.ModuleType:
    """Import the generated module of `spec` (cached in-process)."""
    return _import_file(f"nsa_codegen._variants.{spec.name}", source_path(spec))


def clear() -> int:
    """Delete rendered entries of the user cache; returns how many were removed."""
    import shutil

    removed = 0
    root = cache_dir()
    if root.is_dir():
        for entry in root.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)
                removed += 1
    return removed
