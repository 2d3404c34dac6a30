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
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import reference
from .kernels import combine as combine_ops
from .kernels import compressed as compressed_ops
from .kernels import selected as selected_ops
from .kernels import topk as topk_ops
from .kernels import window as window_ops

__all__ = ["SparseAttention", "DecodeCache"]

BRANCHES = ("compressed", "selected", "sliding")


class DecodeCache(NamedTuple):
    """State carried between decoding steps (spec section 8), all bnhd, batch first.

    `k`, `v`: (b, n, K, d) rotated keys and values of every token so far.
    `ck`, `cv`: (b, n // s, K, d) compressed keys and values (without the memory rows).
    `raw_k`, `raw_v`: (b, (l - s) + n % s, K, d) the unrotated key/value rows
    `[(n // s + 1) * s - l, n)` the next compression window reads; positions < 0 are zero rows,
    exactly the zero padding of the parallel path.
    """

    k: Tensor
    v: Tensor
    ck: Tensor
    cv: Tensor
    raw_k: Tensor
    raw_v: Tensor

    @property
    def seq_len(self) -> int:
        return self.k.shape[1]


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

    def forward(self, inp: Tensor, cache: DecodeCache | None = None, return_cache: bool = False):
        """(b, n, dim) -> (b, n, dim); with `return_cache`, also the decoding cache (causal only).

        With `cache`, `inp` is the single next token (b, 1, dim) and its output equals the parallel
        forward's output at that position.
        """
        self._check_input(inp)
        if (cache is not None or return_cache) and not self.causal:
            arg = "cache" if cache is not None else "return_cache"
            raise ValueError(f"{arg} is only allowed on a causal module (causal=True); decoding "
                             f"a non-causal module is undefined")
        if cache is not None:
            self._check_cache(inp, cache)
            out, new_cache = self._decode_step(inp, cache)
        else:
            out, new_cache = self._parallel(inp, return_cache)
        return (out, new_cache) if return_cache else out

    # ----------------------------------------------------------------------------------------------
    # parallel path

    def _parallel(self, inp: Tensor, return_cache: bool):
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
        cache = self._prompt_cache(rk, v, ck, cv, k, v) if return_cache else None
        return out, cache

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
    # incremental decoding (spec 8)

    def _raw_tail(self, x: Tensor) -> Tensor:
        """Rows [(n // s + 1) * s - l, n) of x (b, n, K, d), zero rows where the index is < 0."""
        n, l, s = x.shape[1], self.compress_block_size, self.compress_block_sliding_stride
        start = (n // s + 1) * s - l
        tail = x[:, max(start, 0):]
        if start < 0:
            tail = torch.cat((tail.new_zeros(x.shape[0], -start, *x.shape[2:]), tail), dim=1)
        return tail

    def _prompt_cache(self, rk, v, ck, cv, k_raw, v_raw) -> DecodeCache:
        return DecodeCache(rk.detach(), v.detach(), ck.detach(), cv.detach(),
                           self._raw_tail(k_raw).detach(), self._raw_tail(v_raw).detach())

    @torch.no_grad()
    def _decode_step(self, inp: Tensor, cache: DecodeCache):
        """One token at position t = cache.seq_len: the same ops as the parallel path, with
        `query_offset=t` (every rule only depends on the query's own position)."""
        self.last_paths = {}
        t = cache.seq_len
        l, s = self.compress_block_size, self.compress_block_sliding_stride
        hx = self.norm(inp)
        q, k, v = self._project(hx)

        # compressed branch over the cached blocks (the t // s blocks that close before t)
        ck_all, cv_all = reference.prepend_memory(cache.ck, cache.cv, self.compress_mem_kv)
        o_cmp = self._compressed_branch(q, ck_all, cv_all, query_offset=t)

        # extend the compression state; a window closing at t is visible from t + 1 on
        raw_k, raw_v = torch.cat((cache.raw_k, k), dim=1), torch.cat((cache.raw_v, v), dim=1)
        ck, cv = cache.ck, cache.cv
        if (t + 1) % s == 0:                                  # raw now holds exactly l rows
            new_ck, new_cv = self._compress(raw_k, raw_v, stride=l)
            ck, cv = torch.cat((ck, new_ck), dim=1), torch.cat((cv, new_cv), dim=1)
            raw_k, raw_v = raw_k[:, s:], raw_v[:, s:]

        rq, rk = self.rotary_emb(q, offset=t), self.rotary_emb(k, offset=t)
        keys, values = torch.cat((cache.k, rk), dim=1), torch.cat((cache.v, v), dim=1)
        o_slc = self._selected_branch(rq, keys, values, q, ck_all, query_offset=t)
        o_swa = self._sliding_branch(rq, keys, values, query_offset=t)

        out = self._combine(hx, o_cmp, o_slc, o_swa)
        return out, DecodeCache(keys, values, ck, cv, raw_k, raw_v)

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

    def _check_cache(self, inp: Tensor, cache):
        if not isinstance(cache, DecodeCache):
            raise ValueError(f"cache must be the DecodeCache returned by forward(..., "
                             f"return_cache=True), got {type(cache).__name__}")
        if inp.shape[1] != 1:
            raise ValueError(f"with a cache, inp must hold exactly one new token (seq_len 1), got "
                             f"seq_len {inp.shape[1]}")
        b, t = inp.shape[0], cache.seq_len
        s, l = self.compress_block_sliding_stride, self.compress_block_size
        kv = (b, self.kv_heads, self.dim_head)
        expected = {"k": (b, t, *kv[1:]), "v": (b, t, *kv[1:]), "ck": (b, t // s, *kv[1:]),
                    "cv": (b, t // s, *kv[1:]), "raw_k": (b, l - s + t % s, *kv[1:]),
                    "raw_v": (b, l - s + t % s, *kv[1:])}
        for name, shape in expected.items():
            got = tuple(getattr(cache, name).shape)
            if got != shape:
                raise ValueError(f"cache.{name} has shape {got}, expected {shape} for this module "
                                 f"and batch {b} (was the cache made by another module or batch?)")
        for name in expected:
            t = getattr(cache, name)
            if t.device != inp.device or (t.dtype != inp.dtype and not torch.is_autocast_enabled(inp.device.type)):
                raise ValueError(f"cache.{name} is {t.dtype} on {t.device}, but inp is {inp.dtype} on {inp.device}: "
                                 f"a cache must come from this module at the input's dtype and device")

