"""The user render cache (nsa_codegen/codegen/cache.py): integrity of entries and shipped files, the
fallback for an unwritable cache dir, and `clear` racing concurrent loads.

Every test points NSA_CODEGEN_CACHE at its own tmp_path and uses variants outside the shipped grid, so
the user cache is exercised; rendering needs no GPU and the rendered modules import under the
interpreter (TRITON_INTERPRET=1) on the CPU.
"""
from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest

from nsa_codegen import cli
from nsa_codegen.codegen import cache
from nsa_codegen.codegen import render
from nsa_codegen.codegen.spec import VariantSpec

ROOT = Path(__file__).resolve().parent.parent
FWD = VariantSpec("select_fwd", 20, 4, True)  # l' = 20 is outside the shipped grid
BWD = VariantSpec("select_bwd", 20, 4, True)

# `clear` against concurrent loads runs this long; the reported failures needed about a minute of racing
# to show every symptom, so run `NSA_CODEGEN_RACE_SECONDS=60 pytest tests/test_cache.py -k race` before
# changing the locking. CI keeps it short.
RACE_SECONDS = float(os.environ.get("NSA_CODEGEN_RACE_SECONDS", "8"))


@pytest.fixture(autouse=True)
def user_cache(monkeypatch, tmp_path):
    root = tmp_path / "cache"
    monkeypatch.setenv("NSA_CODEGEN_CACHE", str(root))
    cache.load_variant.cache_clear()  # a variant imported by an earlier test must be looked up again
    yield root
    cache.load_variant.cache_clear()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _assert_complete(module, spec):
    assert module.CONFIGS and module.FAMILY == spec.family


# ----------------------------------------------------------------------------------------------------
# integrity of cached and shipped sources


@pytest.mark.parametrize("damage", ["half", "empty"])
def test_truncated_cache_entry_is_rerendered_not_imported(user_cache, damage):
    path = cache.source_path(FWD)
    text = render.render(FWD)
    meta = json.loads((path.parent / "meta.json").read_text())
    assert meta["source_sha256"] == _sha(path.read_bytes()) == _sha(text.encode())
    path.write_text(text[: len(text) // 2] if damage == "half" else "")  # meta.json still says fresh
    module = cache.load_variant(FWD)
    _assert_complete(module, FWD)
    assert path.read_text() == text
    assert len((user_cache / "renders.log").read_text().splitlines()) == 2


def test_source_is_verified_before_every_import(user_cache):
    """A file damaged after a process verified it once is not imported by the next load."""
    _assert_complete(cache.load_variant(FWD), FWD)
    path = cache.source_path(FWD)
    path.write_text("CONFIGS = []\nFAMILY = 'edited'\n")
    cache.load_variant.cache_clear()
    _assert_complete(cache.load_variant(FWD), FWD)


def _fake_shipped(monkeypatch, tmp_path, spec, text, manifest_sha):
    fake_root = tmp_path / "generated"
    path = render.generated_path(spec, fake_root)
    path.parent.mkdir(parents=True)
    path.write_text(text)
    entry = {"name": spec.name, "file": str(path.relative_to(fake_root)), "source_sha256": manifest_sha}
    (fake_root / "manifest.json").write_text(json.dumps({"variants": [entry]}))
    monkeypatch.setattr(render, "GENERATED_DIR", fake_root)
    return path


def test_shipped_file_failing_its_manifest_hash_is_not_used(monkeypatch, tmp_path, user_cache):
    text = render.render(FWD)
    fake = _fake_shipped(monkeypatch, tmp_path, FWD, text[: len(text) // 2], _sha(text.encode()))
    assert render.read_header_sha(fake) == render.template_sha256(FWD.template)  # the header alone passes
    with pytest.warns(RuntimeWarning, match="does not match generated/manifest.json"):
        assert cache.shipped_path(FWD) is None
    module = cache.load_variant(FWD)  # warned once per file and process
    _assert_complete(module, FWD)
    assert Path(module.__file__).is_relative_to(user_cache)
    fake.write_text(text)  # the intact file is accepted
    assert cache.shipped_path(FWD) == fake


# ----------------------------------------------------------------------------------------------------
# an unwritable cache dir


def _deny_writes_below(monkeypatch, root: Path):
    """Make `root` read-only. chmod does not stop root (uid 0) from writing, so there every write
    below `root` through os/io is refused the way the kernel would refuse it for another user."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o555)
    if os.geteuid() != 0:
        return
    top = os.path.realpath(root)

    def below(path, dir_fd=None) -> bool:
        if isinstance(path, int):
            return False
        path = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(path):
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        path = os.path.realpath(path)
        return path == top or path.startswith(top + os.sep)

    def refuse(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))

    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    real_os_open, real_open, real_io_open = os.open, builtins.open, io.open

    def os_open(path, flags, *args, dir_fd=None, **kwargs):
        if flags & writing and below(path, dir_fd):
            refuse(path)
        return real_os_open(path, flags, *args, dir_fd=dir_fd, **kwargs)

    def wrap_open(real):
        def opener(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+") and below(file):
                refuse(file)
            return real(file, mode, *args, **kwargs)
        return opener

    def wrap_path_op(real):
        def op(path, *args, dir_fd=None, **kwargs):
            if below(path, dir_fd):
                refuse(path)
            return real(path, *args, dir_fd=dir_fd, **kwargs) if dir_fd is not None else real(path, *args, **kwargs)
        return op

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", wrap_open(real_open))
    monkeypatch.setattr(io, "open", wrap_open(real_io_open))
    for name in ("mkdir", "unlink", "remove", "rmdir"):
        monkeypatch.setattr(os, name, wrap_path_op(getattr(os, name)))
    for name in ("replace", "rename"):
        real = getattr(os, name)

        def two_paths(src, dst, *args, _real=real, **kwargs):
            if below(src) or below(dst):
                refuse(dst)
            return _real(src, dst, *args, **kwargs)
        monkeypatch.setattr(os, name, two_paths)


@pytest.fixture
def restore_mode(user_cache):
    yield
    if user_cache.is_dir():
        user_cache.chmod(0o755)  # let pytest remove tmp_path


@pytest.mark.parametrize("how", ["read_only_dir", "below_a_file"])
def test_unwritable_cache_dir_falls_back_to_a_private_temp_dir(monkeypatch, tmp_path, user_cache, restore_mode, how):
    if how == "read_only_dir":
        root = user_cache
        _deny_writes_below(monkeypatch, root)
    else:
        (tmp_path / "a-file").write_text("not a directory")
        root = tmp_path / "a-file" / "cache"
        monkeypatch.setenv("NSA_CODEGEN_CACHE", str(root))
    before = sorted(os.listdir(root)) if root.is_dir() else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        modules = [cache.load_variant(FWD), cache.load_variant(BWD)]
        paths = [cache.source_path(FWD), cache.source_path(BWD)]
    for module, spec in zip(modules, (FWD, BWD)):
        _assert_complete(module, spec)
    messages = [str(w.message) for w in caught if "NSA_CODEGEN_CACHE" in str(w.message)]
    assert len(messages) == 1 and str(root) in messages[0], [str(w.message) for w in caught]
    private = paths[0].parent.parent
    assert paths[1].parent.parent == private  # one private dir per process
    assert private.is_relative_to(tempfile.gettempdir()) and not private.is_relative_to(root)
    assert (sorted(os.listdir(root)) if root.is_dir() else None) == before


def test_read_only_cache_with_the_entry_is_used_without_fallback(monkeypatch, user_cache, restore_mode):
    """A pre-populated shared cache that this user cannot write still serves its verified entries."""
    path = cache.source_path(FWD)
    cache.load_variant.cache_clear()
    _deny_writes_below(monkeypatch, user_cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = cache.load_variant(FWD)
    _assert_complete(module, FWD)
    assert Path(module.__file__) == path


# ----------------------------------------------------------------------------------------------------
# clear, odd entries, and loads racing a clear


def test_clear_removes_entries_locks_and_log(user_cache, capsys):
    cache.source_path(FWD)
    cache.source_path(BWD)
    (user_cache / "tuning.json").write_text("{}")  # not the render cache's: left alone
    assert cli.main(["cache", "clear"]) == 0
    assert f"removed 2 entries from {user_cache}" in capsys.readouterr().out
    assert sorted(os.listdir(user_cache)) == ["tuning.json"]
    cache.load_variant.cache_clear()
    _assert_complete(cache.load_variant(FWD), FWD)  # and the cache works afterwards


def test_clear_of_an_unwritable_cache_says_so(monkeypatch, user_cache, restore_mode, capsys):
    cache.source_path(FWD)
    _deny_writes_below(monkeypatch, user_cache)
    with pytest.raises(cache.CacheError, match=str(user_cache)):
        cache.clear()
    assert cli.main(["cache", "clear"]) == 1
    assert str(user_cache) in capsys.readouterr().err


def test_entry_path_that_is_a_file_is_replaced(user_cache):
    entry = user_cache / f"{FWD.name}-{FWD.key}"
    user_cache.mkdir(parents=True)
    entry.write_text("left behind")
    _assert_complete(cache.load_variant(FWD), FWD)
    assert entry.is_dir() and (entry / "kernel.py").read_text() == render.render(FWD)


def test_load_that_keeps_losing_its_entry_names_variant_and_dir(monkeypatch, user_cache):
    """A write that fails as if `clear` removed the entry under it is retried once, then reported."""
    real_replace, calls = os.replace, []

    def vanishing(src, dst, *args, **kwargs):
        if Path(dst).is_relative_to(user_cache):
            calls.append(dst)
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), os.fsdecode(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", vanishing)
    with pytest.raises(cache.CacheError) as info:
        cache.load_variant(FWD)
    assert FWD.name in str(info.value) and str(user_cache) in str(info.value)
    assert len(calls) == 2


_RACER = textwrap.dedent(
    """
    import inspect, json, sys, time
    from nsa_codegen.codegen import cache
    from nsa_codegen.codegen.spec import VariantSpec
    role, seconds, start_at = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    specs = [VariantSpec("select_fwd", 20, 4, True), VariantSpec("select_bwd", 20, 4, True)]
    done, errors = 0, []
    time.sleep(max(0.0, start_at - time.time()))
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if role == "clear":
                cache.clear()
                time.sleep(0.005)
            else:
                spec = specs[done % 2]
                cache.load_variant.cache_clear()
                module = cache.load_variant(spec)
                assert module.CONFIGS and module.FAMILY == spec.family, "incomplete module"
                for obj in vars(module).values():  # every kernel's source must be retrievable
                    if hasattr(obj, "fn") and hasattr(obj, "__call__") and inspect.isfunction(obj.fn):
                        inspect.getsourcelines(obj.fn)
            done += 1
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    print(json.dumps({"role": role, "done": done, "errors": errors}))
    """
)


@pytest.mark.slow
def test_clear_racing_loads_in_other_processes(user_cache):
    env = dict(os.environ, NSA_CODEGEN_CACHE=str(user_cache), PYTHONPATH=str(ROOT), TRITON_INTERPRET="1",
               OMP_NUM_THREADS="1")
    start_at = str(time.time() + 5.0)  # after every process has imported torch and triton
    procs = [
        subprocess.Popen([sys.executable, "-c", _RACER, role, str(RACE_SECONDS), start_at], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for role in ("load", "load", "clear")
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=RACE_SECONDS + 120)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    summary = {(r["role"], i): (r["done"], len(r["errors"])) for i, r in enumerate(results)}
    print("race", RACE_SECONDS, "s:", summary)
    errors = [e for r in results for e in r["errors"]]
    by_type = Counter(e.split(":", 1)[0] for e in errors)
    examples = sorted({e[:200] for e in errors})[:10]
    assert not errors, f"{len(errors)} errors {dict(by_type)}; {summary}; e.g. {examples}"
    assert all(r["done"] > 0 for r in results), summary
