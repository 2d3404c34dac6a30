"""Data-parallel training on CPU: DDP and FSDP2 (`fully_shard`) with gloo, for SparseAttention, for
the Transformer LM, and for the training example launched through torchrun.

Module and model: two worker processes each take half of a batch of 4, run forward + backward + one
SGD step in the wrapped model, and compare gradients and updated parameters against a single-process
run of an identically initialised model on the whole batch (fp32, atol = rtol = 1e-5). The loss is a
mean over the batch, so the data-parallel gradient average equals the full-batch gradient. The
single-process reference is run inside each worker (no collectives involved), so every rank checks
its own results and a failure surfaces as that worker's traceback.

Example: `examples/train_lm.py --ddp` / `--fsdp` under `python -m torch.distributed.run` with 2 CPU
processes must exit 0, write the checkpoint from rank 0, and log the same losses (and save the same
weights) as a single-process run on the same global batch.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from nsa_codegen import SparseAttention, Transformer

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


# the language model: the same attention sizes inside pre-norm blocks, byte vocabulary, tied head
MODEL_CONFIG = dict(
    num_tokens=256, dim=64, depth=2, heads=4, kv_heads=2, dim_head=16,
    sliding_window_size=8, compress_block_size=8, compress_block_sliding_stride=4,
    selection_block_size=8, num_selected_blocks=2,
)


def _randomize_zero_init(m: SparseAttention) -> None:
    """The zero-initialised parameters (memory kv, intra-block positions, gate weights) made random,
    so that every branch and gate carries a gradient of the same order as the projections."""
    with torch.no_grad():
        m.compress_mem_kv.normal_(0.0, 0.5)
        m.k_intrablock_positions.normal_(0.0, 0.5)
        m.v_intrablock_positions.normal_(0.0, 0.5)
        m.to_strategy_combine[0].weight.normal_(0.0, 0.2)


def _make_module() -> SparseAttention:
    """Same parameters on every call (and in every process): seeded init, zero-init made random."""
    torch.manual_seed(0)
    m = SparseAttention(**CONFIG)
    _randomize_zero_init(m)
    return m


def _make_transformer() -> Transformer:
    """Same parameters on every call (and in every process), every layer's zero-init made random."""
    torch.manual_seed(0)
    model = Transformer(**MODEL_CONFIG)
    for block in model.layers:
        _randomize_zero_init(block.attn)
    return model


def _make_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Full batch input and a random projection target for the loss (same in every process)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, SEQ_LEN, CONFIG["dim"], generator=g)
    target = torch.randn(BATCH, SEQ_LEN, CONFIG["dim"], generator=g)
    return x, target


def _make_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """Full batch of token ids and their next-token targets (same in every process)."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, MODEL_CONFIG["num_tokens"], (BATCH, SEQ_LEN + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # per-sample sum, mean over the batch: the average of the per-rank losses is the full-batch loss
    return (out * target).sum(dim=(1, 2)).mean()


# Scales the LM loss (a power of two: exact) so that the smallest gradients, those of the key
# compression path (intra-block key positions, key compression MLP: norms down to 3e-3 unscaled),
# are above MIN_GRAD_NORM.
LM_LOSS_SCALE = 8.0


def _lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # cross-entropy summed over each sequence (a mean over tokens would shrink every gradient 64x),
    # mean over the batch: the average of the per-rank losses is the full-batch loss
    ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
    return LM_LOSS_SCALE * ce.view(target.shape).sum(dim=1).mean()


def _shard_module(model, mesh):
    from torch.distributed.fsdp import fully_shard
    # the two compression MLPs as their own units (nested sharding), the rest in the root
    fully_shard(model.k_compress, mesh=mesh)
    fully_shard(model.v_compress, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _shard_transformer(model, mesh):
    from torch.distributed.fsdp import fully_shard
    # one unit per block (as examples/train_lm.py --fsdp does), then the root: embedding, final norm
    # and the tied head (one shared parameter, managed by the root)
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


# name -> (model factory, full-batch data, loss, FSDP2 sharding)
CASES = {
    "module": (_make_module, _make_data, _loss, _shard_module),
    "transformer": (_make_transformer, _make_tokens, _lm_loss, _shard_transformer),
}


def _train_step(model, x, target, loss_fn):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out = model(x)
    loss_fn(out, target).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: g.detach().clone() for n, g in grads.items()}  # before the step touches them
    opt.step()
    return out.detach(), grads


def _reference(case: str):
    """Single-process run on the whole batch: output, gradients, parameters after the step."""
    make_model, make_data, loss_fn, _ = CASES[case]
    model = make_model()
    x, target = make_data()
    out, grads = _train_step(model, x, target, loss_fn)
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


def _worker(rank: int, case: str, mode: str, init_file: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    try:
        make_model, make_data, loss_fn, shard = CASES[case]
        ref = _reference(case)
        x, target = make_data()
        half = BATCH // WORLD_SIZE
        x, target = x[rank * half:(rank + 1) * half], target[rank * half:(rank + 1) * half]
        model = make_model()
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            model = DistributedDataParallel(model)
        elif mode == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            shard(model, init_device_mesh("cpu", (WORLD_SIZE,)))
        else:
            raise ValueError(mode)
        out, grads = _train_step(model, x, target, loss_fn)
        # full gradients / parameters; every rank walks the same names in the same order
        grads = {_strip(n): _full(g) for n, g in grads.items()}
        params = {_strip(n): _full(p.detach()) for n, p in model.named_parameters()}
        _check(rank, out, grads, params, ref)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(case: str, mode: str, tmp_path, monkeypatch):
    # inherited by the spawned workers: one intra-op thread each (two workers on two cores), and
    # gloo on the loopback interface (the rendezvous itself goes through a file, so no port is picked)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if os.path.exists("/sys/class/net/lo"):
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    init_file = str(tmp_path / "rendezvous")
    ctx = mp.start_processes(_worker, args=(case, mode, init_file), nprocs=WORLD_SIZE, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        # join() re-raises a worker's exception (with its traceback) and stops the other worker
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"{case} {mode} workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()


def test_ddp_matches_single_process(tmp_path, monkeypatch):
    _spawn("module", "ddp", tmp_path, monkeypatch)


def test_fsdp2_fully_shard_matches_single_process(tmp_path, monkeypatch):
    _spawn("module", "fsdp2", tmp_path, monkeypatch)


def test_transformer_ddp_matches_single_process(tmp_path, monkeypatch):
    _spawn("transformer", "ddp", tmp_path, monkeypatch)


def test_transformer_fsdp2_fully_shard_matches_single_process(tmp_path, monkeypatch):
    _spawn("transformer", "fsdp2", tmp_path, monkeypatch)


# --------------------------------------------------------------------------------------------------
# examples/train_lm.py --ddp / --fsdp under torchrun

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_lm.py"
# tiny: 2 steps of a global batch of 4 (2 sequences per process), a progress line and a curve point
# at every step, so step 1 checks the batch split and the loss average and step 2 the averaged
# gradients (through clipping and one AdamW step); NSA (the heavier path, with every branch)
EXAMPLE_ARGS = ["--device", "cpu", "--attn", "nsa", "--steps", "2", "--seq-len", "64", "--batch", "4",
                "--dim", "32", "--depth", "1", "--heads", "2", "--kv-heads", "1", "--dim-head", "16",
                "--log-every", "1", "--eval-every", "2", "--eval-batches", "1", "--max-bytes", "200000",
                "--sample-tokens", "8", "--threads", "1"]
EXAMPLE_TIMEOUT_S = 120   # normally about 6 s: two interpreters importing torch, rendezvous, 2 steps


def _run_torchrun(flag: str, out: Path) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone` (c10d rendezvous on a free localhost port) with
    2 processes on gloo. Its own process group, so a timeout can stop the launcher and its workers."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD_SIZE}",
           str(EXAMPLE), flag, *EXAMPLE_ARGS, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=EXAMPLE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun {flag} did not finish within {EXAMPLE_TIMEOUT_S} s\n{stdout[-3000:]}\n"
                    f"{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _single_process_example(out: Path) -> None:
    """The same run in this process, without a process group: the reference."""
    spec = importlib.util.spec_from_file_location("train_lm_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main([*EXAMPLE_ARGS, "--out", str(out)]) == 0


@pytest.mark.parametrize("flag", ["--ddp", "--fsdp"])
def test_example_data_parallel_under_torchrun_matches_single_process(flag, tmp_path, capsys):
    result = _run_torchrun(flag, tmp_path / "parallel")
    assert result.returncode == 0, f"rc {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    # rank 0 alone prints: one header, one line per step
    assert result.stdout.count("[nsa] step      1/2") == 1, result.stdout
    assert f"({flag[2:].upper()} on {WORLD_SIZE} processes, 2 sequences each)" in result.stdout, result.stdout
    ckpt_path = tmp_path / "parallel" / "nsa.pt"
    assert ckpt_path.is_file(), result.stdout
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["result"]["world_size"] == WORLD_SIZE

    _single_process_example(tmp_path / "single")
    capsys.readouterr()
    ref = torch.load(tmp_path / "single" / "nsa.pt", weights_only=True)
    # the logged losses (all-reduced means over the processes) equal the single-process ones
    curves = json.loads((tmp_path / "parallel" / "curves.json").read_text())["nsa"]
    ref_curves = json.loads((tmp_path / "single" / "curves.json").read_text())["nsa"]
    for key in ("train", "held_out"):
        assert [s for s, _ in curves[key]] == [s for s, _ in ref_curves[key]], (key, curves, ref_curves)
        for (step, got), (_, want) in zip(curves[key], ref_curves[key]):
            assert abs(got - want) <= 1e-5, (key, step, got, want)
    # the saved weights (FSDP2: gathered from the shards) equal the single-process ones after 2 steps
    assert ckpt["config"] == ref["config"]
    assert ckpt["state_dict"].keys() == ref["state_dict"].keys()
    for name, want in ref["state_dict"].items():
        torch.testing.assert_close(ckpt["state_dict"][name], want, **TOL, msg=lambda m, n=name: f"{n}: {m}")
    model = Transformer(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
