"""`python -m nsa_codegen bench ...` hands every option to benchmarks/bench.py unchanged and in order."""
from __future__ import annotations

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
