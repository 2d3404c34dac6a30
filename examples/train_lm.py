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

The two variants differ only in the attention core, and that core gives NSA more parameters: each
NSA layer adds two compression MLPs of `(l * d) x (expand * l * d)` and `(expand * l * d) x d`
weights (at the toy size 1.52M parameters against dense's 0.39M; at the 8k size above 91.6M against
22.2M). `--compress-mlp-expand` narrows them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
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


def get_batch(data: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator, device):
    """`batch` random windows of seq_len + 1 bytes: inputs and next-byte targets (b, seq_len) long."""
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=generator)
    rows = torch.stack([data[s: s + seq_len + 1] for s in starts.tolist()]).long()
    rows = rows.to(device, non_blocking=True)
    return rows[:, :-1], rows[:, 1:]


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
def held_out_loss(model, data, args) -> float:
    """Mean loss over `--eval-batches` fixed batches (the same windows at every evaluation)."""
    model.eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    losses = [lm_loss(model, *get_batch(data, args.batch, args.seq_len, gen, args.device), args).item()
              for _ in range(args.eval_batches)]
    model.train()
    return sum(losses) / len(losses)


def learning_rate(step: int, args) -> float:
    """Linear warm-up over the first 10% of the steps (at most 100), then cosine decay to 10%."""
    warmup = max(1, min(100, args.steps // 10))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_one(attn: str, args, train_data, held_out_data, out_dir: Path) -> dict:
    torch.manual_seed(args.seed)
    model = Transformer(**model_config(args, attn)).to(args.device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"[{attn}] {n_params / 1e6:.2f}M parameters, seq {args.seq_len}, batch {args.batch}, "
          f"{args.steps} steps on {args.device}{' (bf16 autocast)' if args.bf16 else ''}"
          f"{f', {torch.get_num_threads()} CPU thread(s)' if args.device == 'cpu' else ''}", flush=True)
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
        x, y = get_batch(train_data, args.batch, args.seq_len, batch_gen, args.device)
        loss = lm_loss(model, x, y, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        interval_loss += loss.detach()
        interval_steps += 1

        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            mean = float(interval_loss) / interval_steps          # float() waits for the device
            elapsed = time.perf_counter() - interval_start
            train_time += elapsed
            last_train = mean
            curve["train"].append([done, mean])
            print(f"[{attn}] step {done:>6}/{args.steps}  loss {mean:.4f}  "
                  f"{interval_steps * tokens_per_step / elapsed:,.0f} tok/s  "
                  f"{1e3 * elapsed / interval_steps:.0f} ms/step  lr {learning_rate(step, args):.2e}",
                  flush=True)
            interval_loss, interval_steps = 0.0, 0
            interval_start = time.perf_counter()
        if done % args.eval_every == 0 or done == args.steps:
            val = held_out_loss(model, held_out_data, args)
            curve["held_out"].append([done, val])
            print(f"[{attn}] step {done:>6}  held-out loss {val:.4f}", flush=True)
            interval_start = time.perf_counter()                 # evaluation is not training time

    result = dict(attn=attn, params=n_params, train_loss=last_train, held_out_loss=curve["held_out"][-1][1],
                  ms_per_step=1e3 * train_time / args.steps,
                  tokens_per_s=args.steps * tokens_per_step / train_time, curve=curve)
    path = out_dir / f"{attn}.pt"
    torch.save({"config": model.config, "state_dict": model.state_dict(), "steps": args.steps,
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
    args.out.mkdir(parents=True, exist_ok=True)
    train_data, held_out_data, n_train, n_held_out = load_corpus(args.max_bytes)
    if min(train_data.numel(), held_out_data.numel()) <= args.seq_len + 1:
        raise SystemExit(f"the corpus is too small for --seq-len {args.seq_len} (train "
                         f"{train_data.numel()} bytes, held-out {held_out_data.numel()}): raise --max-bytes")
    print(f"corpus: {sysconfig.get_paths()['stdlib']} *.py, train {n_train} files / "
          f"{train_data.numel() / 1e6:.1f} MB, held-out {n_held_out} files / "
          f"{held_out_data.numel() / 1e6:.2f} MB", flush=True)

    kinds = ("nsa", "dense") if args.attn == "both" else (args.attn,)
    results = {kind: train_one(kind, args, train_data, held_out_data, args.out) for kind in kinds}
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
