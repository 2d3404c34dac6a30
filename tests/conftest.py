"""Shared test settings."""
import os

# Triton decides interpreted-vs-compiled when a kernel is *defined* and reads TRITON_INTERPRET once:
# set it here, before any test module (or a dependency such as native-sparse-attention-pytorch)
# imports triton, so every kernel in the CPU lane runs under the interpreter.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist every worker is its own process: one intra-op thread each, so `-n 2` on two cores
# does not oversubscribe (measured: 3x the CPU time for the decoding tests without this).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
