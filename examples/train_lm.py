"""Train a byte-level `nsa_codegen.Transformer` on the Python standard library's sources, then sample.

The text ships with every Python: all `*.py` files under `sysconfig.get_paths()["stdlib"]` (minus
site-packages), read in sorted path order; every 20th file is held out, so the held-out loss is
measured on files the model never trained on. Tokens are bytes (vocabulary 256).

For each attention kind (`--attn nsa`, `dense`, or `both`: the same model with NSA and with dense
causal attention, trained on the same batches in the same order) it prints a progress line every
`--log-every` steps (step, loss, tokens/s), the held-out loss every `--eval-every` steps, saves a
checkpoint (`<out>/<attn>.pt`: `state_dict` + `config` + the run's losses), writes the loss curves
(`<out>/curves.json`, and `<out>/curves.png` when matplotlib is importable), then reloads each
checkpoint from disk and prints a decoded sample.

Default: a toy model (dim 128, depth 2, 4 heads / 2 kv heads of 32, seq 256, batch 4, 200 steps) that
trains both kinds on one CPU thread in about a minute; NSA on the CPU runs the pure-PyTorch
reference, several times slower per step than dense SDPA at this size:

    python examples/train_lm.py

A real size on one GPU, 8k-token sequences, bf16 autocast (NSA on the generated Triton kernels):

    python examples/train_lm.py --device cuda --bf16 --seq-len 8192 --batch 4 --dim 512 --depth 8 \\
        --heads 8 --kv-heads 2 --dim-head 64 --window 512 --compress-block 32 --compress-stride 16 \\
        --select-block 64 --num-selected 16 --steps 2000 --lr 6e-4 --eval-every 200 --attn both \\
        --out runs/lm8k

(The stdlib is about 31 MB of text: 2000 steps x 4 x 8192 tokens is about one epoch.)

Data-parallel on several GPUs with torch.distributed: launch one process per GPU with torchrun and
pass `--ddp` (DistributedDataParallel) or `--fsdp` (FSDP2: `fully_shard` on every block, then on the
whole model). The 8k size above on 2 GPUs of one machine, 4 sequences per GPU:

    torchrun --standalone --nproc-per-node 2 examples/train_lm.py --ddp --device cuda --bf16 \\
        --seq-len 8192 --batch 8 --dim 512 --depth 8 --heads 8 --kv-heads 2 --dim-head 64 \\
        --window 512 --compress-block 32 --compress-stride 16 --select-block 64 --num-selected 16 \\
        --steps 2000 --lr 6e-4 --eval-every 200 --attn both --out runs/lm8k_ddp2

`--batch` is the global batch: every process draws the same window starts from the seeded generator
and keeps its own contiguous share (`batch / world size` sequences, so the world size must divide
it); DDP averages the gradients, so a step equals a single-process step on the whole batch, and the
logged losses equal (to rounding) those of `python examples/train_lm.py --batch 8 ...` on one
device. The backend is NCCL on CUDA (one GPU per process, `cuda:$LOCAL_RANK`; NCCL_NVLS_ENABLE=0 is
set, keeping NVLink multicast off, unless already in the environment) and gloo on the CPU
(`--device cpu`, to try it without GPUs). Only rank 0 prints and writes the checkpoints, curves and
samples; the held-out loss is computed by all processes on their share of each batch and averaged;
tok/s is the global rate (the whole batch's tokens per second of wall time).

Scaling measurement (tok/s on 1 and on 2 GPUs, the same 4 sequences per GPU, NSA only, 100 steps
without evaluation until the end; compare the last progress line's tok/s, since the first interval
includes the Triton compilation; ideal is 2x):

    ARGS="--device cuda --bf16 --seq-len 8192 --dim 512 --depth 8 --heads 8 --kv-heads 2 --dim-head 64 \\
        --window 512 --compress-block 32 --compress-stride 16 --select-block 64 --num-selected 16 \\
        --lr 6e-4 --attn nsa --steps 100 --log-every 20 --eval-every 1000 --sample-tokens 16"
    torchrun --standalone --nproc-per-node 1 examples/train_lm.py --ddp $ARGS --batch 4 --out runs/scale1
    torchrun --standalone --nproc-per-node 2 examples/train_lm.py --ddp $ARGS --batch 8 --out runs/scale2

(`--batch 4` on both is the fixed-global-batch comparison instead: the same losses, 2 sequences per
GPU on two.)

The two variants differ only in the attention core, and that core gives NSA more parameters: each
NSA layer adds two compression MLPs of `(l * d) x (expand * l * d)` and `(expand * l * d) x d`
weights (at the toy size 1.52M parameters against dense's 0.39M; at the 8k size above 91.6M against
22.2M). `--compress-mlp-expand` narrows them.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

try:
    from nsa_codegen import Transformer
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from nsa_codegen import Transformer

HELD_OUT_EVERY = 20          # every 20th file (in sorted order) is held out
FILE_SEPARATOR = b"\n\n"


# --------------------------------------------------------------------------------------------------
# data


def stdlib_files() -> list[Path]:
    """The stdlib's *.py files in a deterministic (sorted relative path) order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if p.is_file() and not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_corpus(max_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(train bytes, held-out bytes, train files, held-out files) as uint8 tensors; split by file.
    `max_bytes` caps the total read (the first files in order), for quick runs."""
    train, held_out, n_train, n_held_out, total = [], [], 0, 0, 0
    for i, path in enumerate(stdlib_files()):
        text = path.read_bytes() + FILE_SEPARATOR
        if i % HELD_OUT_EVERY == 0:
            held_out.append(text)
            n_held_out += 1
        else:
            train.append(text)
            n_train += 1
        total += len(text)
        if max_bytes is not None and total >= max_bytes:
            break

    def as_tensor(chunks):
        return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)

    return as_tensor(train), as_tensor(held_out), n_train, n_held_out


def get_batch(data: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator, device,
              rank: int = 0, world_size: int = 1):
    """`batch` random windows of seq_len + 1 bytes: inputs and next-byte targets (b, seq_len) long.

    Data-parallel: every process draws all `batch` starts (so the generators stay in step) and keeps
    the contiguous share `rank * b : (rank + 1) * b`, b = batch / world_size; the shares of all
    processes are exactly the batch one process would draw."""
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=generator)
    share = batch // world_size
    starts = starts[rank * share:(rank + 1) * share]
    rows = torch.stack([data[s: s + seq_len + 1] for s in starts.tolist()]).long()
    rows = rows.to(device, non_blocking=True)
    return rows[:, :-1], rows[:, 1:]


# --------------------------------------------------------------------------------------------------
# data parallelism (torchrun + torch.distributed)


class World(NamedTuple):
    """This process's place among the data-parallel processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    mode: str | None = None          # "ddp", "fsdp", or None (a single process, no process group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def init_distributed(args) -> World:
    """With --ddp / --fsdp: join the process group torchrun describes in the environment (env://).
    NCCL with one GPU per process on CUDA, gloo on the CPU. Without them: a single process."""
    mode = "ddp" if args.ddp else "fsdp" if args.fsdp else None
    if mode is None:
        return World()
    rank, size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if args.device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"--{mode}: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA "
                             f"device(s) visible: start at most that many processes per node")
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
        # NVLink multicast (NVLS) stays off on the machines this runs on; a value the user set wins.
        # NCCL reads it when the communicator is created, so it must be set before init.
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        dist.init_process_group("nccl", init_method="env://", device_id=torch.device(args.device))
    else:
        dist.init_process_group("gloo", init_method="env://")
    assert dist.get_rank() == rank and dist.get_world_size() == size
    return World(rank=rank, size=size, mode=mode)


def wrap_model(model: torch.nn.Module, world: World, args) -> torch.nn.Module:
    """DDP around the model, or FSDP2: every block its own `fully_shard` unit, then the root (the
    embedding, tied head and final norm). Same init on every rank: seeded before construction."""
    if world.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        device = torch.device(args.device)
        # the only buffers are rotary frequencies computed at construction, equal on every rank: no
        # need to broadcast them before every forward (newer PyTorch names the switch
        # forward_sync_buffers and warns about the old broadcast_buffers)
        no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in
                   inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers")
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       **{no_sync: False})
    if world.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(torch.device(args.device).type, (world.size,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The Transformer inside DDP (FSDP2 modifies the module in place and keeps its attributes)."""
    return getattr(model, "module", model)


def full_state_dict(model: torch.nn.Module, world: World) -> dict:
    """The whole model's state dict, as a single process would save it; with FSDP2 the shards are
    gathered (a collective: every rank calls it) and only rank 0 receives them, on the CPU."""
    if world.mode != "fsdp":
        return unwrapped(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def global_mean(value: torch.Tensor, world: World) -> float:
    """The mean of `value` over the processes (each holds the mean of an equal share of the batch,
    so this is the whole batch's mean). A collective: every rank calls it."""
    if world.size > 1:
        value = value.detach().float().clone()
        dist.all_reduce(value)               # SUM: gloo has no AVG
        value /= world.size
    return float(value)


# --------------------------------------------------------------------------------------------------
# training


def model_config(args, attn: str) -> dict:
    return dict(num_tokens=256, dim=args.dim, depth=args.depth, heads=args.heads, dim_head=args.dim_head,
                kv_heads=args.kv_heads, attn=attn, sliding_window_size=args.window,
                compress_block_size=args.compress_block, compress_block_sliding_stride=args.compress_stride,
                selection_block_size=args.select_block, num_selected_blocks=args.num_selected,
                compress_mlp_expand_factor=args.compress_mlp_expand)


def autocast(args):
    if not args.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16)


def lm_loss(model, x, y, args) -> torch.Tensor:
    with autocast(args):
        logits = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


@torch.no_grad()
def held_out_loss(model, data, args, world: World = World()) -> float:
    """Mean loss over `--eval-batches` fixed batches (the same windows at every evaluation).
    Data-parallel: each process evaluates its share of every batch and the means are averaged."""
    # DDP's forward would prepare gradient synchronization: evaluate the module inside it (FSDP2
    # must run its own forward, which gathers the sharded parameters on every rank)
    model = unwrapped(model)
    model.eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    losses = [lm_loss(model, *get_batch(data, args.batch, args.seq_len, gen, args.device, world.rank,
                                        world.size), args)
              for _ in range(args.eval_batches)]
    model.train()
    return global_mean(torch.stack(losses).mean(), world)


def learning_rate(step: int, args) -> float:
    """Linear warm-up over the first 10% of the steps (at most 100), then cosine decay to 10%."""
    warmup = max(1, min(100, args.steps // 10))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_one(attn: str, args, train_data, held_out_data, out_dir: Path, world: World = World()) -> dict:
    log = print if world.is_main else (lambda *a, **k: None)
    torch.manual_seed(args.seed)                    # the same initial weights on every rank
    model = Transformer(**model_config(args, attn)).to(args.device)
    config = model.config
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parallel = (f" ({world.mode.upper()} on {world.size} processes, {args.batch // world.size} sequences "
                f"each)" if world.mode else "")
    log(f"[{attn}] {n_params / 1e6:.2f}M parameters, seq {args.seq_len}, batch {args.batch}{parallel}, "
        f"{args.steps} steps on {args.device}{' (bf16 autocast)' if args.bf16 else ''}"
        f"{f', {torch.get_num_threads()} CPU thread(s)' if args.device == 'cpu' else ''}", flush=True)
    model = wrap_model(model, world, args)
    # after wrapping: FSDP2 replaces the parameters with their shards (DTensors)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            betas=(0.9, 0.95), weight_decay=0.1)
    # the same batches, in the same order, for every attention kind
    batch_gen = torch.Generator().manual_seed(args.seed)
    curve = {"train": [], "held_out": []}
    tokens_per_step = args.batch * args.seq_len
    interval_loss, interval_steps, interval_start = 0.0, 0, time.perf_counter()
    train_time, last_train = 0.0, float("nan")

    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args)
        x, y = get_batch(train_data, args.batch, args.seq_len, batch_gen, args.device, world.rank, world.size)
        loss = lm_loss(model, x, y, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()                      # DDP / FSDP2 average the gradients over the processes
        # the gradients are the global ones here, so the norm (and the clipping) is the same on
        # every rank (FSDP2: the norm of the sharded gradients is reduced over the mesh)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        interval_loss += loss.detach()
        interval_steps += 1

        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            # float() waits for the device; the mean over the processes is the whole batch's loss
            mean = global_mean(interval_loss, world) / interval_steps
            elapsed = time.perf_counter() - interval_start
            train_time += elapsed
            last_train = mean
            curve["train"].append([done, mean])
            # tokens_per_step is the global batch's: the rate of all processes together
            log(f"[{attn}] step {done:>6}/{args.steps}  loss {mean:.4f}  "
                  f"{interval_steps * tokens_per_step / elapsed:,.0f} tok/s  "
                  f"{1e3 * elapsed / interval_steps:.0f} ms/step  lr {learning_rate(step, args):.2e}",
                  flush=True)
            interval_loss, interval_steps = 0.0, 0
            interval_start = time.perf_counter()
        if done % args.eval_every == 0 or done == args.steps:
            val = held_out_loss(model, held_out_data, args, world)
            curve["held_out"].append([done, val])
            log(f"[{attn}] step {done:>6}  held-out loss {val:.4f}", flush=True)
            interval_start = time.perf_counter()                 # evaluation is not training time

    result = dict(attn=attn, params=n_params, train_loss=last_train, held_out_loss=curve["held_out"][-1][1],
                  ms_per_step=1e3 * train_time / args.steps,
                  tokens_per_s=args.steps * tokens_per_step / train_time, world_size=world.size, curve=curve)
    state_dict = full_state_dict(model, world)      # every rank takes part (FSDP2 gathers the shards)
    if world.is_main:
        path = out_dir / f"{attn}.pt"
        torch.save({"config": config, "state_dict": state_dict, "steps": args.steps,
                    "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "result": result}, path)
        print(f"[{attn}] checkpoint: {path}", flush=True)
    return result


# --------------------------------------------------------------------------------------------------
# curves and samples


def write_curves(results: dict, out_dir: Path) -> list[Path]:
    written = [out_dir / "curves.json"]
    written[0].write_text(json.dumps({k: r["curve"] for k, r in results.items()}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"curves: {written[0]} (matplotlib is not installed, so no PNG)")
        return written
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, r in results.items():
        (line,) = ax.plot(*zip(*r["curve"]["train"]), label=f"{kind} train")
        ax.plot(*zip(*r["curve"]["held_out"]), "o--", color=line.get_color(), label=f"{kind} held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title("byte-level LM on the Python stdlib")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = out_dir / "curves.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    written.append(png)
    print(f"curves: {png} and {written[0]}")
    return written


def sample_from_checkpoint(path: Path, args) -> str:
    """Rebuild the model from the checkpoint on disk and continue `--prompt` (KV/NSA-cached decoding)."""
    ckpt = torch.load(path, map_location=args.device, weights_only=True)
    model = Transformer(**ckpt["config"]).to(args.device)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    prompt = torch.tensor(list(args.prompt.encode("utf-8")), dtype=torch.long, device=args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    with autocast(args):
        out = model.generate(prompt, args.sample_tokens, temperature=args.temperature, top_k=args.top_k,
                             generator=gen)
    return bytes(out.tolist()).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to train and sample")
    p.add_argument("--steps", type=int, default=200,
                   help="optimizer steps per attention kind")
    p.add_argument("--seq-len", type=int, default=256,
                   help="tokens (bytes) per training sequence")
    p.add_argument("--batch", type=int, default=4,
                   help="sequences per step")
    p.add_argument("--dim", type=int, default=128,
                   help="model width")
    p.add_argument("--depth", type=int, default=2,
                   help="transformer blocks")
    p.add_argument("--heads", type=int, default=4,
                   help="query heads")
    p.add_argument("--kv-heads", type=int, default=2,
                   help="key/value heads (GQA)")
    p.add_argument("--dim-head", type=int, default=32,
                   help="head dim")
    p.add_argument("--window", type=int, default=32, help="NSA sliding window size")
    p.add_argument("--compress-block", type=int, default=16, help="NSA compression block size l")
    p.add_argument("--compress-stride", type=int, default=8, help="NSA compression stride s")
    p.add_argument("--select-block", type=int, default=16, help="NSA selection block size l'")
    p.add_argument("--num-selected", type=int, default=4, help="NSA selected blocks per query")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU intra-op threads (torch.set_num_threads); 0 keeps PyTorch's default. One "
                        "thread by default: the toy size's ops are too small to gain from more, and on a "
                        "busy machine each parallel op waits for descheduled threads (NSA's CPU path runs "
                        "many small ops: measured 25x slower per step with 2 threads on a loaded 2-core "
                        "machine)")
    p.add_argument("--compress-mlp-expand", type=float, default=1.0,
                   help="NSA compression MLP hidden width = this x compress-block x dim-head (SparseAttention's "
                        "compress_mlp_expand_factor); its two MLPs per layer hold most of NSA's extra parameters")
    p.add_argument("--attn", choices=("nsa", "dense", "both"), default="both",
                   help="attention kind(s) to train; both trains NSA, then dense")
    p.add_argument("--lr", type=float, default=2e-3,
                   help="peak AdamW learning rate (warm-up, then cosine decay to 10%%)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (meant for CUDA)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initialization, the batch order and the sampling")
    p.add_argument("--out", type=Path, default=Path("runs/train_lm"),
                   help="directory for checkpoints and curves")
    p.add_argument("--log-every", type=int, default=20,
                   help="steps between progress lines")
    p.add_argument("--eval-every", type=int, default=50,
                   help="steps between held-out evaluations")
    p.add_argument("--eval-batches", type=int, default=4,
                   help="held-out batches per evaluation")
    p.add_argument("--max-bytes", type=int, default=None,
                   help="read only the first files of the corpus, up to this many bytes (quick runs)")
    p.add_argument("--prompt", default="def __init__(self",
                   help="text the samples continue")
    p.add_argument("--sample-tokens", type=int, default=200,
                   help="bytes to generate per sample")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=32,
                   help="sample among the k most likely bytes")
    parallel = p.add_mutually_exclusive_group()
    parallel.add_argument("--ddp", action="store_true",
                          help="data-parallel with DistributedDataParallel; launch with torchrun (one "
                               "process per GPU, NCCL; gloo with --device cpu); --batch is the global batch")
    parallel.add_argument("--fsdp", action="store_true",
                          help="data-parallel with FSDP2 (fully_shard per block and on the model: "
                               "parameters, gradients and optimizer state sharded); launch like --ddp")
    args = p.parse_args(argv)
    if args.threads < 0:
        p.error(f"--threads must be >= 0 (0: PyTorch's default), got {args.threads}")
    for name in ("steps", "seq_len", "batch", "log_every", "eval_every", "eval_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available (use --device cpu)")
    if not args.prompt:
        p.error("--prompt must not be empty")
    if args.ddp or args.fsdp:
        flag = "--ddp" if args.ddp else "--fsdp"
        missing = [k for k in TORCHRUN_ENV if k not in os.environ]
        if missing:
            p.error(f"{flag}: launch with torchrun, e.g. `torchrun --standalone --nproc-per-node 2 "
                    f"examples/train_lm.py {flag} ...` (missing environment: {', '.join(missing)})")
        world_size = int(os.environ["WORLD_SIZE"])
        if args.batch % world_size:
            p.error(f"{flag}: --batch {args.batch} (the global batch) must be divisible by the number of "
                    f"processes, {world_size}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)       # main() may be called from another program (the tests)


def run(args) -> int:
    world = init_distributed(args)
    try:
        return train_and_report(args, world)
    finally:
        if world.mode:
            dist.destroy_process_group()


def train_and_report(args, world: World) -> int:
    # every rank reads the corpus (the same bytes) and trains; rank 0 alone writes and prints
    train_data, held_out_data, n_train, n_held_out = load_corpus(args.max_bytes)
    if min(train_data.numel(), held_out_data.numel()) <= args.seq_len + 1:
        raise SystemExit(f"the corpus is too small for --seq-len {args.seq_len} (train "
                         f"{train_data.numel()} bytes, held-out {held_out_data.numel()}): raise --max-bytes")
    if world.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        print(f"corpus: {sysconfig.get_paths()['stdlib']} *.py, train {n_train} files / "
              f"{train_data.numel() / 1e6:.1f} MB, held-out {n_held_out} files / "
              f"{held_out_data.numel() / 1e6:.2f} MB", flush=True)

    kinds = ("nsa", "dense") if args.attn == "both" else (args.attn,)
    results = {kind: train_one(kind, args, train_data, held_out_data, args.out, world) for kind in kinds}
    if not world.is_main:
        return 0
    write_curves(results, args.out)

    for kind in kinds:
        start = time.perf_counter()
        text = sample_from_checkpoint(args.out / f"{kind}.pt", args)
        print(f"\n[{kind}] sample ({args.sample_tokens} bytes in {time.perf_counter() - start:.1f} s, "
              f"temperature {args.temperature}, top-k {args.top_k}):\n{text}\n", flush=True)

    print("summary (final train loss = mean of the last logging interval):")
    print(f"  {'attn':<6} {'params':>8} {'train':>7} {'held-out':>9} {'ms/step':>8} {'tok/s':>8}")
    for r in results.values():
        print(f"  {r['attn']:<6} {r['params'] / 1e6:>7.2f}M {r['train_loss']:>7.4f} {r['held_out_loss']:>9.4f} "
              f"{r['ms_per_step']:>8.0f} {r['tokens_per_s']:>8,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
