"""`python -m nsa_codegen bench ...` hands every option to benchmarks/bench.py unchanged and in order."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

import benchmarks.bench
from nsa_codegen import cli


@pytest.mark.parametrize("argv, expected", [
    (["bench", "--quick"], ["--quick"]),
    (["bench", "--", "--quick"], ["--quick"]),
    (["bench", "--budget", "30", "--sections", "check,selected"], ["--budget", "30", "--sections", "check,selected"]),
    (["bench"], []),
])
def test_bench_options_pass_through(monkeypatch, argv, expected):
    seen = []
    monkeypatch.setattr(benchmarks.bench, "main", lambda rest: seen.append(list(rest)) or 0)
    assert cli.main(argv) == 0
    assert seen == [expected]


def test_unknown_command_is_rejected(capsys):
    with pytest.raises(SystemExit):
        cli.main(["benchmark"])
    assert "invalid choice" in capsys.readouterr().err


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_registers_every_op():
    from nsa_codegen.kernels import FAMILIES

    names = [op for family in FAMILIES.values() for op in family.ops]
    code = ("import torch, nsa_codegen\n"
            f"missing = [n for n in {names!r} if not hasattr(torch.ops.nsa, n)]\n"
            "assert not missing, missing\n")
    result = _run(code)
    assert result.returncode == 0, result.stderr


def test_list_into_a_closed_pipe_ends_quietly():
    """`python -m nsa_codegen list | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    cmd = f"{sys.executable} -m nsa_codegen list | head -1"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
    assert result.stdout.count("\n") == 1


@pytest.mark.parametrize("device, gpu, expected", [("cpu", None, "bench_cpu_"), ("cuda", "NVIDIA H200", "bench_nvidia-h200_")])
def test_bench_result_names_its_device(device, gpu, expected):
    args = argparse.Namespace(device=device, quick=True, tag="x")
    info = {} if gpu is None else {"gpu": gpu}
    stem = benchmarks.bench.result_stem(info, args)
    assert stem.startswith(expected) and stem.endswith("_quick_x")
