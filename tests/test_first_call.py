"""The first call on a cold cache (nsa_codegen/kernels/progress.py, tuning's shipped table and parallel
candidate compiles, `python -m nsa_codegen tune`), on CPU: the Triton hooks are called as Triton calls
them, the table files live in a temporary directory, the GPU benchmark is a fake timer."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nsa_codegen.kernels import progress, tuning
from nsa_codegen.tune import merge_into_shipped

C = [
    {"BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "max_d16": 256, "max_d32": 128},
    {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "max_d16": 256, "max_d32": 128},
]
KEY = tuning.TuneKey("select_fwd_bs64_g16_causal", 128, "bfloat16", 8192, "NVIDIA H100 80GB HBM3", "3.6.0")


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("NSA_CODEGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tuning, "shipped_table_path", lambda: tmp_path / "shipped.json")
    for var in ("NSA_CODEGEN_TUNE", "NSA_CODEGEN_SHIPPED_TUNING", "NSA_CODEGEN_COMPILE_THREADS",
                "NSA_CODEGEN_NOTICE_S"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(progress, "_said", set())
    tuning.reset()
    yield
    tuning.reset()


def write_shipped(tmp_path, key, config, candidates=C):
    entry = {"config": config, "candidates_sha": tuning.candidates_digest(candidates)}
    (tmp_path / "shipped.json").write_text(json.dumps({"format": 1, "entries": {tuning.shipped_key(key): entry}}))


# ----------------------------------------------------------------------------------------------------
# shipped table


def test_shipped_table_is_used_when_the_user_table_has_no_entry(tmp_path):
    write_shipped(tmp_path, KEY, C[1])
    never = lambda fn: pytest.fail("benchmarked although the shipped table has the key")  # noqa: E731
    assert tuning.choose(KEY, C, lambda c: None, may_bench=True, bench_fn=never) == C[1]
    assert tuning.decisions()[str(KEY)]["source"] == "shipped"


def test_shipped_entry_matches_any_triton_version_but_not_another_gpu(tmp_path):
    write_shipped(tmp_path, KEY, C[1])
    assert tuning.lookup_shipped(dataclasses.replace(KEY, triton="3.7.0"), C) == C[1]
    other_gpu = dataclasses.replace(KEY, gpu="NVIDIA A100")
    assert tuning.lookup_shipped(other_gpu, C) is None


def test_shipped_entry_for_other_candidates_is_stale(tmp_path):
    write_shipped(tmp_path, KEY, C[1], candidates=C[1:])  # measured against another candidate list
    assert tuning.lookup_shipped(KEY, C) is None


def test_user_table_wins_over_the_shipped_one(tmp_path):
    write_shipped(tmp_path, KEY, C[1])
    tuning.store(KEY, C, C[0], [1.0, 2.0])
    assert tuning.choose(KEY, C, lambda c: None, may_bench=False) == C[0]
    assert tuning.decisions()[str(KEY)]["source"] == "table"


def test_shipped_table_can_be_switched_off(tmp_path, monkeypatch):
    write_shipped(tmp_path, KEY, C[1])
    monkeypatch.setenv("NSA_CODEGEN_SHIPPED_TUNING", "0")
    assert tuning.choose(KEY, C, lambda c: None, may_bench=False) is None


def test_merge_into_shipped_keeps_only_that_gpus_entries(tmp_path):
    other = dataclasses.replace(KEY, gpu="NVIDIA H200")
    tuning.store(KEY, C, C[1], [2.0, 1.0])
    tuning.store(other, C, C[0], [1.0, 2.0])
    assert merge_into_shipped(tuning.load_table(), KEY.gpu) == 1
    entries = json.loads((tmp_path / "shipped.json").read_text())["entries"]
    assert list(entries) == [tuning.shipped_key(KEY)]
    assert tuning.lookup_shipped(KEY, C) == C[1]


def test_the_package_ships_a_readable_table():
    data = json.loads(Path(tuning.__file__).with_name(tuning.SHIPPED_NAME).read_text())
    assert data["format"] == tuning.TABLE_FORMAT
    for key, entry in data["entries"].items():
        assert key.count("|") == 4 and "triton" not in key, key
        assert set(entry) >= {"config", "candidates_sha"}


# ----------------------------------------------------------------------------------------------------
# parallel candidate compiles


def test_precompile_launches_every_candidate_once_on_worker_threads():
    seen, lock = [], threading.Lock()

    def run(config):
        time.sleep(0.05)  # long enough that one thread could not take them all
        with lock:
            seen.append((config["BLOCK_N"], threading.current_thread().name))
        if config is C[0]:
            raise RuntimeError("out of resources")  # a failing candidate is left to the timing loop

    tuning.precompile(C, run)
    assert sorted(b for b, _ in seen) == [32, 64]
    assert all(name.startswith("nsa-compile") for _, name in seen)


def test_precompile_with_one_thread_does_nothing(monkeypatch):
    monkeypatch.setenv("NSA_CODEGEN_COMPILE_THREADS", "1")
    tuning.precompile(C, lambda c: pytest.fail("launched with one compile thread"))


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_bad_compile_thread_count_is_named(monkeypatch, value):
    monkeypatch.setenv("NSA_CODEGEN_COMPILE_THREADS", value)
    with pytest.raises(ValueError, match="NSA_CODEGEN_COMPILE_THREADS"):
        tuning.compile_threads()


def test_benchmark_announces_itself_on_stderr(capsys):
    timer = lambda fn: (fn(), 1.0)[1]  # noqa: E731
    tuning.choose(KEY, C, lambda c: None, may_bench=True, bench_fn=timer)
    err = capsys.readouterr().err
    assert "tuning select_fwd_bs64_g16_causal" in err and "2 tile configs" in err


# ----------------------------------------------------------------------------------------------------
# compile notice (Triton's JIT hooks, called here as Triton calls them)


class FnInfo:
    def __init__(self, module):
        self.module, self.name = module, "kernel"


def compile_for(seconds: float, module="nsa_codegen._variants.select_fwd_bs64_g16_causal"):
    progress._compile_started(fn=FnInfo(module))
    time.sleep(seconds)
    progress._compile_finished(fn=FnInfo(module))


def test_a_slow_compile_of_ours_prints_one_notice(monkeypatch, capsys):
    monkeypatch.setenv("NSA_CODEGEN_NOTICE_S", "0.05")
    compile_for(0.3)
    compile_for(0.3)
    err = capsys.readouterr().err
    assert err.count("compiling Triton kernels") == 1


def test_fast_loads_and_other_libraries_kernels_print_nothing(monkeypatch, capsys):
    monkeypatch.setenv("NSA_CODEGEN_NOTICE_S", "0.2")
    compile_for(0.0)  # a load from Triton's disk cache
    compile_for(0.4, module="someone_else.kernels")
    time.sleep(0.3)
    assert capsys.readouterr().err == ""


def test_notices_can_be_switched_off(monkeypatch, capsys):
    monkeypatch.setenv("NSA_CODEGEN_NOTICE_S", "off")
    compile_for(0.1)
    progress.say("tuning something")
    assert capsys.readouterr().err == ""


def test_bad_notice_delay_is_named(monkeypatch):
    monkeypatch.setenv("NSA_CODEGEN_NOTICE_S", "soon")
    with pytest.raises(ValueError, match="NSA_CODEGEN_NOTICE_S"):
        progress.notice_delay()


def test_hooks_chain_with_one_already_installed():
    calls = []

    def theirs(**kwargs):
        calls.append(kwargs["fn"].module)
        return True  # e.g. a cache hook that skips the compile: its answer must survive

    hook = progress._chain(progress._compile_started, theirs)
    assert hook(fn=FnInfo("a.b")) is True and calls == ["a.b"]
    assert progress._chain(progress._compile_started, None) is progress._compile_started


def test_install_sets_the_triton_hooks_once():
    knobs = pytest.importorskip("triton").knobs
    before = (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook)
    progress.install()
    progress.install()
    hooks = (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook)
    assert all(h is not None for h in hooks)
    if progress._installed and before[0] is not None:
        assert hooks == before  # installed earlier in this process: not chained twice


# ----------------------------------------------------------------------------------------------------
# the tune command


@pytest.mark.parametrize("args, message", [
    (["--presets", "huge"], "unknown ['huge']"),
    (["--dtypes", "fp8"], "unknown ['fp8']"),
    (["--lengths", "1024,lots"], "comma-separated positive integers"),
])
def test_tune_rejects_bad_arguments_by_name(args, message):
    proc = subprocess.run([sys.executable, "-m", "nsa_codegen", "tune", *args], capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr


def test_tune_without_a_gpu_says_so():
    proc = subprocess.run([sys.executable, "-m", "nsa_codegen", "tune", "--presets", "readme", "--lengths", "64"],
                          capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr
