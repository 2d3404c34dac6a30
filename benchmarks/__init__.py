"""Benchmark suite (GPU): `python -m nsa_codegen bench` runs `benchmarks.bench.main`."""
