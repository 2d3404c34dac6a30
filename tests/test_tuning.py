"""Persisted tuning of launch configs (nsa_codegen/kernels/tuning.py), on CPU: the selected-attention forward
and the kernels of the compressed-attention backward, each kernel under its own key.

The benchmark itself needs a GPU; here it is replaced by a fake timer (`bench_fn`, or a monkeypatched
`tuning.default_bench` on the launch path), so the selection, keying, persistence and the never-benchmark
rules run on the CPU. Fake timers record what they see instead of raising: `tuning.benchmark` swallows
a failing candidate, so an assert inside a timer could not fail a test.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import triton

from conftest import interpreter_lane as interp
from nsa_codegen import reference
from nsa_codegen.codegen import cache
from nsa_codegen.codegen.spec import VariantSpec
from nsa_codegen.kernels import _launch, selected, tuning

ROOT = Path(__file__).resolve().parent.parent

C = [  # synthetic candidates, render-time order
    {"BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "max_d16": 256, "max_d32": 128},
    {"BLOCK_N": 32, "num_warps": 8, "num_stages": 1, "max_d16": 256, "max_d32": 256},
    {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "max_d16": 256, "max_d32": 128},
]
REAL_LAUNCH_FWD = selected._launch_fwd  # the tests below spy on it
KEY = tuning.TuneKey("select_fwd_bs32_g4_causal", 128, "bfloat16", 8192, "NVIDIA H200", "3.6.0")


@pytest.fixture(autouse=True)
def fresh_tuning(monkeypatch, tmp_path):
    monkeypatch.setenv("NSA_CODEGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("NSA_CODEGEN_TUNE", raising=False)
    tuning.reset()
    yield
    tuning.reset()


class FakeTimer:
    """bench_fn: runs fn once (as do_bench would) and returns a time per config from `times`."""

    def __init__(self, times_by_index, candidates=C):
        self.times, self.candidates, self.timed = times_by_index, candidates, []

    def __call__(self, fn):
        self.current = None
        fn()  # the run() below records which config it launched
        self.timed.append(self.current)
        return self.times[self.candidates.index(self.current)]

    def run(self, config):
        self.current = config


def read_table() -> dict:
    return json.loads(tuning.table_path().read_text())


# ----------------------------------------------------------------------------------------------------
# key


def test_key_names_variant_head_dim_dtype_n_bucket_gpu_and_triton():
    mod = cache.load_variant(VariantSpec("select_fwd", 64, 16, True))
    key = tuning.make_key(tuning.variant_name(mod), 128, torch.bfloat16, 8000, torch.device("cpu"))
    assert key == tuning.TuneKey("select_fwd_bs64_g16_causal", 128, "bfloat16", 8192, "cpu", triton.__version__)
    assert str(key) == f"select_fwd_bs64_g16_causal|d128|bfloat16|n8192|cpu|triton-{triton.__version__}"
    assert [tuning.n_bucket(n) for n in (1, 2, 3, 8192, 8193, 65536)] == [1, 2, 4, 8192, 16384, 65536]
    same = tuning.make_key("v", 64, torch.float16, 5000, torch.device("cpu"))
    assert same == tuning.make_key("v", 64, torch.float16, 8192, torch.device("cpu"))
    for other in (tuning.make_key("v", 64, torch.float16, 8193, torch.device("cpu")),
                  tuning.make_key("v", 72, torch.float16, 5000, torch.device("cpu")),
                  tuning.make_key("v", 64, torch.bfloat16, 5000, torch.device("cpu")),
                  tuning.make_key("w", 64, torch.float16, 5000, torch.device("cpu"))):
        assert other != same and str(other) != str(same)


def test_untuned_choice_is_the_default_config():
    """Without a table entry and without a benchmark (here: NSA_CODEGEN_TUNE unset but the interpreter /
    CPU blocks it), a tuned kernel gets what `_launch.choose_config` gives an untuned one."""
    mod = cache.load_variant(VariantSpec("select_fwd", 64, 16, True))
    probe = torch.zeros(1, 8192)
    for d, dtype in ((128, torch.bfloat16), (256, torch.bfloat16), (128, torch.float32), (256, torch.float32)):
        want = tuning.split(_launch.default_config(mod.CONFIGS, _launch.padded_head_dim(d), dtype.itemsize))
        assert _launch.choose_config(mod, d, dtype) == want
        assert tuning.kernel_config(mod, None, d, dtype, 8192, probe, lambda c: None) == want
    fit = _launch.fitting_configs(C, 256, 4)  # fp32 at d=256: only max_d32 >= 256
    assert fit == [C[1]] and _launch.default_config(C, 256, 4) == C[1]
    assert tuning.split(C[2]) == ({"BLOCK_N": 64}, {"num_warps": 4, "num_stages": 3})


# ----------------------------------------------------------------------------------------------------
# choose / table


def test_fastest_candidate_is_persisted_and_read_back():
    timer = FakeTimer([3.0, 2.0, 1.0])
    assert tuning.choose(KEY, C, timer.run, may_bench=True, bench_fn=timer) == C[2]
    assert timer.timed == C  # every candidate timed, in order
    table = read_table()
    assert table["format"] == tuning.TABLE_FORMAT and list(table["entries"]) == [str(KEY)]
    entry = table["entries"][str(KEY)]
    assert entry["config"] == C[2] and entry["candidates_sha"] == tuning.candidates_digest(C)
    assert [t["ms"] for t in entry["times_ms"]] == [3.0, 2.0, 1.0]
    assert entry["key"] == {"variant": KEY.variant, "head_dim": 128, "dtype": "bfloat16", "n_bucket": 8192,
                            "gpu": "NVIDIA H200", "triton": "3.6.0"}
    # a fresh process (no in-process state) reads it back without benchmarking
    tuning.reset()
    again = FakeTimer([0.0, 9.0, 9.0])
    assert tuning.choose(KEY, C, again.run, may_bench=True, bench_fn=again) == C[2]
    assert again.timed == []
    assert tuning.lookup(KEY, C) == C[2]
    assert tuning.lookup(dataclasses.replace(KEY, n_bucket=4096), C) is None


def test_ties_keep_render_order_and_failing_candidates_are_skipped():
    tie = FakeTimer([2.0, 1.0, 1.0])
    assert tuning.choose(KEY, C, tie.run, may_bench=True, bench_fn=tie) == C[1]

    def flaky(fn):  # C[1] "fails to compile", C[0] is slower than C[2]
        fn()
        if seen[-1] == C[1]:
            raise RuntimeError("out of resources: shared memory")
        return {0: 5.0, 2: 4.0}[C.index(seen[-1])]

    seen = []
    key = tuning.TuneKey("other", 64, "float16", 1024, "gpu", "t")
    assert tuning.choose(key, C, seen.append, may_bench=True, bench_fn=flaky) == C[2]
    assert seen == C
    assert [t["ms"] for t in read_table()["entries"][str(key)]["times_ms"]] == [5.0, None, 4.0]


def test_every_candidate_failing_persists_nothing_and_falls_back():
    def broken(fn):
        raise RuntimeError("no GPU")

    assert tuning.choose(KEY, C, lambda c: None, may_bench=True, bench_fn=broken) is None
    assert not tuning.table_path().exists()


def test_no_benchmark_allowed_means_table_or_nothing():
    timer = FakeTimer([1.0, 2.0, 3.0])
    assert tuning.choose(KEY, C, timer.run, may_bench=False, bench_fn=timer) is None
    assert timer.timed == [] and not tuning.table_path().exists()
    tuning.store(KEY, C, C[1], [2.0, 1.0, 3.0])
    assert tuning.choose(KEY, C, timer.run, may_bench=False, bench_fn=timer) == C[1]
    assert timer.timed == []


@pytest.mark.parametrize("change", ["config-gone", "candidate-added", "candidate-changed"])
def test_stale_entry_is_ignored_and_replaced(change):
    tuning.store(KEY, C, C[2], [3.0, 2.0, 1.0])
    if change == "config-gone":
        now = C[:2]
    elif change == "candidate-added":
        now = C + [{"BLOCK_N": 128, "num_warps": 8, "num_stages": 1, "max_d16": 256, "max_d32": 128}]
    else:
        now = [C[0], dict(C[1], num_stages=2), C[2]]
    assert tuning.lookup(KEY, now) is None
    timer = FakeTimer([1.0] + [2.0] * (len(now) - 1), now)
    assert tuning.choose(KEY, now, timer.run, may_bench=True, bench_fn=timer) == now[0]
    assert timer.timed == now
    entry = read_table()["entries"][str(KEY)]
    assert entry["config"] == now[0] and entry["candidates_sha"] == tuning.candidates_digest(now)


CORRUPT = {
    "garbage-bytes": b"\x00\xff\xfe not json",
    "truncated": b'{"format": 1, "entries": {"a": {"config": ',
    "top-level-list": b"[1, 2, 3]",
    "other-format": json.dumps({"format": 999, "entries": {}}).encode(),
    "entries-not-a-dict": json.dumps({"format": 1, "entries": [1]}).encode(),
    "entry-not-a-dict": None,  # filled in below: a valid file whose entry for KEY is a string
    "empty-file": b"",
}


@pytest.mark.parametrize("kind", list(CORRUPT))
def test_corrupt_or_foreign_table_is_ignored_then_rewritten(kind):
    path = tuning.table_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = CORRUPT[kind]
    if data is None:
        data = json.dumps({"format": tuning.TABLE_FORMAT, "entries": {str(KEY): "C[0]"}}).encode()
    path.write_bytes(data)
    assert tuning.lookup(KEY, C) is None
    assert tuning.choose(KEY, C, lambda c: None, may_bench=False) is None
    timer = FakeTimer([2.0, 1.0, 3.0])
    assert tuning.choose(KEY, C, timer.run, may_bench=True, bench_fn=timer) == C[1]
    table = read_table()  # valid again
    assert table["format"] == tuning.TABLE_FORMAT and table["entries"][str(KEY)]["config"] == C[1]


def test_table_changed_by_another_process_is_reread():
    assert tuning.lookup(KEY, C) is None
    tuning.store(KEY, C, C[0], [1.0, 2.0, 3.0])
    assert tuning.lookup(KEY, C) == C[0]
    table = read_table()  # "another process" rewrites the entry
    table["entries"][str(KEY)]["config"] = C[2]
    tmp = tuning.table_path().with_suffix(".other")
    tmp.write_text(json.dumps(table))
    os.replace(tmp, tuning.table_path())
    assert tuning.lookup(KEY, C) == C[2]


def test_unwritable_cache_dir_keeps_the_winner_in_process(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("NSA_CODEGEN_CACHE", str(blocker / "cache"))
    timer = FakeTimer([2.0, 1.0, 3.0])
    assert tuning.choose(KEY, C, timer.run, may_bench=True, bench_fn=timer) == C[1]


def test_failed_table_write_keeps_the_winner_and_leaves_no_temp_file(monkeypatch):
    """A write that fails half-way (disk full: fsync raises) removes its temp file and surfaces as the
    OSError, which `choose` turns into an in-process winner."""
    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    timer = FakeTimer([2.0, 1.0, 3.0])
    assert tuning.choose(KEY, C, timer.run, may_bench=True, bench_fn=timer) == C[1]
    assert not tuning.table_path().exists()
    assert not [p for p in tuning.table_path().parent.iterdir() if p.name.endswith(".tmp")]


def test_first_writer_wins_within_one_process_too():
    assert tuning.store(KEY, C, C[0], [1.0, 2.0, 3.0]) == C[0]
    assert tuning.store(KEY, C, C[2], [3.0, 2.0, 1.0]) == C[0]  # a valid entry exists: adopt it
    assert read_table()["entries"][str(KEY)]["config"] == C[0]


WRITER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from nsa_codegen.kernels import tuning
    tag, other, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    C = json.loads(sys.argv[4])
    ready = Path(sys.argv[5])
    (ready / tag).touch()
    while not (ready / other).exists():  # both processes start writing together
        time.sleep(0.001)
    shared = tuning.TuneKey("shared", 64, "bfloat16", 1024, "gpu", "t")
    mine = C[0] if tag == "a" else C[1]
    got = tuning.store(shared, C, mine, [1.0, 1.0, 1.0])
    for i in range(count):
        tuning.store(tuning.TuneKey(f"v_{tag}_{i}", 64, "bfloat16", 1024, "gpu", "t"), C, C[i % 3], [1.0, 2.0, 3.0])
    print(json.dumps(got))
    """
)


def test_two_processes_writing_at_once_both_succeed(tmp_path):
    ready = tmp_path / "ready"
    ready.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    count = 40
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, tag, other, str(count), json.dumps(C), str(ready)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for tag, other in (("a", "b"), ("b", "a"))]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    table = read_table()  # valid JSON, no update lost
    names = set(table["entries"])
    want = {str(tuning.TuneKey(f"v_{t}_{i}", 64, "bfloat16", 1024, "gpu", "t")) for t in "ab" for i in range(count)}
    assert want <= names and len(names) == 2 * count + 1
    shared = table["entries"][str(tuning.TuneKey("shared", 64, "bfloat16", 1024, "gpu", "t"))]["config"]
    assert [json.loads(out.strip().splitlines()[-1]) for out, _ in outs] == [shared, shared]  # both agree
    assert not [p for p in tuning.table_path().parent.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------------
# when to benchmark: env switch, interpreter, fake tensors


def test_benchmark_blocker_reasons(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "cpu" in tuning.benchmark_blocker(torch.zeros(2))
    assert tuning.benchmark_blocker(torch.zeros(2, device="meta")) is not None
    with FakeTensorMode():
        fake = torch.empty(2, device="cuda")
        assert "fake" in tuning.benchmark_blocker(fake).lower()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tuning.benchmark_blocker(torch.zeros(2)) == "TRITON_INTERPRET=1"
    monkeypatch.setenv("NSA_CODEGEN_TUNE", "0")
    assert tuning.benchmark_blocker(torch.zeros(2)) == "NSA_CODEGEN_TUNE=0"


def _module():
    return cache.load_variant(VariantSpec("select_fwd", 64, 16, True))


def test_env_switch_and_memo(monkeypatch):
    mod = _module()
    probe = torch.zeros(1)  # only its device matters here
    cands = _launch.fitting_configs(mod.CONFIGS, 128, 2)
    assert len(cands) > 2
    default = _launch.choose_config(mod, 128, torch.bfloat16)
    timer = FakeTimer([3.0] * (len(cands) - 1) + [1.0], cands)
    monkeypatch.setattr(tuning, "benchmark_blocker", lambda probe: None)  # as on a CUDA call

    monkeypatch.setenv("NSA_CODEGEN_TUNE", "0")
    assert tuning.kernel_config(mod, None, 128, torch.bfloat16, 8192, probe, timer.run, bench_fn=timer) == default
    assert timer.timed == [] and not tuning.table_path().exists()

    monkeypatch.delenv("NSA_CODEGEN_TUNE")
    tuned = tuning.kernel_config(mod, None, 128, torch.bfloat16, 8192, probe, timer.run, bench_fn=timer)
    assert tuned == tuning.split(cands[-1]) != default and timer.timed == cands
    # warm: same bucket -> memo, no benchmark; another bucket -> benchmark again
    assert tuning.kernel_config(mod, None, 128, torch.bfloat16, 5000, probe, timer.run, bench_fn=timer) == tuned
    assert len(timer.timed) == len(cands)
    tuning.kernel_config(mod, None, 128, torch.bfloat16, 8193, probe, timer.run, bench_fn=timer)
    assert len(timer.timed) == 2 * len(cands)
    # in a new process (no memo) the switch wins over the table
    tuning.reset()
    monkeypatch.setenv("NSA_CODEGEN_TUNE", "0")
    assert tuning.kernel_config(mod, None, 128, torch.bfloat16, 8192, probe, timer.run, bench_fn=timer) == default


def test_kernels_of_one_module_are_tuned_apart(monkeypatch):
    """cmp_bwd has two kernels sharing CONFIGS: each gets its own key, benchmark and winner."""
    mod = cache.load_variant(VariantSpec("cmp_bwd", 0, 16, True))
    probe = torch.zeros(1)
    cands = _launch.fitting_configs(mod.CONFIGS, 128, 2)
    assert len(cands) > 2
    monkeypatch.setattr(tuning, "benchmark_blocker", lambda probe: None)
    dq_timer = FakeTimer([1.0] + [3.0] * (len(cands) - 1), cands)
    dkdv_timer = FakeTimer([3.0] * (len(cands) - 1) + [1.0], cands)
    dq = tuning.kernel_config(mod, "dq_kernel", 128, torch.bfloat16, 65536, probe, dq_timer.run, bench_fn=dq_timer)
    dkdv = tuning.kernel_config(mod, "dkdv_kernel", 128, torch.bfloat16, 65536, probe, dkdv_timer.run,
                                bench_fn=dkdv_timer)
    assert dq == tuning.split(cands[0]) and dkdv == tuning.split(cands[-1]) and dq != dkdv
    assert dq_timer.timed == cands and dkdv_timer.timed == cands
    keys = set(read_table()["entries"])
    assert any("cmp_bwd_g16_causal:dq_kernel|" in k for k in keys)
    assert any("cmp_bwd_g16_causal:dkdv_kernel|" in k for k in keys)


def test_a_kernels_config_never_answers_for_another_kernel(monkeypatch):
    """The tuned choice is keyed by (module, kernel): the selected forward's config (BLOCK_N only) is never
    handed to the compressed backward's kernels (which need BLOCK_M), in the table or in the memo, and a
    winner of dq_kernel does not answer for dkdv_kernel of the same module."""
    monkeypatch.setattr(tuning, "benchmark_blocker", lambda probe: None)  # as on a CUDA call
    probe = torch.zeros(1)
    fwd = _module()
    fwd_cands = _launch.fitting_configs(fwd.CONFIGS, 128, 2)
    timer = FakeTimer([3.0] * (len(fwd_cands) - 1) + [1.0], fwd_cands)
    tuned_fwd = tuning.kernel_config(fwd, None, 128, torch.bfloat16, 64, probe, timer.run, bench_fn=timer)
    assert tuned_fwd == tuning.split(fwd_cands[-1]) and "BLOCK_M" not in tuned_fwd[0]

    bwd = cache.load_variant(VariantSpec("cmp_bwd", 0, 16, True))
    bwd_cands = _launch.fitting_configs(bwd.CONFIGS, 128, 2)
    dq_timer = FakeTimer([1.0] + [3.0] * (len(bwd_cands) - 1), bwd_cands)
    dq = tuning.kernel_config(bwd, "dq_kernel", 128, torch.bfloat16, 64, probe, dq_timer.run, bench_fn=dq_timer)
    assert dq == tuning.split(bwd_cands[0]) and dq_timer.timed == bwd_cands  # its own benchmark, its configs
    assert {"BLOCK_M", "BLOCK_N"} <= set(dq[0])
    keys = set(read_table()["entries"])
    assert {k.split("|")[0] for k in keys} == {"select_fwd_bs64_g16_causal", "cmp_bwd_g16_causal:dq_kernel"}

    # without a benchmark, dkdv_kernel gets the default: neither dq_kernel's winner nor the forward's
    monkeypatch.setattr(tuning, "benchmark_blocker", lambda probe: "no benchmark here")
    dkdv = tuning.kernel_config(bwd, "dkdv_kernel", 128, torch.bfloat16, 64, probe, lambda c: None)
    assert dkdv == _launch.choose_config(bwd, 128, torch.bfloat16)
    dkdv_key = tuning.make_key("cmp_bwd_g16_causal:dkdv_kernel", 128, torch.bfloat16, 64, probe.device)
    assert tuning.decisions()[str(dkdv_key)]["source"] == "none"
    # the memo answers each (module, kernel) with its own winner
    assert tuning.kernel_config(fwd, None, 128, torch.bfloat16, 64, probe, lambda c: None) == tuned_fwd
    assert tuning.kernel_config(bwd, "dq_kernel", 128, torch.bfloat16, 64, probe, lambda c: None) == dq


class _Picked(Exception):
    """Raised by the `_launch_fwd` spy once the config is chosen: the interpreter's kernels (this lane)
    cannot take fake tensors, and the launch is not what these tests are about."""


def test_every_candidate_failing_on_the_call_path_is_not_retried(monkeypatch):
    mod = _module()
    default = _launch.choose_config(mod, 128, torch.bfloat16)
    calls = []

    def oom(fn):
        calls.append(fn)
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(tuning, "benchmark_blocker", lambda probe: None)
    for _ in range(3):
        assert tuning.kernel_config(mod, None, 128, torch.bfloat16, 8192, torch.zeros(1), lambda c: None,
                                    bench_fn=oom) == default
    assert len(calls) == len(_launch.fitting_configs(mod.CONFIGS, 128, 2))  # one failed round, then the memo
    assert not tuning.table_path().exists()


def _fake_cuda_call(monkeypatch):
    """torch.ops.nsa.selected_attention under FakeTensorMode on fake CUDA tensors (what torch.compile
    traces), stopped at the launch of the caller's outputs; returns the (constexprs, launch) it got, the
    benchmark calls and the tuning key."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    benched, picked = [], []
    monkeypatch.setattr(tuning, "default_bench", lambda fn: benched.append(fn) or 1.0)

    def spy(module, cfg, *args):
        picked.append(cfg)
        raise _Picked

    monkeypatch.setattr(selected, "_launch_fwd", spy)
    with FakeTensorMode():
        q = torch.empty(1, 256, 16, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.empty(1, 256, 1, 128, device="cuda", dtype=torch.bfloat16)
        idx = torch.zeros(1, 256, 1, 2, device="cuda", dtype=torch.int32)
        valid = torch.zeros(1, 256, 1, 2, device="cuda", dtype=torch.bool)
        with pytest.raises(_Picked):
            torch.ops.nsa.selected_attention(q, k, k, idx, valid, None, 64, True, 0.1)
        key = tuning.make_key("select_fwd_bs64_g16_causal", 128, torch.bfloat16, 256, q.device)
    return picked, benched, key


def test_fake_tensor_path_never_benchmarks(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # only the fake tensors may stop the benchmark
    mod = _module()
    cands = _launch.fitting_configs(mod.CONFIGS, 128, 2)
    picked, benched, key = _fake_cuda_call(monkeypatch)
    assert benched == [] and picked == [_launch.choose_config(mod, 128, torch.bfloat16)]
    assert not tuning.table_path().exists()
    decision = tuning.decisions()[str(key)]
    assert decision["source"] == "none" and decision["reason"]
    # with a table entry, the traced call uses it (still no benchmark)
    tuning.store(key, cands, cands[3], [1.0] * len(cands))
    tuning.reset()
    picked, benched, _ = _fake_cuda_call(monkeypatch)
    assert benched == [] and picked == [tuning.split(cands[3])] and cands[3] != cands[0]
    assert tuning.decisions()[str(key)]["source"] == "table"


# ----------------------------------------------------------------------------------------------------
# through the launcher (interpreter)


def _small_inputs(n=32, H=2, K=1, d=16, block_size=8, kk=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, n, H, d, generator=gen)
    k = torch.randn(1, n, K, d, generator=gen)
    v = torch.randn(1, n, K, d, generator=gen)
    own = torch.arange(n) // block_size
    idx = torch.arange(kk)[None, None, None, :].expand(1, n, K, kk).to(torch.int32).contiguous()
    valid = (idx < own[None, :, None, None]).contiguous()
    return q, k, v, idx, valid


class _LaunchSpy:
    """Wraps `selected._launch_fwd` (launches as usual) and records each launch: its (constexprs, launch)
    and the out / lse tensors it wrote."""

    def __init__(self):
        self.launches = []

    def __call__(self, module, cfg, wrap, q, k, v, block_idx, block_valid, gates, scale, out, lse):
        self.launches.append((cfg, out, lse))
        REAL_LAUNCH_FWD(module, cfg, wrap, q, k, v, block_idx, block_valid, gates, scale, out, lse)


@interp
def test_interpreter_launch_uses_the_table_and_never_benchmarks(monkeypatch):
    q, k, v, idx, valid = _small_inputs()
    mod = cache.load_variant(selected.variant_specs(q, k, idx, block_size=8, causal=True)[0])
    cands = _launch.fitting_configs(mod.CONFIGS, 16, 4)
    benched = []
    monkeypatch.setattr(tuning, "default_bench", lambda fn: benched.append(fn) or 1.0)
    spy = _LaunchSpy()
    monkeypatch.setattr(selected, "_launch_fwd", spy)
    key = tuning.make_key(tuning.variant_name(mod), 16, torch.float32, 32, q.device)
    tuning.store(key, cands, cands[4], [1.0] * len(cands))
    out, _ = selected.selected_attention_fwd_launch(q, k, v, idx, valid, None, block_size=8, causal=True, scale=0.25)
    assert benched == [] and [cfg for cfg, _, _ in spy.launches] == [tuning.split(cands[4])] and cands[4] != cands[0]
    ref = reference.selected_attention(q, k, v, idx, valid, None, block_size=8, causal=True, scale=0.25)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@interp
def test_selected_forward_tuning_writes_only_scratch_outputs(monkeypatch):
    """A benchmarked call (the CUDA path, simulated): every candidate launch writes its own scratch out /
    lse, never the caller's; the tuning runs `_launch_fwd` directly (one config choice per call, no
    re-entry into the op or into `choose_config`); the final launch (the winner) writes the caller's
    out / lse; the winner is persisted and memoized."""
    q, k, v, idx, valid = _small_inputs()
    mod = cache.load_variant(selected.variant_specs(q, k, idx, block_size=8, causal=True)[0])
    cands = _launch.fitting_configs(mod.CONFIGS, 16, 4)
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"))
    seen = []  # per candidate: (caller's out still untouched, caller's lse still untouched)

    def fake_bench(fn):
        fn()
        seen.append((bool(torch.isnan(out).all()), bool(torch.isnan(lse).all())))
        return [5.0, 4.0, 3.0, 1.0, 2.0, 6.0][len(seen) - 1]

    monkeypatch.setattr(tuning, "benchmark_blocker", lambda probe: None)
    monkeypatch.setattr(tuning, "default_bench", fake_bench)
    spy = _LaunchSpy()
    monkeypatch.setattr(selected, "_launch_fwd", spy)
    choices = []
    real_choose = selected.choose_config
    monkeypatch.setattr(selected, "choose_config", lambda *a, **kw: choices.append(a) or real_choose(*a, **kw))
    kw = dict(block_size=8, causal=True, scale=0.25)
    got, got_lse = selected.selected_attention_fwd_launch(q, k, v, idx, valid, None, **kw, out=out, lse=lse)
    assert len(cands) == 6 and seen == [(True, True)] * 6 and len(choices) == 1
    assert len(spy.launches) == 7
    for cfg, o, l in spy.launches[:-1]:  # the candidates: scratch tensors of the caller's shapes
        assert o is not out and l is not lse and o.shape == out.shape and l.shape == lse.shape
    assert [cfg for cfg, _, _ in spy.launches[:-1]] == [tuning.split(c) for c in cands]
    cfg, o, l = spy.launches[-1]
    assert o is out and l is lse and got is out and got_lse is lse and cfg == tuning.split(cands[3])
    ref = reference.selected_attention(q, k, v, idx, valid, None, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.isnan(lse).any()
    key = tuning.make_key(tuning.variant_name(mod), 16, torch.float32, 32, q.device)
    assert read_table()["entries"][str(key)]["config"] == cands[3]
    # warm: a dict lookup, no benchmark
    selected.selected_attention_fwd_launch(q, k, v, idx, valid, None, **kw)
    assert len(seen) == 6 and len(spy.launches) == 8 and spy.launches[-1][0] == tuning.split(cands[3])
