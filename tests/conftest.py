"""Shared test settings."""
import os

import torch

# Under pytest-xdist every worker is its own process: one intra-op thread each, so `-n 2` on two cores
# does not oversubscribe (measured: 3x the CPU time for the decoding tests without this).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
