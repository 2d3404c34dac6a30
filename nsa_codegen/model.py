"""`Transformer`: a causal language model built from `SparseAttention` layers, to train and generate with.

Each of the `depth` blocks is pre-norm:

    x = x + attn(x)               # attn normalizes its own input (RMSNorm inside the attention module)
    x = x + ff(ff_norm(x))        # RMSNorm -> SwiGLU feed-forward

followed by a final RMSNorm and the output head (tied to the token embedding by default).

Normalization before attention: `SparseAttention(norm=True)` (its default, and the public package's)
applies an RMSNorm to its input and feeds the normalized input to both the q/k/v projection and the
branch gates. The block therefore adds no norm of its own before attention (a second one would only
rescale an already unit-RMS input by a learned gain), and the dense attention below does the same, so
the two variants have the same normalization and the same parameters outside the attention core.

`attn="dense"` replaces NSA with plain causal GQA attention (the same q/k/v projection layout, the
same interleaved rotary embedding, `torch.nn.functional.scaled_dot_product_attention`): the baseline
that `examples/train_lm.py` compares losses and step times against.

Decoding: `init_cache(batch, max_seq_len)` preallocates one cache per layer (`StaticCache` for NSA,
`DenseCache` for dense attention), updated in place by `forward(tokens, cache=caches)`: the first call
prefills the prompt (optionally with per-sequence `lengths`), later calls decode the next tokens of every
sequence; their logits equal the parallel forward's logits at those positions. `generate` prefills the
prompt in one call and then decodes token by token into caches made by `init_cache`.
"""
from __future__ import annotations

import inspect
import math
import numbers
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import reference
from .module import CacheBuffers, SparseAttention, StaticCache, check_lengths

__all__ = ["Transformer", "DenseAttention", "DenseCache", "sample_next_token"]

ATTN_KINDS = ("nsa", "dense")

# SparseAttention arguments a Transformer passes through; the model sets dim, dim_head, heads,
# kv_heads, causal (always True: a language model) and norm (always True: the block's pre-norm).
_MODEL_SET = ("dim", "dim_head", "heads", "kv_heads", "causal", "norm")
SPARSE_OPTIONS = tuple(p for p in inspect.signature(SparseAttention.__init__).parameters
                       if p != "self" and p not in _MODEL_SET)


# --------------------------------------------------------------------------------------------------
# argument checks: every message names the argument and what is allowed


def _int_arg(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def _optional_int_arg(name: str, value, minimum: int):
    return None if value is None else _int_arg(name, value, minimum)


def _real_arg(name: str, value, minimum: float, *, inclusive: bool = True, maximum: float | None = None):
    bounds = (f"{'>=' if inclusive else '>'} {minimum}" if maximum is None
              else f"in {'[' if inclusive else '('}{minimum}, {maximum}]")
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{name} must be a number {bounds}, got {value!r}")
    if value < minimum or (not inclusive and value == minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be a number {bounds}, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------------
# dense attention baseline


class DenseCache(CacheBuffers):
    """Preallocated decoding state of one `DenseAttention` layer: rotated keys and values (b, N, kv_heads, d),
    token t of sequence i in row t (t < lengths[i]); lengths, capacity and growth as `CacheBuffers` says."""

    def __init__(self, batch: int, max_seq_len: int, *, kv_heads: int, dim_head: int, device, dtype,
                 growable: bool = False):
        self.k = torch.zeros((batch, max_seq_len, kv_heads, dim_head), device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.lengths = torch.zeros(batch, device=device, dtype=torch.long)
        self.batch_index = torch.arange(batch, device=device)
        self.max_seq_len, self.seq_len, self.growable = max_seq_len, 0, growable

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def _grow(self, capacity: int) -> None:
        self.k, self.v = self._grown(self.k, capacity), self._grown(self.v, capacity)


class DenseAttention(nn.Module):
    """Causal GQA attention with SparseAttention's layout: RMSNorm on the input, one `to_qkv`
    projection split (heads, kv_heads, kv_heads) x dim_head, interleaved rotary on q and k, softmax
    attention over all earlier tokens (SDPA), `combine_heads` output projection. Decoding caches as
    SparseAttention's: `init_cache`, then `forward(x, cache=cache)` (prefill, then decoding steps)."""

    def __init__(self, dim: int, dim_head: int, heads: int, kv_heads: int | None = None):
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        self.dim, self.dim_head, self.heads, self.kv_heads = dim, dim_head, heads, kv_heads
        self.norm = nn.RMSNorm(dim)
        self.qkv_split = (heads * dim_head, kv_heads * dim_head, kv_heads * dim_head)
        self.to_qkv = nn.Linear(dim, sum(self.qkv_split), bias=False)
        # the frequencies SparseAttention's rotary uses; a buffer, recomputed on construction
        self.register_buffer("rotary_freqs", reference.rotary_freqs(dim_head), persistent=False)
        self.combine_heads = nn.Linear(heads * dim_head, dim, bias=False)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, dim_head={self.dim_head}"

    def init_cache(self, batch: int, max_seq_len: int, device=None, dtype=None) -> DenseCache:
        """An empty preallocated cache (see `SparseAttention.init_cache`)."""
        batch = _int_arg("batch", batch, 1)
        max_seq_len = _int_arg("max_seq_len", max_seq_len, 1)
        weight = self.to_qkv.weight
        return DenseCache(batch, max_seq_len, kv_heads=self.kv_heads, dim_head=self.dim_head,
                          device=weight.device if device is None else torch.device(device),
                          dtype=weight.dtype if dtype is None else dtype)

    def forward(self, inp: Tensor, cache: DenseCache | None = None, return_cache: bool = False,
                lengths: Tensor | None = None):
        """(b, n, dim) -> (b, n, dim). `cache`, `return_cache`, `lengths`: as `SparseAttention.forward`."""
        b, n, _ = inp.shape
        if cache is not None:
            if not isinstance(cache, DenseCache):
                raise ValueError(f"cache must be the DenseCache made by init_cache(...) or returned by forward(..., "
                                 f"return_cache=True), got {type(cache).__name__}")
            if cache.batch != b:
                raise ValueError(f"cache was made for batch {cache.batch}, inp has batch {b}")
        if lengths is not None:
            if cache is not None and cache.seq_len or cache is None and not return_cache:
                raise ValueError("lengths is only allowed with a prefill (return_cache=True, or an empty cache)")
            lengths = check_lengths(lengths, b, n, inp.device)
        q, k, v = self.to_qkv(self.norm(inp)).split(self.qkv_split, dim=-1)
        q, k, v = (q.reshape(b, n, self.heads, self.dim_head), k.reshape(b, n, self.kv_heads, self.dim_head),
                   v.reshape(b, n, self.kv_heads, self.dim_head))
        if cache is not None and (cache.dtype != k.dtype or cache.device != k.device or
                                  tuple(cache.k.shape[2:]) != (self.kv_heads, self.dim_head)):
            raise ValueError(f"cache holds {tuple(cache.k.shape[2:])} (kv_heads, dim_head) in {cache.dtype} on "
                             f"{cache.device}; this layer projects to {(self.kv_heads, self.dim_head)} in {k.dtype} "
                             f"on {k.device}: make the cache with this layer's init_cache(..., dtype={k.dtype})")
        if cache is not None and cache.seq_len:
            out = self._decode(q, k, v, cache)
        else:
            q = reference.apply_rotary(q, self.rotary_freqs)
            k = reference.apply_rotary(k, self.rotary_freqs)
            out = self._attend(q, k, v, None)
            if cache is not None or return_cache:
                cache = self._prefill(k, v, cache, lengths)
        out = self.combine_heads(out)
        return (out, cache) if return_cache else out

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """SDPA of q (b, n, H, d) over k, v (b, N, K, d): causal without `mask`, else `mask` (b, 1, n, N)."""
        b, n = q.shape[:2]
        if n == 0:
            return q.new_zeros(b, 0, self.heads * self.dim_head)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=mask is None,
            enable_gqa=self.heads != self.kv_heads)
        return out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)

    @torch.no_grad()
    def _prefill(self, k: Tensor, v: Tensor, cache: DenseCache | None, lengths: Tensor | None) -> DenseCache:
        b, n = k.shape[:2]
        if cache is None:
            cache = DenseCache(b, max(2 * n, 64), kv_heads=self.kv_heads, dim_head=self.dim_head, device=k.device,
                               dtype=k.dtype, growable=True)
        cache.reserve(n)
        cache.k[:, :n] = k
        cache.v[:, :n] = v
        if lengths is None:
            cache.lengths.fill_(n)
        else:
            cache.lengths.copy_(lengths)
        cache.seq_len = n
        return cache

    @torch.no_grad()
    def _decode(self, q: Tensor, k: Tensor, v: Tensor, cache: DenseCache) -> Tensor:
        """The n new tokens of every sequence at positions lengths[i] + r: in-place writes, a mask over the
        whole buffer, static shapes, no host synchronization."""
        n = q.shape[1]
        cache.reserve(n)
        pos = cache.lengths[:, None] + torch.arange(n, device=q.device)  # (b, n)
        q = reference.apply_rotary_at(q, self.rotary_freqs, pos)
        k = reference.apply_rotary_at(k, self.rotary_freqs, pos)
        bi = cache.batch_index[:, None]
        cache.k.index_put_((bi, pos), k)
        cache.v.index_put_((bi, pos), v)
        keys = torch.arange(cache.max_seq_len, device=q.device)
        mask = (keys[None, None, :] <= pos[:, :, None])[:, None]  # (b, 1, n, N)
        cache.lengths.add_(n)
        cache.seq_len += n
        return self._attend(q, cache.k, cache.v, mask)


# --------------------------------------------------------------------------------------------------
# blocks


class SwiGLU(nn.Module):
    """dim -> hidden (gate and value) -> dim, `silu(gate) * value`."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.proj_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(F.silu(gate) * value)


class Block(nn.Module):
    def __init__(self, attn: nn.Module, dim: int, ff_hidden: int):
        super().__init__()
        self.attn = attn                       # normalizes its own input (see the module docstring)
        self.ff_norm = nn.RMSNorm(dim)
        self.ff = SwiGLU(dim, ff_hidden)

    def forward(self, x: Tensor, cache=None, return_cache: bool = False, lengths: Tensor | None = None):
        new_cache = None
        if return_cache:
            a, new_cache = self.attn(x, cache=cache, return_cache=True, lengths=lengths)
        else:
            a = self.attn(x, cache=cache, lengths=lengths)
        x = x + a
        x = x + self.ff(self.ff_norm(x))
        return x, new_cache


# --------------------------------------------------------------------------------------------------
# the language model


class Transformer(nn.Module):
    """Causal token LM: embedding, `depth` pre-norm blocks (attention + SwiGLU), final RMSNorm, head.

    Args:
        num_tokens: vocabulary size (256 for bytes).
        dim, depth, heads, dim_head: model width, number of blocks, query heads, head dim.
        kv_heads: key/value heads (GQA); default `heads`. Must divide `heads`.
        attn: "nsa" (SparseAttention) or "dense" (causal GQA attention with SDPA, the baseline).
        ff_mult: the feed-forward's SwiGLU hidden width is `int(ff_mult * dim * 2 / 3)` (the parameter
            count of a GELU MLP of width `ff_mult * dim`).
        tie_embedding: the output head reuses the token embedding's weight (one shared Parameter).
        sliding_window_size, compress_block_size, compress_block_sliding_stride, selection_block_size,
        num_selected_blocks, **sparse_options: passed to every SparseAttention layer (any of its
            arguments other than dim, dim_head, heads, kv_heads, causal, norm). Stored in `config` and
            ignored by `attn="dense"`, so one config builds both variants.

    `config` holds the constructor arguments: `Transformer(**model.config)` rebuilds the model.
    """

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        depth: int,
        heads: int = 8,
        dim_head: int = 64,
        kv_heads: int | None = None,
        attn: str = "nsa",
        ff_mult: float = 4.0,
        tie_embedding: bool = True,
        sliding_window_size: int = 64,
        compress_block_size: int = 16,
        compress_block_sliding_stride: int | None = 8,
        selection_block_size: int = 16,
        num_selected_blocks: int = 4,
        **sparse_options,
    ):
        super().__init__()
        num_tokens = _int_arg("num_tokens", num_tokens, 1)
        dim = _int_arg("dim", dim, 1)
        depth = _int_arg("depth", depth, 1)
        heads = _int_arg("heads", heads, 1)
        dim_head = _int_arg("dim_head", dim_head, 2)
        if dim_head % 2:
            raise ValueError(f"dim_head must be even (rotary rotates pairs), got {dim_head}")
        kv_heads = heads if kv_heads is None else _int_arg("kv_heads", kv_heads, 1)
        if heads % kv_heads:
            raise ValueError(f"heads ({heads}) must be divisible by kv_heads ({kv_heads}); "
                             f"allowed kv_heads: divisors of heads")
        if not isinstance(attn, str) or attn not in ATTN_KINDS:
            raise ValueError(f"attn must be one of {', '.join(map(repr, ATTN_KINDS))}, got {attn!r}")
        ff_mult = _real_arg("ff_mult", ff_mult, 0.0, inclusive=False)
        ff_hidden = int(ff_mult * dim * 2 / 3)
        if ff_hidden < 1:
            raise ValueError(f"ff_mult must make the feed-forward width int(ff_mult * dim * 2 / 3) >= 1, "
                             f"got ff_mult={ff_mult} (width {ff_hidden})")
        if not isinstance(tie_embedding, bool):
            raise ValueError(f"tie_embedding must be True or False, got {tie_embedding!r}")
        unknown = sorted(set(sparse_options) - set(SPARSE_OPTIONS))
        if unknown:
            set_by_model = [name for name in unknown if name in _MODEL_SET]
            why = (f" ({', '.join(set_by_model)} set by the model: causal and norm are always True)"
                   if set_by_model else "")
            raise ValueError(f"unknown Transformer argument(s) {', '.join(unknown)}{why}; allowed "
                             f"SparseAttention options: {', '.join(SPARSE_OPTIONS)}")
        sparse = dict(sliding_window_size=sliding_window_size, compress_block_size=compress_block_size,
                      compress_block_sliding_stride=compress_block_sliding_stride,
                      selection_block_size=selection_block_size, num_selected_blocks=num_selected_blocks,
                      **sparse_options)

        self.config = dict(num_tokens=num_tokens, dim=dim, depth=depth, heads=heads, dim_head=dim_head,
                           kv_heads=kv_heads, attn=attn, ff_mult=ff_mult, tie_embedding=tie_embedding,
                           **sparse)
        self.num_tokens, self.dim, self.depth, self.attn_kind = num_tokens, dim, depth, attn

        def make_attn() -> nn.Module:
            if attn == "dense":
                return DenseAttention(dim=dim, dim_head=dim_head, heads=heads, kv_heads=kv_heads)
            # SparseAttention validates the sparse options and names the bad one
            return SparseAttention(dim=dim, dim_head=dim_head, heads=heads, kv_heads=kv_heads,
                                   causal=True, norm=True, **sparse)

        self.token_emb = nn.Embedding(num_tokens, dim)
        self.layers = nn.ModuleList(Block(make_attn(), dim, ff_hidden) for _ in range(depth))
        self.norm = nn.RMSNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens, bias=False)
        # small embedding init (GPT-2's 0.02): with a tied head, unit-variance rows would make the
        # initial logits ~sqrt(dim) large and the initial loss far above log(num_tokens)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        if tie_embedding:
            self.to_logits.weight = self.token_emb.weight

    # ----------------------------------------------------------------------------------------------

    def forward(self, tokens: Tensor, cache: list | None = None, return_cache: bool = False,
                lengths: Tensor | None = None):
        """tokens (b, n) integer -> logits (b, n, num_tokens) in the compute dtype.

        `cache`: the list of per-layer caches of `init_cache`, updated in place. On empty caches `tokens` is
        the prompt (a prefill; `lengths` (b,) gives per-sequence prompt lengths, the logits at or after a
        sequence's length being padding); otherwise `tokens` holds the next n tokens of every sequence, and
        the logits equal those the parallel forward gives at these positions. With `return_cache`, also
        returns the list of caches (new growable ones when `cache` is None).
        """
        self._check_tokens(tokens, "tokens")
        if cache is not None:
            self._check_cache(tokens, cache)
        x = self.token_emb(tokens)
        new_caches = [] if return_cache else None
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, cache=None if cache is None else cache[i], return_cache=return_cache,
                                   lengths=lengths)
            if return_cache:
                new_caches.append(layer_cache)
        logits = self.to_logits(self.norm(x))
        return (logits, new_caches) if return_cache else logits

    def init_cache(self, batch: int, max_seq_len: int, device=None, dtype=None) -> list:
        """One empty preallocated cache per layer (`SparseAttention.init_cache` / `DenseAttention.init_cache`)
        for `batch` sequences of up to `max_seq_len` tokens; pass the list as `cache=`."""
        return [layer.attn.init_cache(batch, max_seq_len, device=device, dtype=dtype) for layer in self.layers]

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Continue `prompt` ((b, n) or (n,), n >= 1) by `max_new_tokens` tokens.

        The prompt is prefilled in one parallel call into caches made by `init_cache` (preallocated for
        the prompt and the new tokens); each new token is then decoded into them (one position per call,
        static shapes). `temperature == 0` is greedy (argmax); otherwise
        tokens are sampled from softmax(logits / temperature), restricted to the `top_k` most likely
        and/or to the smallest set whose probability reaches `top_p`. `generator` (on the model's
        device) makes the sampling reproducible. Returns prompt + new tokens, with the prompt's rank.
        """
        max_new_tokens = _int_arg("max_new_tokens", max_new_tokens, 0)
        temperature = _real_arg("temperature", temperature, 0.0)
        top_k = _optional_int_arg("top_k", top_k, 1)
        if top_p is not None:
            top_p = _real_arg("top_p", top_p, 0.0, inclusive=False, maximum=1.0)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be None or a torch.Generator, got {type(generator).__name__}")
        if not isinstance(prompt, Tensor) or prompt.ndim not in (1, 2):
            shape = tuple(prompt.shape) if isinstance(prompt, Tensor) else type(prompt).__name__
            raise ValueError(f"prompt must be a tensor of token ids of shape (batch, n) or (n,), got {shape}")
        squeeze = prompt.ndim == 1
        tokens = prompt[None] if squeeze else prompt
        self._check_tokens(tokens, "prompt")
        if tokens.shape[1] == 0:
            raise ValueError("prompt must hold at least one token (the first new token is predicted "
                             "from the prompt's last position)")

        out = [tokens]
        if max_new_tokens > 0:
            device = tokens.device
            # the caches hold what the projections produce: the autocast dtype under autocast
            dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
            cache = self.init_cache(tokens.shape[0], tokens.shape[1] + max_new_tokens - 1, device=device, dtype=dtype)
            logits = self(tokens, cache=cache)
            for step in range(max_new_tokens):
                nxt = sample_next_token(logits[:, -1], temperature, top_k, top_p, generator)
                out.append(nxt)
                if step + 1 < max_new_tokens:
                    logits = self(nxt, cache=cache)
        result = torch.cat(out, dim=1)
        return result[0] if squeeze else result

    # ----------------------------------------------------------------------------------------------

    def _check_tokens(self, tokens, name: str) -> None:
        if not isinstance(tokens, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of token ids (batch, seq_len), got "
                             f"{type(tokens).__name__}")
        if tokens.ndim != 2:
            raise ValueError(f"{name} must have shape (batch, seq_len), got {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer token ids (torch.long), got {tokens.dtype}")
        # range check on CPU only: on CUDA it would synchronize every step (the embedding asserts there)
        if not tokens.is_cuda and tokens.numel():
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.num_tokens:
                raise ValueError(f"{name} ids must be in [0, num_tokens={self.num_tokens}), got values "
                                 f"in [{lo}, {hi}]")

    def _check_cache(self, tokens: Tensor, cache) -> None:
        expected = DenseCache if self.attn_kind == "dense" else StaticCache
        if not isinstance(cache, (list, tuple)) or len(cache) != self.depth or not all(
                isinstance(c, expected) for c in cache):
            raise ValueError(f"cache must be the list of {self.depth} {expected.__name__}s made by init_cache(...) "
                             f"or returned by forward(..., return_cache=True) of this model, got "
                             f"{type(cache).__name__}")
        if cache[0].batch != tokens.shape[0]:
            raise ValueError(f"cache was made for batch {cache[0].batch}, tokens have batch {tokens.shape[0]}")


def sample_next_token(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """logits (b, V) -> next tokens (b, 1). Greedy (argmax) when `temperature == 0`; else sample from
    softmax(logits / temperature) restricted to the `top_k` largest logits and then to the smallest
    prefix (by descending probability) whose probability mass reaches `top_p`."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kept = logits.topk(top_k, dim=-1).indices
        masked = torch.full_like(logits, float("-inf"))
        logits = masked.scatter(-1, kept, logits.gather(-1, kept))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass before it already reaches top_p; the most likely always stays
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[..., 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
