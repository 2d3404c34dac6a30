"""`SparseAttention`: the drop-in NSA module (the seed's API), with incremental decoding.

Semantics: docs/nsa-spec.md. The module composes the public ops of `nsa_codegen.kernels` (compressed
attention, top-k selection, selected attention, sliding window, the gated combine's weighted sum); each
op runs the generated Triton kernels on CUDA when `use_triton_kernel` is set, else the pure-PyTorch
reference, and reports the path it took in `last_paths`. Projections, compression MLPs, rotary
embedding and the combine's gate (Linear and sigmoid) are PyTorch.

Parameter names and shapes equal those of native-sparse-attention-pytorch 0.2.3, so its `state_dict`
loads into this module (`load_state_dict(..., strict=True)`).
"""
from __future__ import annotations

import copy
import numbers

import torch
from torch import Tensor, nn

from . import reference
from .kernels import combine as combine_ops
from .kernels import compressed as compressed_ops
from .kernels import decode as decode_ops
from .kernels import selected as selected_ops
from .kernels import topk as topk_ops
from .kernels import window as window_ops

__all__ = ["SparseAttention", "StaticCache", "DecodeCache", "CacheBuffers", "check_lengths"]

BRANCHES = ("compressed", "selected", "sliding")


class CacheBuffers:
    """What every preallocated decoding cache shares: per-sequence lengths on the device, and on the host
    the capacity and the number of tokens the calls so far have appended.

    `lengths` (b,) int64, on the buffers' device: sequence i holds tokens [0, lengths[i]). `seq_len` (host
    int) counts the positions appended by the calls (the padded prompt length plus one per decoded token):
    an upper bound of every length that the host knows without reading the device, and the length of
    every sequence when the prompt was not given per-sequence lengths. `max_seq_len` is the capacity. A
    cache made by `init_cache` never reallocates (its tensors keep their addresses, as a CUDA graph needs)
    and refuses to go past its capacity; one made by `forward(..., return_cache=True)` without a cache is
    `growable`: full, it doubles its capacity (one copy of the buffers; amortized O(1) per token).
    """

    lengths: Tensor
    max_seq_len: int
    seq_len: int
    growable: bool

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    def reset(self) -> None:
        """Empty every sequence; the next call with this cache is a prefill. Nothing is reallocated."""
        self.lengths.zero_()
        self.seq_len = 0

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more positions (host-side count, no device read): grow a growable cache,
        else raise when the capacity would be exceeded."""
        need = self.seq_len + extra
        if need <= self.max_seq_len:
            return
        if not self.growable:
            raise ValueError(f"cache is full: {self.seq_len} of max_seq_len={self.max_seq_len} positions are "
                             f"written and {extra} more were given; make the cache with init_cache(batch, "
                             f"max_seq_len >= {need})")
        capacity = max(need, 2 * self.max_seq_len)
        self._grow(capacity)
        self.max_seq_len = capacity

    def _grow(self, capacity: int) -> None:
        raise NotImplementedError

    @staticmethod
    def _grown(buffer: Tensor, rows: int) -> Tensor:
        """`buffer` (b, r, ...) copied into a zero buffer of `rows` >= r rows."""
        out = buffer.new_zeros((buffer.shape[0], rows, *buffer.shape[2:]))
        out[:, :buffer.shape[1]] = buffer
        return out


def check_lengths(lengths, b: int, n: int, device) -> Tensor:
    """Per-sequence prompt lengths of a prefill: an integer tensor (b,) on the input's device with values in
    [0, n]; returned as int64. Read on the host: a prefill may synchronize (decoding steps do not)."""
    if not isinstance(lengths, Tensor) or tuple(lengths.shape) != (b,) or lengths.dtype.is_floating_point or \
            lengths.dtype == torch.bool or lengths.is_complex():
        got = (f"{lengths.dtype} tensor of shape {tuple(lengths.shape)}" if isinstance(lengths, Tensor)
               else type(lengths).__name__)
        raise ValueError(f"lengths must be an integer tensor of shape (batch,) = ({b},), got {got}")
    if lengths.device != device:
        raise ValueError(f"lengths is on {lengths.device} but inp is on {device}")
    lengths = lengths.long()
    if b and bool(((lengths < 0) | (lengths > n)).any()):
        raise ValueError(f"lengths must lie in [0, {n}] (the prompt's padded length), got {lengths.tolist()}")
    return lengths


class StaticCache(CacheBuffers):
    """Preallocated decoding state of one `SparseAttention` layer (spec section 8) for `batch` sequences of
    up to `max_seq_len` tokens each; made by `SparseAttention.init_cache`, updated in place by forward.

    Buffers, batch first, bnhd (N = max_seq_len, K kv heads, d head dim, l / s compress block size /
    stride, M memory rows):
      `k`, `v`: (b, N, K, d) rotated keys and values; row t of sequence i is token t (t < lengths[i]).
      `ck`, `cv`: (b, M + N // s, K, d) the memory rows, then compressed block w in row M + w
        (w < lengths[i] // s).
      `raw_k`, `raw_v`: (b, l, K, d) the unrotated key / value rows of the last l tokens, token t in row
        t % l, zero rows for positions < 0: the next compression window.
    Rows past a sequence's length hold finite values that every step masks out.
    """

    def __init__(self, batch: int, max_seq_len: int, *, kv_heads: int, dim_head: int, compress_block_size: int,
                 stride: int, num_mem: int, device, dtype, growable: bool = False):
        shape = (batch, max_seq_len, kv_heads, dim_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.ck = torch.zeros((batch, num_mem + max_seq_len // stride, kv_heads, dim_head), device=device, dtype=dtype)
        self.cv = torch.zeros_like(self.ck)
        self.raw_k = torch.zeros((batch, compress_block_size, kv_heads, dim_head), device=device, dtype=dtype)
        self.raw_v = torch.zeros_like(self.raw_k)
        self.lengths = torch.zeros(batch, device=device, dtype=torch.long)
        self.batch_index = torch.arange(batch, device=device)  # the batch rows of every in-place write
        self.max_seq_len, self.seq_len, self.growable = max_seq_len, 0, growable
        self.stride, self.num_mem = stride, num_mem

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def _grow(self, capacity: int) -> None:
        self.k, self.v = self._grown(self.k, capacity), self._grown(self.v, capacity)
        rows = self.num_mem + capacity // self.stride
        self.ck, self.cv = self._grown(self.ck, rows), self._grown(self.cv, rows)

    def __repr__(self) -> str:
        return (f"StaticCache(batch={self.batch}, max_seq_len={self.max_seq_len}, seq_len={self.seq_len}, "
                f"growable={self.growable}, dtype={self.dtype}, device={self.device})")


# the type forward(..., return_cache=True) returns, under the name code importing it already uses
DecodeCache = StaticCache


class RotaryFreqs(nn.Module):
    """Holds `freqs` (d/2,) under the name `rotary_emb.freqs`, as the public package does."""

    def __init__(self, dim_head: int):
        super().__init__()
        self.freqs = nn.Parameter(reference.rotary_freqs(dim_head), requires_grad=False)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        return reference.apply_rotary(x, self.freqs, offset=offset)


# --------------------------------------------------------------------------------------------------
# argument checks: every message names the argument and what is allowed


def _int_arg(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def _module_arg(name: str, value):
    if value is not None and not isinstance(value, nn.Module):
        raise ValueError(f"{name} must be None or an nn.Module, got {type(value).__name__}")
    return value


class SparseAttention(nn.Module):
    """Native Sparse Attention: compressed + selected + sliding-window branches, gated.

    Input and output (b, n, dim). `compress_mlp`, if given, maps (b, kv_heads, C, l, dim_head) ->
    (b, kv_heads, C, dim_head) (deep-copied for keys and for values); `strategy_combine_mlp`, if
    given, maps (b, n, dim) -> (b, n, 3 * heads) laid out (heads, [compressed, selected, sliding]).
    """

    def __init__(
        self,
        dim,
        dim_head,
        heads,
        sliding_window_size,
        compress_block_size,
        selection_block_size,
        num_selected_blocks,
        kv_heads=None,
        num_compressed_mem_kv=1,
        causal=False,
        norm=True,
        use_diff_topk=False,
        use_triton_kernel=True,
        interpolated_importance_score=False,
        query_heads_share_selected_kv=True,
        compress_mlp=None,
        compress_mlp_expand_factor=1.0,
        strategy_combine_mlp=None,
        compress_block_sliding_stride=None,
    ):
        super().__init__()
        dim = _int_arg("dim", dim, 1)
        dim_head = _int_arg("dim_head", dim_head, 1)
        if dim_head % 2:
            raise ValueError(f"dim_head must be even (rotary rotates pairs), got {dim_head}")
        heads = _int_arg("heads", heads, 1)
        kv_heads = heads if kv_heads is None else _int_arg("kv_heads", kv_heads, 1)
        if heads % kv_heads:
            raise ValueError(f"heads ({heads}) must be divisible by kv_heads ({kv_heads}); "
                             f"allowed kv_heads: divisors of heads")
        self.sliding_window_size = _int_arg("sliding_window_size", sliding_window_size, 0)
        l = _int_arg("compress_block_size", compress_block_size, 1)
        if compress_block_sliding_stride is None:
            compress_block_sliding_stride = l
        s = _int_arg("compress_block_sliding_stride", compress_block_sliding_stride, 1)
        if s > l:
            raise ValueError(f"compress_block_sliding_stride ({s}) must be in [1, compress_block_size "
                             f"= {l}]")
        self.selection_block_size = _int_arg("selection_block_size", selection_block_size, 1)
        self.num_selected_blocks = _int_arg("num_selected_blocks", num_selected_blocks, 0)
        num_mem = _int_arg("num_compressed_mem_kv", num_compressed_mem_kv, 1)
        _module_arg("compress_mlp", compress_mlp)
        _module_arg("strategy_combine_mlp", strategy_combine_mlp)

        self.dim, self.dim_head, self.heads, self.kv_heads = dim, dim_head, heads, kv_heads
        self.groups = heads // kv_heads
        self.scale = dim_head ** -0.5
        self.compress_block_size, self.compress_block_sliding_stride = l, s
        self.num_mem_compress_kv = num_mem
        self.causal = bool(causal)
        self.use_diff_topk = bool(use_diff_topk)
        self.use_triton_kernel = bool(use_triton_kernel)
        self.interpolated_importance_score = bool(interpolated_importance_score)
        self.query_heads_share_selected_kv = bool(query_heads_share_selected_kv)
        self.last_paths: dict[str, str] = {}

        # 0. projections
        self.norm = nn.RMSNorm(dim) if norm else nn.Identity()
        self.qkv_split = (heads * dim_head, kv_heads * dim_head, kv_heads * dim_head)
        self.to_qkv = nn.Linear(dim, sum(self.qkv_split), bias=False)

        # 1. compression: memory rows, intra-block positions (start at zero), phi_k / phi_v
        self.compress_mem_kv = nn.Parameter(torch.zeros(2, kv_heads, num_mem, dim_head))
        self.k_intrablock_positions = nn.Parameter(torch.zeros(kv_heads, l, dim_head))
        self.v_intrablock_positions = nn.Parameter(torch.zeros(kv_heads, l, dim_head))
        if compress_mlp is None:
            if not isinstance(compress_mlp_expand_factor, numbers.Real) or isinstance(
                    compress_mlp_expand_factor, bool):
                raise ValueError(f"compress_mlp_expand_factor must be a positive number, got "
                                 f"{compress_mlp_expand_factor!r}")
            hidden = int(compress_mlp_expand_factor * l * dim_head)
            if hidden < 1:
                raise ValueError(f"compress_mlp_expand_factor must make the hidden width "
                                 f"int(factor * compress_block_size * dim_head) >= 1, got "
                                 f"{compress_mlp_expand_factor!r} (width {hidden})")
            compress_mlp = nn.Sequential(
                nn.Flatten(start_dim=-2),          # (b, K, C, l, d) -> (b, K, C, l*d), (l d) order
                nn.Linear(l * dim_head, hidden),
                nn.ReLU(),
                nn.Linear(hidden, dim_head),
            )
        self.k_compress = copy.deepcopy(compress_mlp)
        self.v_compress = copy.deepcopy(compress_mlp)

        # 3. rotary (selected and sliding branches)
        self.rotary_emb = RotaryFreqs(dim_head)

        # 7. gated combine: weight 0, bias [-2, -2, 2] per head (starts on the sliding window)
        if strategy_combine_mlp is None:
            strategy_combine_mlp = nn.Linear(dim, 3 * heads)
            nn.init.zeros_(strategy_combine_mlp.weight)
            with torch.no_grad():
                strategy_combine_mlp.bias.copy_(torch.tensor([-2.0, -2.0, 2.0] * heads))
        self.to_strategy_combine = nn.Sequential(strategy_combine_mlp, nn.Sigmoid())
        self.combine_heads = nn.Linear(heads * dim_head, dim, bias=False)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, "
                f"dim_head={self.dim_head}, causal={self.causal}, window={self.sliding_window_size}, "
                f"compress={self.compress_block_size}/{self.compress_block_sliding_stride}, "
                f"select={self.num_selected_blocks}x{self.selection_block_size}")

    # ----------------------------------------------------------------------------------------------
    # public entry point

    def forward(self, inp: Tensor, cache: StaticCache | None = None, return_cache: bool = False,
                lengths: Tensor | None = None):
        """(b, n, dim) -> (b, n, dim); with `return_cache`, also the decoding cache (causal only).

        `cache` (a `StaticCache`, causal only) is updated in place: on an empty cache (`init_cache`, or after
        `reset()`) `inp` is the prompt, run in parallel (a prefill); otherwise `inp` holds the next n >= 1
        tokens of every sequence, decoded one position at a time, and each output equals the parallel
        forward's output at that position. `return_cache=True` without a cache prefills a new growable
        cache. `lengths` (b,) integer, with a prefill only: sequence i's prompt is `inp[i, :lengths[i]]`
        (outputs at or after a sequence's length are padding); decoding then continues each sequence at its
        own length.
        """
        self._check_input(inp)
        if (cache is not None or return_cache) and not self.causal:
            arg = "cache" if cache is not None else "return_cache"
            raise ValueError(f"{arg} is only allowed on a causal module (causal=True); decoding "
                             f"a non-causal module is undefined")
        if cache is not None:
            self._check_cache(inp, cache)
        if lengths is not None:
            if cache is None and not return_cache:
                raise ValueError("lengths is only used to prefill a cache (cache=... or return_cache=True)")
            if cache is not None and cache.seq_len:
                raise ValueError(f"lengths is only allowed with a prefill (an empty cache); this cache holds "
                                 f"{cache.seq_len} positions: decoding appends the next tokens to every sequence")
        if cache is None:
            if not return_cache:
                return self._parallel(inp)[0]
            out, cache = self._prefill(inp, None, lengths)
        elif cache.seq_len == 0:
            out, _ = self._prefill(inp, cache, lengths)
        else:
            out = self._decode(inp, cache)
        return (out, cache) if return_cache else out

    def init_cache(self, batch: int, max_seq_len: int, device=None, dtype=None) -> StaticCache:
        """An empty preallocated decoding cache for `batch` sequences of up to `max_seq_len` tokens (causal
        modules only). `device` / `dtype` default to the parameters'; under autocast pass the autocast dtype
        (the cache holds what the projections produce). Pass it as `cache=`: the first call prefills the
        prompt, later calls decode; every call updates it in place and never reallocates it."""
        if not self.causal:
            raise ValueError("init_cache is only allowed on a causal module (causal=True); decoding a non-causal "
                             "module is undefined")
        batch = _int_arg("batch", batch, 1)
        max_seq_len = _int_arg("max_seq_len", max_seq_len, 1)
        weight = self.to_qkv.weight
        device = weight.device if device is None else torch.device(device)
        dtype = weight.dtype if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype (float32, float16, bfloat16, ...), got {dtype!r}")
        return self._new_cache(batch, max_seq_len, device, dtype, growable=False)

    def _new_cache(self, batch: int, max_seq_len: int, device, dtype, growable: bool) -> StaticCache:
        cache = StaticCache(batch, max_seq_len, kv_heads=self.kv_heads, dim_head=self.dim_head,
                            compress_block_size=self.compress_block_size, stride=self.compress_block_sliding_stride,
                            num_mem=self.num_mem_compress_kv, device=device, dtype=dtype, growable=growable)
        self._write_memory_rows(cache)
        return cache

    # ----------------------------------------------------------------------------------------------
    # parallel path

    def _parallel(self, inp: Tensor):
        """(out, parts): parts holds what a prefill writes into a cache (rotated keys, values, compressed
        rows, unrotated keys)."""
        self.last_paths = {}
        hx = self.norm(inp)
        q, k, v = self._project(hx)
        if inp.shape[1] == 0:  # empty prompt: no attention; shapes (and the cache) stay defined
            ck = cv = k
            rq, rk = q, k
            branch_out = (q, q, q)
            self.last_paths = dict.fromkeys(BRANCHES, "none")
        else:
            ck, cv = self._compress(k, v)
            ck_all, cv_all = reference.prepend_memory(ck, cv, self.compress_mem_kv)
            rq, rk = self.rotary_emb(q), self.rotary_emb(k)
            o_cmp = self._compressed_branch(q, ck_all, cv_all)
            o_slc = self._selected_branch(rq, rk, v, q, ck_all)
            o_swa = self._sliding_branch(rq, rk, v)
            branch_out = (o_cmp, o_slc, o_swa)
        out = self._combine(hx, *branch_out)
        return out, dict(rk=rk, v=v, ck=ck, cv=cv, k=k)

    def _project(self, hx: Tensor):
        b, n, _ = hx.shape
        q, k, v = self.to_qkv(hx).split(self.qkv_split, dim=-1)
        return (q.reshape(b, n, self.heads, self.dim_head),
                k.reshape(b, n, self.kv_heads, self.dim_head),
                v.reshape(b, n, self.kv_heads, self.dim_head))

    def _compress(self, k: Tensor, v: Tensor, stride: int | None = None):
        """Compressed keys/values (b, C, K, d) without memory rows (spec 1)."""
        l, s = self.compress_block_size, stride or self.compress_block_sliding_stride
        ck = reference.compress(k, self.k_intrablock_positions, self.k_compress, l, s)
        cv = reference.compress(v, self.v_intrablock_positions, self.v_compress, l, s)
        expected = (k.shape[0], k.shape[1] // s, self.kv_heads, self.dim_head)
        if tuple(ck.shape) != expected or tuple(cv.shape) != expected:
            raise ValueError(f"compress_mlp must map (b, kv_heads, C, compress_block_size, dim_head) "
                             f"to (b, kv_heads, C, dim_head); got compressed shape {tuple(ck.shape)}, "
                             f"expected {expected} in (b, C, kv_heads, dim_head) layout")
        return ck, cv

    def _op_kwargs(self) -> dict:
        """Every op routes itself (generated kernels on CUDA when `use_triton_kernel`, else the
        reference) and records the path it took in `last_paths`."""
        return dict(use_kernels=bool(self.use_triton_kernel), paths=self.last_paths)

    def _compressed_branch(self, q: Tensor, ck_all: Tensor, cv_all: Tensor, query_offset: int = 0) -> Tensor:
        """Spec 2 over [memory; compressed] keys and values."""
        out, _ = compressed_ops.compressed_attention(
            q, ck_all, cv_all, num_mem=self.num_mem_compress_kv, block_size=self.compress_block_size,
            stride=self.compress_block_sliding_stride, causal=self.causal, scale=self.scale,
            query_offset=query_offset, return_logits=False, **self._op_kwargs())
        return out

    def _select(self, q: Tensor, ck_all: Tensor, query_offset: int = 0):
        """Spec 4: (block_idx, block_valid, values), each (b, n, Hs, kk); kk may be 0. q is unrotated,
        ck_all the compressed keys with their memory rows first."""
        b, n = q.shape[:2]
        Hs = self.kv_heads if self.query_heads_share_selected_kv else self.heads
        if self.num_selected_blocks == 0 or ck_all.shape[1] == self.num_mem_compress_kv:
            idx = torch.zeros(b, n, Hs, 0, dtype=torch.long, device=q.device)
            self.last_paths["topk"] = "none"
            return idx, idx.bool(), q.new_zeros(b, n, Hs, 0, dtype=torch.float32)
        kw = dict(num_mem=self.num_mem_compress_kv, compress_block_size=self.compress_block_size,
                  stride=self.compress_block_sliding_stride, selection_block_size=self.selection_block_size,
                  num_selected=self.num_selected_blocks, causal=self.causal,
                  share=self.query_heads_share_selected_kv, scale=self.scale,
                  interpolated=self.interpolated_importance_score, query_offset=query_offset)
        return topk_ops.select_topk(q, ck_all, **kw, **self._op_kwargs())

    def _selected_branch(self, rq: Tensor, rk: Tensor, v: Tensor, q: Tensor, ck_all: Tensor,
                         query_offset: int = 0) -> Tensor:
        """Spec 4-5: block selection from q and the compressed keys, then selected attention.
        `query_offset` > 0 only when decoding."""
        b, n = rq.shape[:2]
        idx, valid, values = self._select(q, ck_all, query_offset)
        gates = None
        if idx.shape[-1] == 0:
            if not self.causal:  # 5b: block-diagonal; causal gets its own block from the op
                idx, valid = reference.block_diagonal_selection(
                    b, n, idx.shape[2], self.selection_block_size, rq.device)
        elif self.use_diff_topk:
            gates = reference.diff_topk_gates(values)  # forward value 1, gradient to the scores
        kw = dict(block_size=self.selection_block_size, causal=self.causal, scale=self.scale,
                  query_offset=query_offset)
        return selected_ops.selected_attention(rq, rk, v, idx, valid, gates, **kw, **self._op_kwargs())

    def _sliding_branch(self, rq: Tensor, rk: Tensor, v: Tensor, query_offset: int = 0) -> Tensor:
        """Spec 6."""
        kw = dict(window=self.sliding_window_size, causal=self.causal, scale=self.scale, query_offset=query_offset)
        return window_ops.sliding_window_attention(rq, rk, v, **kw, **self._op_kwargs())

    def _combine(self, hx: Tensor, o_cmp: Tensor, o_slc: Tensor, o_swa: Tensor):
        """Spec 7: sigmoid gates laid out (h s), weighted sum (one op: a single pass over the branch
        outputs on the kernels), merge heads, output projection."""
        b, n = hx.shape[:2]
        gates = self.to_strategy_combine(hx)
        if gates.shape[-1] != 3 * self.heads:
            raise ValueError(f"strategy_combine_mlp must map (b, n, dim) to (b, n, 3 * heads = "
                             f"{3 * self.heads}), got last dim {gates.shape[-1]}")
        gates = gates.reshape(b, n, 3 * self.heads).to(o_cmp.dtype)
        out = combine_ops.gated_combine(o_cmp, o_slc, o_swa, gates, **self._op_kwargs())
        return self.combine_heads(out.reshape(b, n, self.heads * self.dim_head))

    # ----------------------------------------------------------------------------------------------
    # incremental decoding (spec 8) from a preallocated cache

    def _projected_dtype(self, inp: Tensor) -> torch.dtype:
        """The dtype of q, k, v (what a cache holds): the input's, or the autocast dtype under autocast."""
        if torch.is_autocast_enabled(inp.device.type):
            return torch.get_autocast_dtype(inp.device.type)
        return inp.dtype

    @torch.no_grad()
    def _write_memory_rows(self, cache: StaticCache) -> None:
        """The memory rows (spec 1) in front of the compressed rows, from the current parameters."""
        M = self.num_mem_compress_kv
        mem = self.compress_mem_kv.to(device=cache.device, dtype=cache.dtype)
        cache.ck[:, :M] = mem[0].transpose(0, 1)
        cache.cv[:, :M] = mem[1].transpose(0, 1)

    def _prefill(self, inp: Tensor, cache: StaticCache | None, lengths: Tensor | None):
        """The prompt in parallel, then its keys, values, compressed rows and compression tail written into
        `cache` (a new growable one when None). Returns (out, cache)."""
        b, n = inp.shape[:2]
        if cache is not None:
            cache.reserve(n)
        if lengths is None:
            lengths = torch.full((b,), n, device=inp.device, dtype=torch.long)
        else:
            lengths = check_lengths(lengths, b, n, inp.device)
        out, parts = self._parallel(inp)
        if cache is None:
            cache = self._new_cache(b, max(2 * n, 64), inp.device, parts["k"].dtype, growable=True)
        l, s, M = self.compress_block_size, self.compress_block_sliding_stride, self.num_mem_compress_kv
        with torch.no_grad():
            self._write_memory_rows(cache)
            cache.k[:, :n] = parts["rk"]
            cache.v[:, :n] = parts["v"]
            if n // s:
                cache.ck[:, M:M + n // s] = parts["ck"]
                cache.cv[:, M:M + n // s] = parts["cv"]
            # compression tail: tokens [len - l, len) of each sequence, token t in row t % l, zero rows for t < 0
            tok = lengths[:, None] - l + torch.arange(l, device=inp.device)  # (b, l)
            if n:
                bi = cache.batch_index[:, None]
                rows = tok.clamp(0, n - 1)
                keep = (tok >= 0)[:, :, None, None]
                cache.raw_k[bi, tok % l] = torch.where(keep, parts["k"][bi, rows], 0).to(cache.dtype)
                cache.raw_v[bi, tok % l] = torch.where(keep, parts["v"][bi, rows], 0).to(cache.dtype)
            else:
                cache.raw_k.zero_()
                cache.raw_v.zero_()
            cache.lengths.copy_(lengths)
        cache.seq_len = n
        return out, cache

    def _decode(self, inp: Tensor, cache: StaticCache) -> Tensor:
        """The n tokens of `inp`, one position per step."""
        if inp.shape[1] == 0:
            return self._parallel(inp)[0]
        cache.reserve(inp.shape[1])
        return torch.cat([self._step(inp[:, i:i + 1], cache) for i in range(inp.shape[1])], dim=1)

    @torch.no_grad()
    def _step(self, inp: Tensor, cache: StaticCache) -> Tensor:
        """One token per sequence at position t = lengths[i]: in-place writes at device indices, static
        shapes, no host synchronization (a CUDA graph can capture it). Every rule depends only on the query's
        own position, so the masks over the whole buffers give the parallel forward's output."""
        self.last_paths = {}
        l, s, M = self.compress_block_size, self.compress_block_sliding_stride, self.num_mem_compress_kv
        hx = self.norm(inp)
        q, k, v = self._project(hx)  # (b, 1, H, d), (b, 1, K, d)
        pos = cache.lengths  # (b,): the new token's position
        bi = cache.batch_index
        rq = reference.apply_rotary_at(q, self.rotary_emb.freqs, pos[:, None])[:, 0]
        rk = reference.apply_rotary_at(k, self.rotary_emb.freqs, pos[:, None])[:, 0]
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
        cache.k.index_put_((bi, pos), rk)
        cache.v.index_put_((bi, pos), v)
        cache.raw_k.index_put_((bi, pos % l), k)
        cache.raw_v.index_put_((bi, pos % l), v)

        # compressed branch: the memory rows and the pos // s blocks that close before pos (spec 2)
        kw = dict(scale=self.scale, **self._op_kwargs())
        o_cmp = decode_ops.decode_range_attention(q, cache.ck, cache.cv, torch.zeros_like(pos), M + pos // s,
                                                  max_keys=cache.ck.shape[1], branch="compressed", **kw)
        idx, valid = self._decode_select(q, cache, pos)
        o_slc = decode_ops.decode_selected_attention(rq, cache.k, cache.v, idx, valid, pos,
                                                     block_size=self.selection_block_size, **kw)
        W = self.sliding_window_size
        o_swa = decode_ops.decode_range_attention(rq, cache.k, cache.v, (pos - W).clamp(min=0), pos + 1,
                                                  max_keys=W + 1, branch="sliding", **kw)

        self._compress_step(cache, pos)
        cache.lengths.add_(1)
        cache.seq_len += 1
        return self._combine(hx, o_cmp[:, None], o_slc[:, None], o_swa[:, None])

    def _decode_select(self, q: Tensor, cache: StaticCache, pos: Tensor):
        """Spec 4 for the decoded tokens: (block_idx, block_valid) (b, Hs, kk), kk static. The reference on
        every device (static shapes, no host read): the top-k kernels take one query offset for the batch."""
        idx, valid, _ = reference.decode_select_topk(
            q, cache.ck, pos, num_mem=self.num_mem_compress_kv, stride=self.compress_block_sliding_stride,
            selection_block_size=self.selection_block_size, num_selected=self.num_selected_blocks,
            share=self.query_heads_share_selected_kv, scale=self.scale,
            interpolated=self.interpolated_importance_score, seq_len=cache.max_seq_len)
        self.last_paths["topk"] = "reference"
        return idx, valid

    def _compress_step(self, cache: StaticCache, pos: Tensor) -> None:
        """Compressed block w = (pos + 1) // s - 1 closes at pos when (pos + 1) % s == 0: it is computed for
        every sequence and written where it closes (its row is rewritten unchanged elsewhere). It is
        visible from pos + 1 on."""
        l, s, M = self.compress_block_size, self.compress_block_sliding_stride, self.num_mem_compress_kv
        if cache.ck.shape[1] == M:  # max_seq_len < s: no block closes within the capacity
            return
        bi = cache.batch_index
        tok = pos[:, None] + 1 - l + torch.arange(l, device=pos.device)  # (b, l): the window's tokens
        keep = (tok >= 0)[:, :, None, None]
        win_k = torch.where(keep, cache.raw_k[bi[:, None], tok % l], 0)
        win_v = torch.where(keep, cache.raw_v[bi[:, None], tok % l], 0)
        new_ck, new_cv = self._compress(win_k, win_v, stride=l)  # (b, 1, K, d)
        closes = ((pos + 1) % s == 0)[:, None, None]
        row = M + ((pos + 1) // s - 1).clamp(min=0)
        cache.ck.index_put_((bi, row), torch.where(closes, new_ck[:, 0].to(cache.dtype), cache.ck[bi, row]))
        cache.cv.index_put_((bi, row), torch.where(closes, new_cv[:, 0].to(cache.dtype), cache.cv[bi, row]))

    # ----------------------------------------------------------------------------------------------
    # input checks

    def _check_input(self, inp):
        if not isinstance(inp, Tensor):
            raise ValueError(f"inp must be a torch.Tensor of shape (batch, seq_len, dim={self.dim}), "
                             f"got {type(inp).__name__}")
        if inp.ndim != 3:
            raise ValueError(f"inp must have rank 3 (batch, seq_len, dim={self.dim}), got shape "
                             f"{tuple(inp.shape)}")
        if inp.shape[-1] != self.dim:
            raise ValueError(f"inp last dim must equal dim={self.dim}, got shape {tuple(inp.shape)}")
        if not inp.is_floating_point():
            raise ValueError(f"inp dtype must be floating point (float32, float16, bfloat16, ...), "
                             f"got {inp.dtype}")
        weight = self.to_qkv.weight
        if inp.dtype != weight.dtype and not torch.is_autocast_enabled(inp.device.type):
            raise ValueError(f"inp dtype {inp.dtype} differs from the module's parameters ({weight.dtype}): "
                             f"convert one to the other (module.to({inp.dtype}) or inp.to({weight.dtype})), "
                             f"or run under torch.autocast")
        if inp.device != weight.device:
            raise ValueError(f"inp is on {inp.device} but the module's parameters are on {weight.device}")

    def _check_cache(self, inp: Tensor, cache) -> None:
        if not isinstance(cache, StaticCache):
            raise ValueError(f"cache must be the StaticCache made by init_cache(...) or returned by forward(..., "
                             f"return_cache=True), got {type(cache).__name__}")
        b = inp.shape[0]
        if cache.batch != b:
            raise ValueError(f"cache was made for batch {cache.batch}, inp has batch {b}")
        K, d, l, s, M = (self.kv_heads, self.dim_head, self.compress_block_size, self.compress_block_sliding_stride,
                         self.num_mem_compress_kv)
        if (tuple(cache.k.shape[2:]) != (K, d) or cache.raw_k.shape[1] != l or cache.stride != s
                or cache.num_mem != M):
            raise ValueError(f"cache holds kv_heads={cache.k.shape[2]}, dim_head={cache.k.shape[3]}, "
                             f"compress_block_size={cache.raw_k.shape[1]}, stride={cache.stride}, "
                             f"num_compressed_mem_kv={cache.num_mem}; this module has {K}, {d}, {l}, {s}, {M} "
                             f"(was the cache made by another module?)")
        dtype = self._projected_dtype(inp)
        if cache.device != inp.device or cache.dtype != dtype:
            raise ValueError(f"cache is {cache.dtype} on {cache.device}, but this input projects to {dtype} on "
                             f"{inp.device}: make the cache with init_cache(..., device={str(inp.device)!r}, "
                             f"dtype={dtype})")
