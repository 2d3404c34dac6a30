"""Data-parallel training of SparseAttention on CPU: DDP and FSDP2 (`fully_shard`) with gloo.

Two worker processes each take half of a batch of 4, run forward + backward + one SGD step in the
wrapped module, and compare gradients and updated parameters against a single-process run of an
identically initialised module on the whole batch (fp32, atol = rtol = 1e-5). The loss is a mean
over the batch, so the data-parallel gradient average equals the full-batch gradient.

The single-process reference is run inside each worker (no collectives involved), so every rank
checks its own results and a failure surfaces as that worker's traceback.
"""
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nsa_codegen import SparseAttention

WORLD_SIZE = 2
BATCH = 4  # each rank gets BATCH // WORLD_SIZE samples
SEQ_LEN = 64
LR = 0.5
TOL = dict(atol=1e-5, rtol=1e-5)
# The gradients must be well above atol, or the comparison would pass on any small error.
MIN_GRAD_NORM = 1e-2
TIMEOUT_S = 120  # whole test (spawn + rendezvous + run); each normally takes a few seconds

CONFIG = dict(
    dim=64, dim_head=16, heads=4, kv_heads=2, causal=True,
    sliding_window_size=8, compress_block_size=8, compress_block_sliding_stride=4,
    selection_block_size=8, num_selected_blocks=2,
)


def _make_module() -> SparseAttention:
    """Same parameters on every call (and in every process): seeded init, then the zero-initialised
    parameters (memory kv, intra-block positions, gate weights) are made random so that every branch
    and gate carries a gradient of the same order as the projections."""
    torch.manual_seed(0)
    m = SparseAttention(**CONFIG)
    with torch.no_grad():
        m.compress_mem_kv.normal_(0.0, 0.5)
        m.k_intrablock_positions.normal_(0.0, 0.5)
        m.v_intrablock_positions.normal_(0.0, 0.5)
        m.to_strategy_combine[0].weight.normal_(0.0, 0.2)
    return m


def _make_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Full batch input and a random projection target for the loss (same in every process)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, SEQ_LEN, CONFIG["dim"], generator=g)
    target = torch.randn(BATCH, SEQ_LEN, CONFIG["dim"], generator=g)
    return x, target


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # per-sample sum, mean over the batch: the average of the per-rank losses is the full-batch loss
    return (out * target).sum(dim=(1, 2)).mean()


def _train_step(model, x, target):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out = model(x)
    _loss(out, target).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: g.detach().clone() for n, g in grads.items()}  # before the step touches them
    opt.step()
    return out.detach(), grads


def _reference():
    """Single-process run on the whole batch: output, gradients, parameters after the step."""
    model = _make_module()
    x, target = _make_data()
    out, grads = _train_step(model, x, target)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, g in grads.items():
        assert g.norm() > MIN_GRAD_NORM, f"reference gradient of {n} too small to compare: {g.norm()}"
    return out, grads, params


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (possibly sharded) DTensor; collective, so all ranks call it in order."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def _strip(name: str) -> str:
    # DDP registers the wrapped module as `module.`; FSDP2 keeps the original names
    return name.removeprefix("module.")


def _check(rank, out, grads, params, ref):
    ref_out, ref_grads, ref_params = ref
    half = BATCH // WORLD_SIZE
    torch.testing.assert_close(out, ref_out[rank * half:(rank + 1) * half], **TOL,
                               msg=lambda m: f"rank {rank} forward output: {m}")
    assert set(grads) == set(ref_grads), (sorted(grads), sorted(ref_grads))
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], **TOL, msg=lambda m, n=n: f"rank {rank} grad {n}: {m}")
    assert set(params) == set(ref_params), (sorted(params), sorted(ref_params))
    for n, p in params.items():
        torch.testing.assert_close(p, ref_params[n], **TOL,
                                   msg=lambda m, n=n: f"rank {rank} param {n} after step: {m}")


def _worker(rank: int, mode: str, init_file: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    try:
        ref = _reference()
        x, target = _make_data()
        half = BATCH // WORLD_SIZE
        x, target = x[rank * half:(rank + 1) * half], target[rank * half:(rank + 1) * half]
        model = _make_module()
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            model = DistributedDataParallel(model)
        elif mode == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh("cpu", (WORLD_SIZE,))
            # the two compression MLPs as their own units (nested sharding), the rest in the root
            fully_shard(model.k_compress, mesh=mesh)
            fully_shard(model.v_compress, mesh=mesh)
            fully_shard(model, mesh=mesh)
        else:
            raise ValueError(mode)
        out, grads = _train_step(model, x, target)
        # full gradients / parameters; every rank walks the same names in the same order
        grads = {_strip(n): _full(g) for n, g in grads.items()}
        params = {_strip(n): _full(p.detach()) for n, p in model.named_parameters()}
        _check(rank, out, grads, params, ref)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(mode: str, tmp_path, monkeypatch):
    # inherited by the spawned workers: one intra-op thread each (two workers on two cores), and
    # gloo on the loopback interface (the rendezvous itself goes through a file, so no port is picked)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if os.path.exists("/sys/class/net/lo"):
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    init_file = str(tmp_path / "rendezvous")
    ctx = mp.start_processes(_worker, args=(mode, init_file), nprocs=WORLD_SIZE, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        # join() re-raises a worker's exception (with its traceback) and stops the other worker
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"{mode} workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()


def test_ddp_matches_single_process(tmp_path, monkeypatch):
    _spawn("ddp", tmp_path, monkeypatch)


def test_fsdp2_fully_shard_matches_single_process(tmp_path, monkeypatch):
    _spawn("fsdp2", tmp_path, monkeypatch)
