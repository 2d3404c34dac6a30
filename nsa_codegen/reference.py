"""Pure-PyTorch Native Sparse Attention: the oracle for every kernel and the CPU path.

Implements ``shared/docs/nsa-spec.md`` step by step, one function per step, in the layouts of
``docs/interfaces.md``:

- token tensors are (b, n, heads, d); query head ``h`` reads kv head ``h // G``;
- compressed keys/values are (b, M + C, K, d) with the M memory rows first;
- selection tensors are (b, n, Hs, kk) with ``Hs = K`` (shared selection) or ``Hs = H``.

Everything computes in the input dtype (so it doubles as the "low-precision reference" of the
numerics rule); softmaxes, rotary angles and the top-k probabilities upcast to at least fp32.
GQA is handled by viewing queries as (K, G) groups, never by expanding k/v in memory.

Memory: the token-level attentions (selected, sliding) and the token-level score mapping (c) are
chunked over queries; when autograd is recording, each chunk runs under
``torch.utils.checkpoint`` so that backward holds one chunk's intermediates at a time. No (n x n)
tensor and no (n x kk*l' x d)-per-head tensor is ever held whole.

Query positions: every function that takes queries also takes ``query_offset`` (default 0):
query row ``r`` sits at token position ``query_offset + r``. Decoding passes the last position.

The last section holds what the kernels are checked against beyond the outputs above: the
log-sum-exp each kernel returns beside its output, the fused top-k (compressed logits + importance
scores + selection in one call) and the closed-form backwards the custom ops run on CPU.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = [
    "NEG_FACTOR",
    "NULL_LOGIT",
    "VALID_THRESHOLD",
    "neg_value",
    "masked_value",
    "rotary_freqs",
    "apply_rotary",
    "compress_windows",
    "compress",
    "prepend_memory",
    "compressed_visibility",
    "compressed_attention",
    "importance_scores",
    "selection_mapping",
    "num_candidates",
    "select_blocks",
    "diff_topk_gates",
    "block_diagonal_selection",
    "usable_selection",
    "selected_attention",
    "sliding_window_attention",
    "gated_combine",
    "nsa_attention",
    "dense_attention_backward",
    "sliding_window_keys",
    "sliding_window_visible",
    "sliding_window_lse",
    "sliding_window_backward",
    "compressed_logits",
    "compressed_attention_lse",
    "compressed_attention_backward",
    "selected_attention_lse",
    "select_topk",
    "topk_candidate_scores",
    "select_topk_lse",
    "select_topk_backward",
    "apply_rotary_at",
    "decode_range_attention",
    "decode_selected_attention",
    "decode_select_topk",
    "gated_combine_backward",
]

NEG_FACTOR = 10  # invisible logits are -finfo.max / 10
NULL_LOGIT = -1000.0  # the null column of the selection softmax
VALID_THRESHOLD = 1e-10  # a selected block is valid iff its probability > this

# Budget (in elements) for the largest per-chunk intermediate of the chunked functions.
# 2**22 fp32 elements = 16 MiB; a few such tensors live at once per chunk.
CHUNK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------------------------
# helpers


def neg_value(dtype: torch.dtype) -> float:
    """``NEG = -finfo(dtype).max``."""
    return -torch.finfo(dtype).max


def masked_value(dtype: torch.dtype) -> float:
    """The fill of invisible logits / scores: ``NEG / 10`` (finite)."""
    return -torch.finfo(dtype).max / NEG_FACTOR


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in tensors
    )


def _run_chunk(fn: Callable, *args):
    """Run ``fn(*args)``; under autograd, as a non-reentrant checkpoint (recomputed in backward)."""
    if _needs_grad(*args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _chunk_len(n_q: int, per_query: int, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        return max(1, int(chunk_size))
    return max(1, min(max(n_q, 1), CHUNK_ELEMENTS // max(1, per_query)))


def _positions(n: int, offset: int, device) -> Tensor:
    return torch.arange(n, device=device, dtype=torch.long) + int(offset)


def _split_heads_for_rows(H: int, K: int, Hs: int):
    """For selection rows ``Hs`` (K shared, H unshared): (query heads per row, kv head of each row)."""
    if H % K != 0:
        raise ValueError(f"heads {H} not divisible by kv heads {K}")
    G = H // K
    if Hs == K:
        return G, torch.arange(K)
    if Hs == H:
        return 1, torch.arange(H) // G
    raise ValueError(f"selection rows {Hs} must equal kv heads {K} or query heads {H}")


# ----------------------------------------------------------------------------------------------
# 3. rotary


def rotary_freqs(d: int) -> Tensor:
    """(d/2,) float32 frequencies ``10000 ** (-2i/d)`` (bit-identical to rotary-embedding-torch)."""
    return 1.0 / (10000 ** (torch.arange(0, d, 2)[: d // 2].float() / d))


def apply_rotary(x: Tensor, freqs: Tensor, offset: int = 0) -> Tensor:
    """Interleaved-pair RoPE on x (b, n, h, d); position = offset + token index.

    Angles and the rotation are computed in ``promote(x.dtype, freqs.dtype, fp32)``, then cast back
    to ``x.dtype`` (as rotary-embedding-torch does; unlike it, positions are exact integers even for
    bf16/fp16 inputs, as the spec says ``pos`` = token index).
    """
    b, n, h, d = x.shape
    half = freqs.shape[-1]
    if 2 * half != d:
        raise ValueError(f"freqs has {half} entries, head dim {d}")
    cdt = torch.promote_types(_softmax_dtype(x.dtype), freqs.dtype)
    pos = torch.arange(n, device=x.device, dtype=cdt) + offset
    angle = pos[:, None] * freqs.to(device=x.device, dtype=cdt)[None, :]  # (n, d/2)
    cos = angle.cos()[:, None, :]
    sin = angle.sin()[:, None, :]
    x1 = x[..., 0::2].to(cdt)
    x2 = x[..., 1::2].to(cdt)
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    return torch.stack((o1, o2), dim=-1).flatten(-2).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# 1. compression


def compress_windows(x: Tensor, positions: Tensor, block_size: int, stride: int) -> Tensor:
    """x (b, n, K, d), positions (K, l, d) -> windows (b, K, C, l, d) with ``C = n // stride``.

    Window ``w`` holds the original tokens ``[w*s - (l - s), (w+1)*s)``: tokens ``[0, C*s)`` are
    left-padded with ``l - s`` zero rows and read with a strided view (``unfold``); only the final
    ``+ positions`` materializes the windows.
    """
    b, n, K, d = x.shape
    l, s = int(block_size), int(stride)
    if not (0 < s <= l):
        raise ValueError(f"need 0 < stride {s} <= block_size {l}")
    C = n // s
    pos = positions.to(dtype=x.dtype)
    if C == 0:
        return x.new_zeros((b, K, 0, l, d)) + pos[None, :, None]
    xs = x[:, : C * s]
    if l > s:
        xs = F.pad(xs, (0, 0, 0, 0, l - s, 0))  # left-pad the token dim
    win = xs.unfold(1, l, s)  # (b, C, K, d, l), a view
    win = win.permute(0, 2, 1, 4, 3)  # (b, K, C, l, d)
    return win + pos[None, :, None]


def compress(x: Tensor, positions: Tensor, mlp: Callable, block_size: int, stride: int) -> Tensor:
    """x (b, n, K, d) -> compressed (b, C, K, d); ``mlp`` maps (b, K, C, l, d) -> (b, K, C, d)."""
    win = compress_windows(x, positions, block_size, stride)
    out = mlp(win)
    return out.transpose(1, 2).contiguous()


def prepend_memory(ck: Tensor, cv: Tensor, mem: Tensor) -> tuple[Tensor, Tensor]:
    """ck, cv (b, C, K, d), mem (2, K, M, d) -> (b, M + C, K, d) each, memory rows first."""
    b = ck.shape[0]
    mk = mem[0].transpose(0, 1).to(ck.dtype)  # (M, K, d)
    mv = mem[1].transpose(0, 1).to(cv.dtype)
    ck = torch.cat((mk.unsqueeze(0).expand(b, *mk.shape), ck), dim=1)
    cv = torch.cat((mv.unsqueeze(0).expand(b, *mv.shape), cv), dim=1)
    return ck, cv


# ----------------------------------------------------------------------------------------------
# 2. compressed attention


def compressed_visibility(
    n: int, C: int, stride: int, causal: bool, device=None, query_offset: int = 0
) -> Tensor:
    """(n, C) bool: causal -> block ``w`` visible to query ``i`` iff ``e_w = (w+1)*s - 1 < i``."""
    if not causal:
        return torch.ones((n, C), dtype=torch.bool, device=device)
    pos = _positions(n, query_offset, device)
    last = (torch.arange(C, device=device) + 1) * stride - 1
    return last[None, :] < pos[:, None]


def compressed_attention(
    q: Tensor,
    ck: Tensor,
    cv: Tensor,
    *,
    num_mem: int,
    block_size: int,
    stride: int,
    causal: bool,
    scale: float,
    query_offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """Spec 2. q (b, n, H, d) unrotated; ck, cv (b, M + C, K, d) memory rows first.

    Returns ``out`` (b, n, H, d) and ``logits`` (b, n, H, C): the scaled logits of the non-memory
    columns, invisible entries already ``NEG / 10`` (rebuild the mask with ``compressed_visibility``).
    ``block_size`` does not enter the visibility rule (only the stride does); it is accepted for the
    contract's signature.
    """
    del block_size
    b, n, H, d = q.shape
    MC, K = ck.shape[1], ck.shape[2]
    G = H // K
    C = MC - num_mem
    qg = q.reshape(b, n, K, G, d)
    S = torch.einsum("bnkgd,bmkd->bnkgm", qg, ck) * scale  # (b, n, K, G, M + C)
    if causal and C > 0:
        vis = compressed_visibility(n, C, stride, True, q.device, query_offset)
        mask = torch.cat((torch.ones((n, num_mem), dtype=torch.bool, device=q.device), vis), dim=1)
        S = S.masked_fill(~mask[None, :, None, None, :], masked_value(S.dtype))
    P = S.to(_softmax_dtype(S.dtype)).softmax(dim=-1).to(cv.dtype)
    out = torch.einsum("bnkgm,bmkd->bnkgd", P, cv).reshape(b, n, H, d)
    logits = S[..., num_mem:].reshape(b, n, H, C)
    return out, logits


# ----------------------------------------------------------------------------------------------
# 4. importance scores and block selection


def importance_scores(
    logits: Tensor, *, groups: int, share: bool, causal: bool, stride: int, query_offset: int = 0
) -> Tensor:
    """Spec 4.1-4.2. logits (b, n, H, C) -> (b, n, K, C) if ``share`` else (b, n, H, C).

    The shared mean never sums masked values: invisible entries are zeroed, the G heads averaged,
    and the invisible entries refilled with ``NEG / 10``.
    """
    b, n, H, C = logits.shape
    vis = compressed_visibility(n, C, stride, causal, logits.device, query_offset)[None, :, None, :]
    x = logits
    if share and groups > 1:
        if causal:
            x = x.masked_fill(~vis, 0)
        x = x.reshape(b, n, H // groups, groups, C).mean(dim=3)
    if causal:
        x = x.masked_fill(~vis, masked_value(x.dtype))
    return x


def selection_mapping(stride: int, selection_block_size: int, interpolated: bool) -> str:
    """Which mapping of spec 4.4 applies: ``'a'``, ``'b'`` or ``'c'``."""
    if selection_block_size == stride:
        return "a"
    if selection_block_size > stride and selection_block_size % stride == 0 and not interpolated:
        return "b"
    return "c"


def num_candidates(seq_len: int, C: int, stride: int, selection_block_size: int, interpolated: bool) -> int:
    """Number of candidate selection blocks of spec 4.4."""
    m = selection_mapping(stride, selection_block_size, interpolated)
    if m == "a":
        return C
    if m == "b":
        return C // (selection_block_size // stride)
    return -(-seq_len // selection_block_size)


def _candidates_c(
    imp: Tensor, pos: Tensor, *, stride: int, sel: int, U: int, causal: bool, interpolated: bool
) -> Tensor:
    """Mapping (c), token level, for queries at ``pos`` (Q,): imp (b, Q, Hs, C) -> (b, Q, Hs, U)."""
    b, Q, Hs, C = imp.shape
    s = stride
    dev = imp.device
    P = U * sel
    t = torch.arange(P, device=dev)
    V = torch.clamp(pos // s, max=C) if causal else torch.full_like(pos, C)
    # token t is scored iff its compressed block t // s is visible, i.e. t < V * s (<= C * s)
    tvis = t[None, :] < (V * s)[:, None]  # (Q, P)
    if C == 0:
        tok = imp.new_zeros((b, Q, Hs, P))
    elif not interpolated:
        w = torch.clamp(t // s, max=C - 1)
        tok = imp[..., w]  # (b, Q, Hs, P)
    else:
        cdt = _softmax_dtype(imp.dtype)
        x = (t.to(cdt) + 0.5) / s - 0.5  # half-pixel source coordinate (P,)
        vmax = torch.clamp(V - 1, min=0).to(cdt)[:, None]  # (Q, 1)
        xc = torch.minimum(torch.clamp(x[None, :], min=0.0), vmax)  # clamp to [0, V - 1]
        i0 = torch.floor(xc)
        frac = xc - i0
        i0 = i0.long()
        i1 = torch.minimum(i0 + 1, vmax.long())
        src = imp.to(cdt)
        g0 = torch.gather(src, -1, i0[None, :, None, :].expand(b, Q, Hs, P))
        g1 = torch.gather(src, -1, i1[None, :, None, :].expand(b, Q, Hs, P))
        fr = frac[None, :, None, :]
        tok = ((1 - fr) * g0 + fr * g1).to(imp.dtype)
    # average each l' chunk, never summing masked tokens; a chunk with a masked token is masked
    tok = tok.masked_fill(~tvis[None, :, None, :], 0)
    x = tok.reshape(b, Q, Hs, U, sel).mean(dim=-1)
    cvis = tvis.reshape(Q, U, sel).all(dim=-1)
    x = x.masked_fill(~cvis[None, :, None, :], masked_value(x.dtype))
    own = torch.arange(U, device=dev)[None, :] == (pos // sel)[:, None]
    return x.masked_fill(own[None, :, None, :], neg_value(x.dtype))


def _candidates_ab(
    imp: Tensor, pos: Tensor, *, mapping: str, stride: int, sel: int, U: int, causal: bool
) -> Tensor:
    """Mappings (a) and (b) for queries at ``pos`` (Q,): imp (b, Q, Hs, C) -> (b, Q, Hs, U)."""
    if mapping == "a":
        return imp
    b, Q, Hs, C = imp.shape
    s = stride
    dev = imp.device
    r = sel // s
    if causal:
        last = (torch.arange(C, device=dev) + 1) * s - 1
        bvis = (last[None, :] < pos[:, None])[:, : U * r]  # (Q, U*r)
    else:
        bvis = torch.ones((Q, U * r), dtype=torch.bool, device=dev)
    gvis = bvis.reshape(Q, U, r).all(dim=-1)  # (Q, U)
    x = imp[..., : U * r].masked_fill(~bvis[None, :, None, :], 0)
    x = x.reshape(b, Q, Hs, U, r).mean(dim=-1)
    x = x.masked_fill(~gvis[None, :, None, :], masked_value(x.dtype))
    own = torch.arange(U, device=dev)[None, :] == (pos // sel)[:, None]
    return x.masked_fill(own[None, :, None, :], neg_value(x.dtype))


def _select_chunk(imp: Tensor, pos: Tensor, cfg: dict):
    m = cfg["mapping"]
    if m == "c":
        cand = _candidates_c(
            imp, pos, stride=cfg["stride"], sel=cfg["sel"], U=cfg["U"], causal=cfg["causal"],
            interpolated=cfg["interpolated"],
        )
    else:
        cand = _candidates_ab(
            imp, pos, mapping=m, stride=cfg["stride"], sel=cfg["sel"], U=cfg["U"], causal=cfg["causal"]
        )
    cand = cand.to(_softmax_dtype(cand.dtype))
    null = cand.new_full((*cand.shape[:-1], 1), NULL_LOGIT)
    p = torch.cat((null, cand), dim=-1).softmax(dim=-1)[..., 1:]
    # top-k with ties toward the lower block index: a stable descending sort
    vals, idx = torch.sort(p, dim=-1, descending=True, stable=True)
    kk = cfg["kk"]
    vals, idx = vals[..., :kk], idx[..., :kk]
    return vals, idx, vals > VALID_THRESHOLD


def select_blocks(
    imp: Tensor,
    *,
    seq_len: int,
    stride: int,
    compress_block_size: int,
    selection_block_size: int,
    num_selected: int,
    causal: bool,
    interpolated: bool,
    query_offset: int = 0,
    chunk_size: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Spec 4.3-5. imp (b, n_q, Hs, C) -> (block_idx int64, block_valid bool, values) (b, n_q, Hs, kk).

    ``seq_len`` is the token length n (candidates of (c) cover ``ceil(n / l')`` blocks); query row
    ``r`` sits at position ``query_offset + r``. ``kk = 0`` (k == 0, C == 0 or no candidate) means
    5b: ``selected_attention`` then does the causal own block; non-causal callers use
    ``block_diagonal_selection``. ``values`` are the null-column softmax probabilities in
    ``promote(imp.dtype, fp32)``, differentiable w.r.t. ``imp`` (for ``use_diff_topk``).
    ``compress_block_size`` does not enter the selection (only the stride does).
    """
    del compress_block_size
    b, nq, Hs, C = imp.shape
    sel = int(selection_block_size)
    mapping = selection_mapping(stride, sel, interpolated)
    U = num_candidates(seq_len, C, stride, sel, interpolated)
    kk = min(int(num_selected), U) if (num_selected > 0 and C > 0) else 0
    vdt = _softmax_dtype(imp.dtype)
    if kk == 0:
        shape = (b, nq, Hs, 0)
        return (
            torch.zeros(shape, dtype=torch.long, device=imp.device),
            torch.zeros(shape, dtype=torch.bool, device=imp.device),
            imp.new_zeros(shape, dtype=vdt),
        )
    cfg = dict(mapping=mapping, stride=stride, sel=sel, U=U, kk=kk, causal=causal,
               interpolated=interpolated)
    per_query = b * Hs * (U * sel if mapping == "c" else max(U, C)) * 4
    Qc = _chunk_len(nq, per_query, chunk_size)
    pos_all = _positions(nq, query_offset, imp.device)
    outs = [
        _run_chunk(_select_chunk, imp[:, q0 : q0 + Qc], pos_all[q0 : q0 + Qc], cfg)
        for q0 in range(0, nq, Qc)
    ]
    vals = torch.cat([o[0] for o in outs], dim=1)
    idx = torch.cat([o[1] for o in outs], dim=1)
    valid = torch.cat([o[2] for o in outs], dim=1)
    return idx, valid, vals


def diff_topk_gates(values: Tensor) -> Tensor:
    """``use_diff_topk`` gates: forward value 1, gradient of ``values``."""
    return values + (1.0 - values).detach()


def block_diagonal_selection(
    b: int, n: int, Hs: int, block_size: int, device=None, query_offset: int = 0
) -> tuple[Tensor, Tensor]:
    """Spec 5b as a selection: every query selects its own block ``i // l'`` (valid)."""
    own = _positions(n, query_offset, device) // block_size
    idx = own[None, :, None, None].expand(b, n, Hs, 1).contiguous()
    return idx, torch.ones((b, n, Hs, 1), dtype=torch.bool, device=device)


# ----------------------------------------------------------------------------------------------
# 5. selected attention


def usable_selection(block_idx: Tensor, block_valid: Tensor, n: int, block_size: int, causal: bool,
                     query_offset: int = 0) -> Tensor:
    """Spec 5: the selection slots selected attention uses, (b, n_q, Hs, kk) bool. A slot is used iff it is
    valid, its block id lies in ``[0, ceil(n / l'))`` (``n`` keys) and, when causal, the id is before the
    query's own block ``(query_offset + i) // l'`` (the own block enters through the causal own-block term,
    restricted to ``j <= i``). Every other slot is ignored, whatever id it holds.

    The one rule of the reference and of the kernels' launchers (nsa_codegen.kernels.selected), so both
    ignore the same slots. Elementwise on the selection's device, no host sync; the caller's tensors are
    not written."""
    usable = block_valid.to(torch.bool) & (block_idx >= 0) & (block_idx < -(-n // block_size))
    if causal:
        own = (torch.arange(block_idx.shape[1], device=block_idx.device) + query_offset) // block_size
        # a view, not own[:, None, None]: indexing fake CUDA tensors (tracing) fails on a CPU-only build
        usable = usable & (block_idx < own.view(-1, 1, 1))
    return usable


def _selected_chunk(q, block_idx, block_valid, gates, k, v, q0, cfg):
    """Queries [q0, q0 + Q): dense logits against the keys the chunk can reach, masked to the
    selected blocks (+ causal own block). Per chunk (Q x n) per head, never (n x n)."""
    b, Q, H, d = q.shape
    K = k.shape[2]
    G = H // K
    l, causal, scale, Hs, nblk = cfg["l"], cfg["causal"], cfg["scale"], cfg["Hs"], cfg["nblk"]
    dev = q.device
    p0 = cfg["offset"] + q0
    pos = p0 + torch.arange(Q, device=dev)
    nk = k.shape[1]
    if causal:  # no key after the chunk's last query is reachable
        nk = max(0, min(nk, p0 + Q))
    nb = -(-nk // l)
    kc, vc = k[:, :nk], v[:, :nk]
    idx = block_idx.long().clamp(0, nblk - 1)  # ignored slots (valid False) only need an index in range
    valid = block_valid
    # per (query, row) which blocks are selected, and with which gate (valid blocks are distinct)
    cnt = torch.zeros((b, Q, Hs, nblk), dtype=torch.int32, device=dev)
    sel = cnt.scatter_add(-1, idx, valid.to(torch.int32)) > 0
    sel_t = sel[..., :nb, None].expand(b, Q, Hs, nb, l).reshape(b, Q, Hs, nb * l)[..., :nk]
    j = torch.arange(nk, device=dev)
    s = torch.einsum("bqkgd,bjkd->bqkgj", q.reshape(b, Q, K, G, d), kc) * scale  # (b,Q,K,G,nk)
    s = s.reshape(b, Q, Hs, H // Hs, nk)
    if gates is not None and idx.shape[-1]:
        gsum = torch.zeros((b, Q, Hs, nblk), dtype=s.dtype, device=dev).scatter_add(
            -1, idx, gates.to(s.dtype) * valid.to(s.dtype)
        )
        g_t = gsum[..., :nb, None].expand(b, Q, Hs, nb, l).reshape(b, Q, Hs, nb * l)[..., :nk]
    else:
        g_t = None
    if causal:
        same = (j[None, :] // l) == (pos // l)[:, None]  # (Q, nk): the own block
        own = same & (j[None, :] <= pos[:, None])
        mask = (sel_t & ~same[None, :, None, :]) | own[None, :, None, :]
        if g_t is not None:
            g_t = torch.where(same[None, :, None, :], torch.ones_like(g_t), g_t)
    else:
        mask = sel_t
    if g_t is not None:
        s = s * g_t[:, :, :, None, :]
    sdt = _softmax_dtype(s.dtype)
    m = mask[:, :, :, None, :]
    p = s.to(sdt).masked_fill(~m, torch.finfo(sdt).min).softmax(dim=-1).to(vc.dtype)
    o = torch.einsum("bqkgj,bjkd->bqkgd", p.reshape(b, Q, K, G, nk), vc)  # (b, Q, K, G, d)
    if not causal:
        has = mask.any(dim=-1)  # (b, Q, Hs)
        o = o.reshape(b, Q, Hs, H // Hs, d) * has[..., None, None].to(o.dtype)
    return o.reshape(b, Q, H, d)


def selected_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_idx: Tensor,
    block_valid: Tensor,
    gates: Optional[Tensor] = None,
    *,
    block_size: int,
    causal: bool,
    scale: float,
    query_offset: int = 0,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Spec 5. q (b, n_q, H, d), k, v (b, n, K, d) rotated; block_idx/valid/gates (b, n_q, Hs, kk).

    Query ``i`` attends to the tokens ``j < n`` of its valid selected blocks, and when causal also
    to its own block ``i // l'`` restricted to ``j <= i`` (gate 1). Non-causal: a query with no key
    gets 0. Gates multiply the selected keys, computed as ``gate * (q . k)`` on the logit
    (identical math; the gradient reaches ``gates``).

    Only the slots ``usable_selection`` keeps take part: an invalid slot, an id outside
    ``[0, ceil(n / l'))`` and, when causal, an id at or after the query's own block are ignored
    (no key, no gradient to their gates). Precondition (what ``select_blocks`` produces): the used
    blocks of a row are distinct (a duplicate counts once, with the sum of its gates).

    Computed per chunk of queries as dense logits against the keys the chunk can reach (causal:
    ``j`` up to the chunk's last query), masked to the selected tokens; each chunk is
    checkpointed under autograd.
    """
    b, nq, H, d = q.shape
    nk, K = k.shape[1], k.shape[2]
    Hs = block_idx.shape[2]
    _split_heads_for_rows(H, K, Hs)
    l = int(block_size)
    nblk = max(1, -(-nk // l))
    cfg = dict(l=l, causal=causal, scale=scale, Hs=Hs, nblk=nblk, offset=int(query_offset))
    Qc = _chunk_len(nq, b * H * max(nk, 1), chunk_size)
    block_valid = usable_selection(block_idx, block_valid, nk, l, causal, query_offset)
    outs = []
    for q0 in range(0, nq, Qc):
        sl = slice(q0, q0 + Qc)
        g = None if gates is None else gates[:, sl]
        outs.append(
            _run_chunk(_selected_chunk, q[:, sl], block_idx[:, sl], block_valid[:, sl], g, k, v, q0, cfg)
        )
    if not outs:
        return q.new_zeros((b, 0, H, d))
    return torch.cat(outs, dim=1)


# ----------------------------------------------------------------------------------------------
# 6. sliding window


def _sliding_chunk(q, k, v, q0, cfg):
    b, Q, H, d = q.shape
    nk, K = k.shape[1], k.shape[2]
    G = H // K
    W, causal, scale = cfg["window"], cfg["causal"], cfg["scale"]
    dev = q.device
    p0 = cfg["offset"] + q0
    pos = p0 + torch.arange(Q, device=dev)
    lo = max(0, p0 - W)
    hi = min(nk, p0 + Q + (0 if causal else W))
    hi = max(hi, lo)
    kc, vc = k[:, lo:hi], v[:, lo:hi]
    j = lo + torch.arange(hi - lo, device=dev)
    dist = pos[:, None] - j[None, :]  # (Q, Kc)
    mask = (dist <= W) & ((dist >= 0) if causal else (dist >= -W))
    s = torch.einsum("bqkgd,bjkd->bqkgj", q.reshape(b, Q, K, G, d), kc) * scale
    sdt = _softmax_dtype(s.dtype)
    m = mask[None, :, None, None, :]
    p = s.to(sdt).masked_fill(~m, torch.finfo(sdt).min).softmax(dim=-1).to(vc.dtype)
    o = torch.einsum("bqkgj,bjkd->bqkgd", p, vc)
    has = mask.any(dim=-1)[None, :, None, None, None]
    o = o * has.to(o.dtype)
    return o.reshape(b, Q, H, d)


def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int,
    causal: bool,
    scale: float,
    query_offset: int = 0,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Spec 6. q (b, n_q, H, d), k, v (b, n, K, d) rotated.

    Causal: keys ``j`` in ``[i - W, i]``; non-causal: ``|i - j| <= W``; always ``0 <= j < n``.
    (A query with no key, only possible with an out-of-range ``query_offset``, gets 0.)
    """
    b, nq, H, d = q.shape
    W = int(window)
    span = W if causal else 2 * W
    cfg = dict(window=W, causal=causal, scale=scale, offset=int(query_offset))
    if chunk_size is None:
        Qc = 256
        while Qc > 1 and b * H * Qc * (Qc + span + 1) > CHUNK_ELEMENTS:
            Qc //= 2
    else:
        Qc = max(1, int(chunk_size))
    outs = [_run_chunk(_sliding_chunk, q[:, q0 : q0 + Qc], k, v, q0, cfg) for q0 in range(0, nq, Qc)]
    if not outs:
        return q.new_zeros((b, 0, H, d))
    return torch.cat(outs, dim=1)


# ----------------------------------------------------------------------------------------------
# 7. gated combine


def gated_combine(o_cmp: Tensor, o_slc: Tensor, o_swa: Tensor, gates: Tensor) -> Tensor:
    """Spec 7's weighted sum: o_cmp, o_slc, o_swa (b, n, H, d); gates (b, n, 3H) laid out ``(h s)``,
    s = (compressed, selected, sliding), the gate values as the module computes them (after the sigmoid).
    Returns (b, n, H, d) in the inputs' dtype, each product and sum rounded to it (eager PyTorch)."""
    b, n, H, _ = o_cmp.shape
    g = gates.reshape(b, n, H, 3, 1)
    return g[..., 0, :] * o_cmp + g[..., 1, :] * o_slc + g[..., 2, :] * o_swa


# ----------------------------------------------------------------------------------------------
# the functional core


def nsa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ck: Tensor,
    cv: Tensor,
    gate_logits: Tensor,
    *,
    freqs: Tensor,
    num_mem: int,
    compress_block_size: int,
    stride: int,
    selection_block_size: int,
    num_selected: int,
    window: int,
    causal: bool,
    scale: float,
    share: bool = True,
    interpolated: bool = False,
    use_diff_topk: bool = False,
    selected_attention_fn: Optional[Callable] = None,
    return_parts: bool = False,
):
    """Spec 2-7 on already-projected tensors; returns the gated per-head output (b, n, H, d).

    q (b, n, H, d), k, v (b, n, K, d) *unrotated*; ck, cv (b, M + C, K, d) compressed with the
    memory rows first; gate_logits (b, n, 3H) laid out ``(h s)`` or (b, n, H, 3), pre-sigmoid;
    freqs (d/2,) rotary frequencies. ``selected_attention_fn`` (default: this module's
    ``selected_attention``) lets the module plug in ``ops.selected_attention``. Head merge and
    ``combine_heads`` are left to the caller. ``return_parts=True`` also returns a dict with
    ``o_cmp, o_slc, o_swa, gates, block_idx, block_valid, values``.
    """
    b, n, H, d = q.shape
    K = k.shape[2]
    G = H // K
    C = ck.shape[1] - num_mem
    sel_fn = selected_attention if selected_attention_fn is None else selected_attention_fn

    o_cmp, logits = compressed_attention(
        q, ck, cv, num_mem=num_mem, block_size=compress_block_size, stride=stride, causal=causal,
        scale=scale,
    )
    qr = apply_rotary(q, freqs)
    kr = apply_rotary(k, freqs)

    Hs = K if share else H
    idx = torch.zeros((b, n, Hs, 0), dtype=torch.long, device=q.device)
    valid = torch.zeros((b, n, Hs, 0), dtype=torch.bool, device=q.device)
    vals = None
    if num_selected > 0 and C > 0:
        imp = importance_scores(logits, groups=G, share=share, causal=causal, stride=stride)
        idx, valid, vals = select_blocks(
            imp, seq_len=n, stride=stride, compress_block_size=compress_block_size,
            selection_block_size=selection_block_size, num_selected=num_selected, causal=causal,
            interpolated=interpolated,
        )
    sel_gates = None
    if idx.shape[-1] == 0:
        vals = None
        if not causal:  # 5b, non-causal: the whole own block
            idx, valid = block_diagonal_selection(b, n, Hs, selection_block_size, q.device)
    elif use_diff_topk:
        sel_gates = diff_topk_gates(vals)
    o_slc = sel_fn(qr, kr, v, idx, valid, sel_gates, block_size=selection_block_size, causal=causal,
                   scale=scale)
    o_swa = sliding_window_attention(qr, kr, v, window=window, causal=causal, scale=scale)

    g = gate_logits.reshape(b, n, H, 3).sigmoid().to(q.dtype)
    out = gated_combine(o_cmp, o_slc, o_swa, g.reshape(b, n, 3 * H))
    if return_parts:
        return out, dict(o_cmp=o_cmp, o_slc=o_slc, o_swa=o_swa, gates=g, block_idx=idx,
                         block_valid=valid, values=vals)
    return out


# ----------------------------------------------------------------------------------------------
# kernel oracles: the log-sum-exp each kernel returns beside its output, the fused top-k, and the
# closed-form backwards
#
# Every kernel forward returns lse (b, n_q, heads) fp32, the natural-log normalizer of its softmax;
# these compute it from the same visibility rules as the attentions above (fp32, chunked over
# queries). The closed-form backwards compute gradients without autograd: a custom op's CPU kernel
# runs below the dispatcher's autograd layer, where autograd does not record.


def dense_attention_backward(q, k, v, out, dout, scale, key_range, visible, chunk=128):
    """Gradients (dq, dk, dv) of softmax attention from the saved output, without autograd, chunked
    over queries (fp32 accumulation, returned in the inputs' dtypes).

    q (b, n_q, H, d), k, v (b, n_k, K, d) (query head h reads kv head h // G), out and dout like q.
    ``key_range(i0, i1) -> (j0, j1)``: the keys the queries [i0, i1) can see; ``visible(i0, i1, j0,
    j1)`` -> (i1 - i0, j1 - j0) bool mask. A query without keys gets zero gradients.
    """
    b, nq, h, d = q.shape
    kh = k.shape[2]
    g = h // kh
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
    dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
    for i0 in range(0, nq, chunk):
        i1 = min(nq, i0 + chunk)
        j0, j1 = key_range(i0, i1)
        if j1 <= j0:
            continue
        c = i1 - i0
        qi = q[:, i0:i1].float().reshape(b, c, kh, g, d)
        doi = dout[:, i0:i1].float().reshape(b, c, kh, g, d)
        oi = out[:, i0:i1].float().reshape(b, c, kh, g, d)
        kj, vj = k[:, j0:j1].float(), v[:, j0:j1].float()
        s = torch.einsum("bnkgd,bmkd->bnkgm", qi, kj) * scale
        s = s.masked_fill(~visible(i0, i1, j0, j1)[None, :, None, None, :], float("-inf"))
        lse = torch.logsumexp(s, -1, keepdim=True)
        p = torch.exp(s - lse.nan_to_num(posinf=0.0, neginf=0.0)).nan_to_num(0.0)  # rows without keys: 0
        dp = torch.einsum("bnkgd,bmkd->bnkgm", doi, vj)
        ds = p * (dp - (doi * oi).sum(-1, keepdim=True))
        dq[:, i0:i1] = (torch.einsum("bnkgm,bmkd->bnkgd", ds, kj) * scale).reshape(b, c, h, d)
        dk[:, j0:j1] += torch.einsum("bnkgm,bnkgd->bmkd", ds, qi) * scale
        dv[:, j0:j1] += torch.einsum("bnkgm,bnkgd->bmkd", p, doi)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# 6. sliding window


def sliding_window_keys(i0: int, i1: int, nk: int, window: int, causal: bool, query_offset: int = 0):
    """Key range [j0, j1) the queries [i0, i1) (row indices, at positions query_offset + i) can see."""
    j0 = max(0, i0 + query_offset - window)
    j1 = min(nk, i1 + query_offset + (0 if causal else window))
    return j0, j1


def sliding_window_visible(i0: int, i1: int, j0: int, j1: int, window: int, causal: bool,
                           query_offset: int = 0, device=None) -> Tensor:
    """(i1 - i0, j1 - j0) bool: key j visible to query i. Causal: j in [i - W, i]; else |i - j| <= W."""
    pos = torch.arange(i0, i1, device=device) + query_offset
    keys = torch.arange(j0, j1, device=device)
    upper = pos[:, None] if causal else pos[:, None] + window
    return (keys[None, :] >= pos[:, None] - window) & (keys[None, :] <= upper)


def sliding_window_lse(q: Tensor, k: Tensor, *, window: int, causal: bool, scale: float,
                       query_offset: int = 0, chunk: int = 128) -> Tensor:
    """lse (b, n_q, H) fp32 of the sliding-window logits (-inf for a query without keys)."""
    b, nq, h, d = q.shape
    nk, kh = k.shape[1], k.shape[2]
    g = h // kh
    lse = torch.empty((b, nq, h), device=q.device, dtype=torch.float32)
    for i0 in range(0, nq, chunk):
        i1 = min(nq, i0 + chunk)
        j0, j1 = sliding_window_keys(i0, i1, nk, window, causal, query_offset)
        if j1 <= j0:
            lse[:, i0:i1] = float("-inf")
            continue
        vis = sliding_window_visible(i0, i1, j0, j1, window, causal, query_offset, q.device)
        qi = q[:, i0:i1].float().reshape(b, i1 - i0, kh, g, d)
        s = torch.einsum("bnkgd,bmkd->bnkgm", qi, k[:, j0:j1].float()) * scale
        s = s.masked_fill(~vis[None, :, None, None, :], float("-inf"))
        lse[:, i0:i1] = torch.logsumexp(s, -1).reshape(b, i1 - i0, h)
    return lse


def sliding_window_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, *, window: int,
                            causal: bool, scale: float, query_offset: int = 0):
    """(dq, dk, dv) of ``sliding_window_attention`` in closed form (``dense_attention_backward``)."""
    nk = k.shape[1]
    return dense_attention_backward(
        q, k, v, out, dout, scale,
        key_range=lambda i0, i1: sliding_window_keys(i0, i1, nk, window, causal, query_offset),
        visible=lambda i0, i1, j0, j1: sliding_window_visible(i0, i1, j0, j1, window, causal, query_offset,
                                                              q.device),
    )


# 2. compressed attention


def compressed_logits(q: Tensor, ck: Tensor, *, num_mem: int, stride: int, causal: bool, scale: float,
                      query_offset: int = 0) -> Tensor:
    """The second output of ``compressed_attention`` on its own (differentiable): (b, n_q, H, C) scaled
    logits of the non-memory columns, invisible entries NEG / 10. Holds an (n_q x C) tensor per head."""
    b, nq, h, d = q.shape
    nkv, kh = ck.shape[1], ck.shape[2]
    c = nkv - num_mem
    s = torch.einsum("bnkgd,bmkd->bnkgm", q.reshape(b, nq, kh, h // kh, d), ck[:, num_mem:]) * scale
    if causal and c > 0:
        vis = compressed_visibility(nq, c, stride, True, q.device, query_offset)
        s = s.masked_fill(~vis[None, :, None, None, :], masked_value(s.dtype))
    return s.reshape(b, nq, h, c)


def compressed_attention_lse(q: Tensor, ck: Tensor, *, num_mem: int, stride: int, causal: bool, scale: float,
                             query_offset: int = 0) -> Tensor:
    """lse (b, n_q, H) fp32 of the compressed-attention logits, memory rows included (always visible).
    Holds (n_q x (M + C)) per head."""
    b, nq, h, d = q.shape
    nkv, kh = ck.shape[1], ck.shape[2]
    s = torch.einsum("bnkgd,bmkd->bnkgm", q.float().reshape(b, nq, kh, h // kh, d), ck.float()) * scale
    if causal and nkv > num_mem:
        vis = compressed_visibility(nq, nkv - num_mem, stride, True, q.device, query_offset)
        mem = torch.ones((nq, num_mem), dtype=torch.bool, device=q.device)
        s = s.masked_fill(~torch.cat((mem, vis), 1)[None, :, None, None, :], float("-inf"))
    return torch.logsumexp(s, -1).reshape(b, nq, h)


def compressed_attention_backward(q: Tensor, ck: Tensor, cv: Tensor, out: Tensor, dout: Tensor, *, num_mem: int,
                                  stride: int, causal: bool, scale: float, query_offset: int = 0):
    """(dq, dck, dcv) of ``compressed_attention``'s output in closed form (``dense_attention_backward``),
    memory rows included in dck, dcv. Causal: row r visible to the query at position p iff
    r < M + p // stride (memory rows, and the blocks that closed before p)."""
    nkv = ck.shape[1]

    def visible(i0, i1, j0, j1):
        pos = torch.arange(i0, i1, device=q.device) + query_offset
        rows = torch.arange(j0, j1, device=q.device)
        if not causal:
            return torch.ones((i1 - i0, j1 - j0), dtype=torch.bool, device=q.device)
        return rows[None, :] < num_mem + torch.div(pos, stride, rounding_mode="floor")[:, None]

    return dense_attention_backward(q, ck, cv, out, dout, scale, key_range=lambda i0, i1: (0, nkv), visible=visible)


# 5. selected attention


def selected_attention_lse(q: Tensor, k: Tensor, block_idx: Tensor, block_valid: Tensor,
                           gates: Optional[Tensor], *, block_size: int, causal: bool, scale: float,
                           query_offset: int = 0, chunk: int = 256) -> Tensor:
    """lse (b, n_q, H) fp32 over the keys ``selected_attention`` attends to (gated logits; -inf for a
    query without keys), chunked over queries. Gathers (chunk x kk * l' x d) keys per head."""
    b, n, h, d = q.shape
    nk, kh = k.shape[1], k.shape[2]
    hs = block_idx.shape[2]
    lse = torch.empty((b, n, h), device=q.device, dtype=torch.float32)
    head_to_sel = torch.arange(h, device=q.device) // (h // hs)  # query head -> selection head
    kv_of_head = torch.arange(h, device=q.device) // (h // kh)
    offs = torch.arange(block_size, device=q.device)
    usable = usable_selection(block_idx, block_valid, nk, block_size, causal, query_offset)
    for i0 in range(0, n, chunk):
        i1 = min(n, i0 + chunk)
        qi = q[:, i0:i1].float()  # (b, c, H, d)
        idx = block_idx[:, i0:i1][:, :, head_to_sel].long()  # (b, c, H, kk)
        ok = usable[:, i0:i1][:, :, head_to_sel]
        g = gates[:, i0:i1][:, :, head_to_sel].float() if gates is not None else torch.ones_like(idx, dtype=torch.float32)
        keys = idx[..., None] * block_size + offs  # (b, c, H, kk, l')
        kok = ok[..., None] & (keys < nk)
        gk = g[..., None].expand_as(keys)
        if causal:
            tok = torch.arange(i0, i1, device=q.device) + query_offset
            own = (tok // block_size)[None, :, None, None] * block_size + offs  # (1, c, 1, l')
            own = own.expand(b, -1, h, -1)
            keys = torch.cat([keys.flatten(-2), own], -1)
            kok = torch.cat([kok.flatten(-2), own <= tok[None, :, None, None]], -1)
            gk = torch.cat([gk.flatten(-2), torch.ones_like(own, dtype=torch.float32)], -1)
        else:
            keys, kok, gk = keys.flatten(-2), kok.flatten(-2), gk.flatten(-2)
        kc = keys.clamp(0, nk - 1)
        kf = k.float()
        bidx = torch.arange(b, device=q.device)[:, None, None, None]
        kvh = kv_of_head[None, None, :, None]
        kg = kf[bidx, kc, kvh]  # (b, c, H, m, d)
        logits = (qi[..., None, :] * kg).sum(-1) * scale * gk
        logits = logits.masked_fill(~kok, float("-inf"))
        lse[:, i0:i1] = torch.logsumexp(logits, -1)
    return lse


# 4. importance scores and block selection, fused (what the top-k kernels compute)


def select_topk(q: Tensor, ck: Tensor, *, num_mem: int, compress_block_size: int, stride: int,
                selection_block_size: int, num_selected: int, causal: bool, share: bool, scale: float,
                interpolated: bool = False, query_offset: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Spec 2 + 4 from q (b, n, H, d) unrotated and ck (b, M + C, K, d): the logits of
    ``compressed_attention``, ``importance_scores``, ``select_blocks``. Returns (block_idx int64,
    block_valid, values), each (b, n, Hs, kk), exactly as those steps compute them."""
    b, n, H, d = q.shape
    K = ck.shape[2]
    _, logits = compressed_attention(
        q, ck, ck, num_mem=num_mem, block_size=compress_block_size, stride=stride, causal=causal, scale=scale,
        query_offset=query_offset,
    )
    imp = importance_scores(logits, groups=H // K, share=share, causal=causal, stride=stride,
                            query_offset=query_offset)
    return select_blocks(
        imp, seq_len=query_offset + n, stride=stride, compress_block_size=compress_block_size,
        selection_block_size=selection_block_size, num_selected=num_selected, causal=causal,
        interpolated=interpolated, query_offset=query_offset,
    )


_TOPK_CHUNK = 256


def _topk_sizes(q: Tensor, ck: Tensor, num_mem: int, stride: int, selection_block_size: int, share: bool) -> dict:
    """Sizes of the candidate scores of mappings (a), (b): K, M, R = l' / s, U = C // R, G, Hs."""
    if selection_mapping(stride, selection_block_size, False) == "c":
        raise ValueError(f"mappings (a) and (b) only (selection_block_size a multiple of stride "
                         f"{stride}, >= it), got selection_block_size={selection_block_size}")
    H, K = q.shape[2], ck.shape[2]
    R = selection_block_size // stride
    return dict(K=K, M=num_mem, R=R, U=(ck.shape[1] - num_mem) // R, G=H // K, Hs=K if share else H)


def topk_candidate_scores(q: Tensor, ck: Tensor, i0: int, i1: int, *, num_mem: int, stride: int,
                          selection_block_size: int, causal: bool, share: bool, scale: float,
                          query_offset: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """The top-k kernels' scores, mappings (a) and (b), of the queries [i0, i1) in fp32:
    (scores (b, c, Hs, U) with invisible candidates -inf, the per-row query (b, c, Hs, d): the mean of
    the G heads when shared, the per-row candidate keys (b, U, Hs, d): the mean of R compressed keys).
    The means commute with the dot product, so ``softmax([NULL_LOGIT, scores])`` are ``select_blocks``'
    probabilities."""
    sizes = _topk_sizes(q, ck, num_mem, stride, selection_block_size, share)
    b, n, H, d = q.shape
    K, M, R, U, G, Hs = (sizes[x] for x in ("K", "M", "R", "U", "G", "Hs"))
    ckc = ck[:, M:M + U * R].float().reshape(b, U, R, K, d).mean(2)  # (b, U, K, d)
    kv_of_row = torch.arange(Hs, device=q.device) // (1 if Hs == K else G)
    ckr = ckc[:, :, kv_of_row]  # (b, U, Hs, d)
    qi = q[:, i0:i1].float()
    qr = qi.reshape(b, i1 - i0, K, G, d).mean(3) if Hs == K else qi  # (b, c, Hs, d)
    s = torch.einsum("bchd,buhd->bchu", qr, ckr) * scale
    u = torch.arange(U, device=q.device)
    own = (query_offset + torch.arange(i0, i1, device=q.device)) // selection_block_size
    if causal:
        vis = u[None, :] < own[:, None]
    else:
        vis = torch.ones((i1 - i0, U), dtype=torch.bool, device=q.device)
        if R > 1:
            vis = vis & (u[None, :] != own[:, None])
    return s.masked_fill(~vis[None, :, None, :], float("-inf")), qr, ckr


def select_topk_lse(q: Tensor, ck: Tensor, *, num_mem: int, stride: int, selection_block_size: int, causal: bool,
                    share: bool, scale: float, query_offset: int = 0) -> Tensor:
    """(b, n, Hs) fp32 log-sum-exp of [null column, visible candidates] (mappings (a), (b)): the
    normalizer of the selection probabilities the top-k forward returns beside them."""
    kw = dict(num_mem=num_mem, stride=stride, selection_block_size=selection_block_size, causal=causal, share=share,
              scale=scale, query_offset=query_offset)
    b, n = q.shape[:2]
    Hs = _topk_sizes(q, ck, num_mem, stride, selection_block_size, share)["Hs"]
    lse = torch.empty((b, n, Hs), device=q.device, dtype=torch.float32)
    for i0 in range(0, n, _TOPK_CHUNK):
        i1 = min(n, i0 + _TOPK_CHUNK)
        s, _, _ = topk_candidate_scores(q, ck, i0, i1, **kw)
        s = torch.cat((s.new_full((*s.shape[:-1], 1), NULL_LOGIT), s), -1)
        lse[:, i0:i1] = torch.logsumexp(s, -1)
    return lse


def select_topk_backward(q: Tensor, ck: Tensor, block_idx: Tensor, grad_values: Tensor, *, num_mem: int,
                         stride: int, selection_block_size: int, causal: bool, share: bool, scale: float,
                         query_offset: int = 0) -> tuple[Tensor, Tensor]:
    """(dq, dck) of sum(grad_values * values) for the selection ``block_idx`` (b, n, Hs, kk), mappings
    (a) and (b), in closed form (fp32, chunked): with p the candidate probabilities,
    dscore[u] = p[u] * (gsel[u] - sum_t g_t p[u_t]), then back through the mean query and the mean
    candidate keys. Memory rows get no gradient; kk = 0 gives zeros."""
    if block_idx.shape[-1] == 0:
        return torch.zeros_like(q), torch.zeros_like(ck)
    kw = dict(num_mem=num_mem, stride=stride, selection_block_size=selection_block_size, causal=causal, share=share,
              scale=scale, query_offset=query_offset)
    sizes = _topk_sizes(q, ck, num_mem, stride, selection_block_size, share)
    b, n, H, d = q.shape
    K, M, R, U, G, Hs = (sizes[x] for x in ("K", "M", "R", "U", "G", "Hs"))
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    dckr = torch.zeros((b, U, Hs, d), device=q.device, dtype=torch.float32)
    for i0 in range(0, n, _TOPK_CHUNK):
        i1 = min(n, i0 + _TOPK_CHUNK)
        s, qr, ckr = topk_candidate_scores(q, ck, i0, i1, **kw)
        lse = torch.logsumexp(torch.cat((s.new_full((*s.shape[:-1], 1), NULL_LOGIT), s), -1), -1, keepdim=True)
        p = torch.exp(s - lse)  # (b, c, Hs, U), 0 where invisible
        g = grad_values[:, i0:i1].float()
        gsel = torch.zeros_like(p).scatter_add(-1, block_idx[:, i0:i1].long(), g)
        ds = p * (gsel - (gsel * p).sum(-1, keepdim=True)) * scale
        dqr = torch.einsum("bchu,buhd->bchd", ds, ckr)
        if Hs == K:
            dq[:, i0:i1] = (dqr / G)[:, :, :, None, :].expand(-1, -1, -1, G, -1).reshape(b, i1 - i0, H, d)
        else:
            dq[:, i0:i1] = dqr
        dckr += torch.einsum("bchu,bchd->buhd", ds, qr)
    dckc = dckr.reshape(b, U, K, Hs // K, d).sum(3) if Hs != K else dckr  # rows -> kv heads
    dck = torch.zeros(ck.shape, device=ck.device, dtype=torch.float32)
    dck[:, M:M + U * R] = (dckc / R)[:, :, None].expand(-1, -1, R, -1, -1).reshape(b, U * R, K, d)
    return dq.to(q.dtype), dck.to(ck.dtype)


# ----------------------------------------------------------------------------------------------
# decoding from a preallocated cache: one query per sequence, per-sequence positions
#
# A static decoding cache (nsa_codegen.module.StaticCache) holds every sequence of a batch in buffers of
# one fixed length N; sequence i has written tokens [0, lengths[i]). These functions take the positions
# as device tensors and keep every shape static (nothing depends on tensor values), so a decoding step
# built from them never synchronizes with the host. Rows of the buffers past a sequence's length may
# hold anything finite: they are masked, never weighted.


def apply_rotary_at(x: Tensor, freqs: Tensor, positions: Tensor) -> Tensor:
    """``apply_rotary`` with per-sequence positions: x (b, n, h, d), positions (b, n) integer, token ``r`` of
    sequence ``i`` at position ``positions[i, r]``. The same arithmetic as ``apply_rotary``."""
    b, n, h, d = x.shape
    half = freqs.shape[-1]
    if 2 * half != d:
        raise ValueError(f"freqs has {half} entries, head dim {d}")
    cdt = torch.promote_types(_softmax_dtype(x.dtype), freqs.dtype)
    pos = positions.to(device=x.device, dtype=cdt).expand(b, n)
    angle = pos[..., None] * freqs.to(device=x.device, dtype=cdt)  # (b, n, d/2)
    cos = angle.cos()[:, :, None, :]
    sin = angle.sin()[:, :, None, :]
    x1 = x[..., 0::2].to(cdt)
    x2 = x[..., 1::2].to(cdt)
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    return torch.stack((o1, o2), dim=-1).flatten(-2).to(x.dtype)


def _decode_softmax(s: Tensor, vis: Tensor, values: Tensor, equation: str) -> tuple[Tensor, Tensor]:
    """Masked softmax attention of decoding: logits s (..., T) in the inputs' dtype, vis broadcastable to s,
    values gathered so that ``einsum(equation, p, values)`` is the output. Returns (out, lse fp32): 0 and
    -inf where a row sees no key."""
    sdt = _softmax_dtype(s.dtype)
    s = s.to(sdt).masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    has_key = torch.isfinite(lse)
    p = torch.exp(s - torch.where(has_key, lse, 0.0)[..., None])  # exactly 0 where masked
    out = torch.einsum(equation, p.to(values.dtype), values)
    return out, lse.float()


def decode_range_attention(q: Tensor, k: Tensor, v: Tensor, lo: Tensor, hi: Tensor, *, max_keys: int,
                           scale: float) -> tuple[Tensor, Tensor]:
    """One query per sequence over a contiguous range of keys (the sliding window, the compressed rows).

    q (b, H, d); k, v (b, N, K, d), H % K == 0 (query head h reads kv head h // G); lo, hi (b,) integer.
    Sequence i attends to keys j with ``lo[i] <= j < min(hi[i], lo[i] + max_keys)`` and ``0 <= j < N``
    (``max_keys``: a static bound on the range length, which fixes the shapes). Returns out (b, H, d) in
    q's dtype (0 for a query without keys) and lse (b, H) fp32, natural log (-inf without keys)."""
    b, H, d = q.shape
    N, K = k.shape[1], k.shape[2]
    G = H // K
    dev = q.device
    lo = lo.to(device=dev, dtype=torch.long)
    end = torch.minimum(hi.to(device=dev, dtype=torch.long), lo + max_keys)
    if max_keys >= N:  # the whole buffer: no gather
        j = torch.arange(N, device=dev).expand(b, N)
        keys, vals = k, v
    else:
        j = lo[:, None] + torch.arange(max_keys, device=dev)  # (b, T)
        rows = j.clamp(0, max(N - 1, 0))
        bi = torch.arange(b, device=dev)[:, None]
        keys, vals = k[bi, rows], v[bi, rows]  # (b, T, K, d): the range only, not the buffer
    vis = (j >= lo[:, None]) & (j < end[:, None]) & (j >= 0) & (j < N)  # (b, T)
    vals = vals.masked_fill(~vis[:, :, None, None], 0)
    s = torch.einsum("bkgd,btkd->bkgt", q.reshape(b, K, G, d), keys) * scale
    out, lse = _decode_softmax(s, vis[:, None, None, :], vals, "bkgt,btkd->bkgd")
    return out.reshape(b, H, d), lse.reshape(b, H)


def decode_selected_attention(q: Tensor, k: Tensor, v: Tensor, block_idx: Tensor, block_valid: Tensor,
                              positions: Tensor, *, block_size: int, scale: float) -> tuple[Tensor, Tensor]:
    """Spec 5 (causal) for one query per sequence at ``positions`` (b,): q (b, H, d) rotated; k, v (b, N, K, d)
    rotated keys and values; block_idx, block_valid (b, Hs, kk) with Hs = K (shared selection) or H.

    Keys: the own block ``positions // l'`` restricted to ``j <= position``, and every usable slot's block,
    a slot being usable iff valid with ``0 <= id < own block`` (``usable_selection`` for n = position + 1).
    Gates are not taken: their forward value is 1 (spec 4.5). Returns out (b, H, d) and lse (b, H) fp32."""
    b, H, d = q.shape
    N, K = k.shape[1], k.shape[2]
    Hs, kk = block_idx.shape[1], block_idx.shape[2]
    G, Gs = H // K, H // Hs  # query heads per kv head, per selection row
    l = int(block_size)
    dev = q.device
    pos = positions.to(device=dev, dtype=torch.long)
    own = (pos // l)[:, None, None]  # (b, 1, 1)
    ids = block_idx.to(device=dev, dtype=torch.long)
    usable = block_valid.to(torch.bool) & (ids >= 0) & (ids < own)
    ids = torch.cat((ids, own.expand(b, Hs, 1)), dim=-1)  # (b, Hs, kk + 1): the own block last
    usable = torch.cat((usable, torch.ones((b, Hs, 1), dtype=torch.bool, device=dev)), dim=-1)
    j = (ids[..., None] * l + torch.arange(l, device=dev)).flatten(2)  # (b, Hs, T)
    vis = usable[..., None].expand(b, Hs, kk + 1, l).flatten(2) & (j <= pos[:, None, None]) & (j >= 0) & (j < N)
    rows = j.clamp(0, max(N - 1, 0))
    kv_of_row = (torch.arange(Hs, device=dev) * Gs) // G
    bi = torch.arange(b, device=dev)[:, None, None]
    keys = k[bi, rows, kv_of_row[None, :, None]]  # (b, Hs, T, d): the selected blocks only
    vals = v[bi, rows, kv_of_row[None, :, None]].masked_fill(~vis[..., None], 0)
    s = torch.einsum("brgd,brtd->brgt", q.reshape(b, Hs, Gs, d), keys) * scale
    out, lse = _decode_softmax(s, vis[:, :, None, :], vals, "brgt,brtd->brgd")
    return out.reshape(b, H, d), lse.reshape(b, H)


def decode_select_topk(q: Tensor, ck: Tensor, positions: Tensor, *, num_mem: int, stride: int,
                       selection_block_size: int, num_selected: int, share: bool, scale: float,
                       interpolated: bool, seq_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """Spec 2 logits + 4 (causal) for one query per sequence at ``positions`` (b,): q (b, H, d) unrotated,
    ck (b, M + C, K, d) a compressed-key buffer whose rows past a query's visible blocks may hold anything.

    ``seq_len`` is a static bound on every sequence's length (positions < seq_len; C <= seq_len // s). The
    candidates are those of a sequence of ``seq_len`` tokens and ``C`` compressed blocks; every candidate a
    query at position t would not have with n = t + 1 tokens contains an invisible block or token (spec 4.4),
    so its probability is exactly 0 and it is invalid: the valid selection equals ``select_blocks``' for
    n = t + 1. Returns (block_idx int64, block_valid, values), each (b, Hs, kk) with kk = min(num_selected,
    candidates) (0 when num_selected == 0 or C == 0)."""
    b, H, d = q.shape
    K = ck.shape[2]
    G = H // K
    C = ck.shape[1] - num_mem
    dev = q.device
    pos = positions.to(device=dev, dtype=torch.long)
    sel = int(selection_block_size)
    mapping = selection_mapping(stride, sel, interpolated)
    U = num_candidates(seq_len, C, stride, sel, interpolated)
    kk = min(int(num_selected), U) if (num_selected > 0 and C > 0) else 0
    Hs = K if share else H
    if kk == 0:
        shape = (b, Hs, 0)
        return (torch.zeros(shape, dtype=torch.long, device=dev), torch.zeros(shape, dtype=torch.bool, device=dev),
                q.new_zeros(shape, dtype=_softmax_dtype(q.dtype)))
    # the logits of compressed_attention and the scores of importance_scores, with per-query visibility
    logits = torch.einsum("bkgd,bmkd->bkgm", q.reshape(b, K, G, d), ck[:, num_mem:]) * scale  # (b, K, G, C)
    vis = ((torch.arange(C, device=dev) + 1) * stride - 1)[None, :] < pos[:, None]  # (b, C)
    x = logits.reshape(b, H, C).masked_fill(~vis[:, None, :], masked_value(logits.dtype))
    if share and G > 1:
        x = x.masked_fill(~vis[:, None, :], 0).reshape(b, K, G, C).mean(dim=2)
    x = x.masked_fill(~vis[:, None, :], masked_value(x.dtype))
    # select_blocks' per-query step, the sequences of the batch as its query rows
    cfg = dict(mapping=mapping, stride=stride, sel=sel, U=U, kk=kk, causal=True, interpolated=interpolated)
    vals, idx, valid = _select_chunk(x[None], pos, cfg)
    return idx[0], valid[0], vals[0]
def gated_combine_backward(o_cmp: Tensor, o_slc: Tensor, o_swa: Tensor, gates: Tensor, dout: Tensor):
    """(d o_cmp, d o_slc, d o_swa, d gates) of ``gated_combine`` in closed form: d o_s = g_s * dout (in
    the inputs' dtype) and d g_s = sum over d of dout * o_s (summed in at least fp32, returned in the gates'
    dtype), d gates (b, n, 3H) laid out ``(h s)`` like the gates."""
    b, n, H, _ = o_cmp.shape
    g = gates.reshape(b, n, H, 3, 1)
    grads = tuple(g[..., s, :] * dout for s in range(3))
    acc = torch.promote_types(dout.dtype, torch.float32)
    dg = torch.stack([(dout.to(acc) * o.to(acc)).sum(-1) for o in (o_cmp, o_slc, o_swa)], dim=-1)
    return (*grads, dg.reshape(b, n, 3 * H).to(gates.dtype))
