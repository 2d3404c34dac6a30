"""nsa_codegen.reference against brute-force definitions written from nsa-spec.md.

Every `bf_*` helper below is a direct transcription of the spec text with explicit Python loops over
queries i and keys / blocks / tokens j (no code shared with the vectorized reference). Inputs are
fresh random tensors (never zeros), mostly fp64 so that comparisons can be tight; odd lengths
(1, 5, 31, 77) are included everywhere.

Where the spec is silent we follow native-sparse-attention-pytorch 0.2.3; those choices are named
in the tests marked "0.2.3" (test_matches_upstream_0_2_3 checks the whole functional core against
the installed package on causal configurations).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from nsa_codegen import reference as R

F64 = torch.float64
NEG64 = -torch.finfo(F64).max
MASK64 = NEG64 / 10


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rnd(*shape, seed=0, dtype=F64, requires_grad=False):
    t = torch.randn(*shape, generator=gen(seed), dtype=torch.float64).to(dtype)
    return t.requires_grad_(requires_grad)


# ------------------------------------------------------------------------------------------------
# brute-force definitions, transcribed from nsa-spec.md


def bf_rotary(x, freqs, offset=0):
    """Spec 3: (x[2i], x[2i+1]) -> (x[2i] cos - x[2i+1] sin, x[2i+1] cos + x[2i] sin), theta = pos*f_i."""
    b, n, h, d = x.shape
    out = torch.empty_like(x)
    for bb in range(b):
        for t in range(n):
            for hh in range(h):
                for i in range(d // 2):
                    th = (offset + t) * float(freqs[i])
                    a, c = float(x[bb, t, hh, 2 * i]), float(x[bb, t, hh, 2 * i + 1])
                    out[bb, t, hh, 2 * i] = a * math.cos(th) - c * math.sin(th)
                    out[bb, t, hh, 2 * i + 1] = c * math.cos(th) + a * math.sin(th)
    return out


def bf_windows(x, positions, l, s):
    """Spec 1: window w = original tokens [w*s - (l - s), (w+1)*s), zero rows before token 0, + Pk."""
    b, n, K, d = x.shape
    C = n // s
    out = torch.zeros(b, K, C, l, d, dtype=x.dtype)
    for bb in range(b):
        for kh in range(K):
            for w in range(C):
                for r in range(l):
                    t = w * s - (l - s) + r
                    row = x[bb, t, kh] if t >= 0 else torch.zeros(d, dtype=x.dtype)
                    out[bb, kh, w, r] = row + positions[kh, r]
    return out


def bf_visible(i, w, s, causal):
    """Spec 2: compressed block w is visible to query i iff e_w = (w + 1) * s - 1 < i (causal)."""
    return (not causal) or ((w + 1) * s - 1 < i)


def bf_softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    z = sum(e)
    return [v / z for v in e]


def bf_compressed_attention(q, ck, cv, M, s, causal, scale):
    """Spec 2 with loops: S = scale q.ck, invisible -> NEG/10, memory always visible."""
    b, n, H, d = q.shape
    K = ck.shape[2]
    G = H // K
    C = ck.shape[1] - M
    out = torch.zeros(b, n, H, d, dtype=q.dtype)
    logits = torch.zeros(b, n, H, C, dtype=q.dtype)
    for bb in range(b):
        for i in range(n):
            for h in range(H):
                kh = h // G
                lg = []
                for j in range(M + C):
                    if j < M or bf_visible(i, j - M, s, causal):
                        lg.append(scale * float(q[bb, i, h] @ ck[bb, j, kh]))
                    else:
                        lg.append(-torch.finfo(q.dtype).max / 10)
                p = bf_softmax(lg)
                for j in range(M + C):
                    out[bb, i, h] += p[j] * cv[bb, j, kh]
                for w in range(C):
                    logits[bb, i, h, w] = lg[M + w]
    return out, logits


def bf_importance(logits, G, share, causal, s):
    """Spec 4.1-4.2: mean over the G heads of a group (share), invisible entries NEG/10."""
    b, n, H, C = logits.shape
    rows = H // G if share else H
    out = torch.zeros(b, n, rows, C, dtype=logits.dtype)
    neg10 = -torch.finfo(logits.dtype).max / 10
    for bb in range(b):
        for i in range(n):
            for r in range(rows):
                heads = range(r * G, (r + 1) * G) if share else [r]
                for w in range(C):
                    if bf_visible(i, w, s, causal):
                        out[bb, i, r, w] = sum(float(logits[bb, i, h, w]) for h in heads) / len(heads)
                    else:
                        out[bb, i, r, w] = neg10
    return out


def bf_candidates(row, i, n, C, s, lsel, causal, interp):
    """Spec 4.4 for one query i: (candidate scores, number of candidates U)."""
    vis = [bf_visible(i, w, s, causal) for w in range(C)]
    if lsel == s:  # (a)
        return [row[w] if vis[w] else MASK64 for w in range(C)], C
    if lsel > s and lsel % s == 0 and not interp:  # (b)
        r = lsel // s
        U = C // r
        cand = []
        for u in range(U):
            ws = range(u * r, (u + 1) * r)
            val = sum(row[w] for w in ws) / r if all(vis[w] for w in ws) else MASK64
            cand.append(NEG64 if u == i // lsel else val)
        return cand, U
    # (c) token level
    U = -(-n // lsel)
    V = sum(vis)
    tok = []
    for t in range(U * lsel):
        w = t // s
        if t >= C * s or not vis[w]:
            tok.append(None)
        elif not interp:
            tok.append(row[w])
        else:
            x = (t + 0.5) / s - 0.5
            x = min(max(x, 0.0), V - 1)
            i0 = math.floor(x)
            i1 = min(i0 + 1, V - 1)
            tok.append((1 - (x - i0)) * row[i0] + (x - i0) * row[i1])
    cand = []
    for u in range(U):
        chunk = tok[u * lsel : (u + 1) * lsel]
        val = MASK64 if any(c is None for c in chunk) else sum(chunk) / lsel
        cand.append(NEG64 if u == i // lsel else val)
    return cand, U


def bf_select(imp, n, s, lsel, k, causal, interp):
    """Spec 4.3-5: null-column softmax, top-k ties toward the lower index, valid = p > 1e-10."""
    b, _, rows, C = imp.shape
    res = []
    for bb in range(b):
        for i in range(n):
            for r in range(rows):
                if k == 0 or C == 0:
                    res.append(((bb, i, r), [], [], []))
                    continue
                cand, U = bf_candidates(imp[bb, i, r].tolist(), i, n, C, s, lsel, causal, interp)
                kk = min(k, U)
                p = bf_softmax([-1000.0] + cand)[1:]
                order = sorted(range(U), key=lambda u: (-p[u], u))[:kk]
                res.append(((bb, i, r), order, [p[u] for u in order], [p[u] > 1e-10 for u in order]))
    return res


def bf_selected_attention(q, k, v, idx, valid, gates, l, causal, scale):
    """Spec 5 with loops; differentiable (torch scalar ops). Gates multiply the selected keys."""
    b, n, H, d = q.shape
    nk, K = k.shape[1], k.shape[2]
    G = H // K
    Hs, kk = idx.shape[2], idx.shape[3]
    rows_out = []
    for bb in range(b):
        for i in range(n):
            for h in range(H):
                r = h // G if Hs == K else h
                kh = h // G
                keys = []  # (j, gate or None)
                for e in range(kk):
                    if bool(valid[bb, i, r, e]):
                        u = int(idx[bb, i, r, e])
                        for j in range(u * l, (u + 1) * l):
                            if j < nk:
                                keys.append((j, None if gates is None else gates[bb, i, r, e]))
                if causal:
                    u = i // l
                    for j in range(u * l, i + 1):
                        keys.append((j, None))
                if not keys:
                    rows_out.append(torch.zeros(d, dtype=q.dtype))
                    continue
                lg = []
                for j, g in keys:
                    kj = k[bb, j, kh] if g is None else g * k[bb, j, kh]
                    lg.append(scale * (q[bb, i, h] @ kj))
                p = torch.softmax(torch.stack(lg), dim=0)
                rows_out.append(sum(p[m] * v[bb, j, kh] for m, (j, _) in enumerate(keys)))
    return torch.stack(rows_out).reshape(b, n, H, d)


def bf_sliding(q, k, v, W, causal, scale):
    """Spec 6: causal j in [i - W, i]; non-causal |i - j| <= W; 0 <= j < n."""
    b, n, H, d = q.shape
    K = k.shape[2]
    G = H // K
    rows_out = []
    for bb in range(b):
        for i in range(n):
            for h in range(H):
                kh = h // G
                js = [j for j in range(n) if (i - W <= j <= i if causal else abs(i - j) <= W)]
                lg = torch.stack([scale * (q[bb, i, h] @ k[bb, j, kh]) for j in js])
                p = torch.softmax(lg, dim=0)
                rows_out.append(sum(p[m] * v[bb, j, kh] for m, j in enumerate(js)))
    return torch.stack(rows_out).reshape(b, n, H, d)


def rand_selection(b, n, Hs, kk, l, causal, seed, n_keys=None):
    """Random distinct valid blocks (causal: strictly earlier than the own block), some invalid
    entries holding garbage indices."""
    g = gen(seed)
    nblk = -(-(n if n_keys is None else n_keys) // l)
    idx = torch.zeros(b, n, Hs, kk, dtype=torch.long)
    valid = torch.zeros(b, n, Hs, kk, dtype=torch.bool)
    for bb in range(b):
        for i in range(n):
            for r in range(Hs):
                allowed = (i // l) if causal else nblk
                perm = torch.randperm(allowed, generator=g).tolist() if allowed else []
                for e in range(kk):
                    if e < len(perm) and torch.rand((), generator=g) < 0.8:
                        idx[bb, i, r, e] = perm[e]
                        valid[bb, i, r, e] = True
                    else:
                        idx[bb, i, r, e] = int(torch.randint(-3, nblk + 3, (), generator=g))
    return idx, valid


# ------------------------------------------------------------------------------------------------
# 3. rotary


def test_rotary_freqs_match_rotary_embedding_torch():
    rotary_embedding_torch = pytest.importorskip("rotary_embedding_torch")
    for d in (8, 16, 64):
        ours = R.rotary_freqs(d)
        theirs = rotary_embedding_torch.RotaryEmbedding(d).freqs
        assert ours.dtype == torch.float32 and ours.shape == (d // 2,)
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("n", [1, 5, 31])
@pytest.mark.parametrize("offset", [0, 7])
def test_apply_rotary_bruteforce(n, offset):
    x = rnd(2, n, 3, 8, seed=n + offset)
    freqs = R.rotary_freqs(8)
    out = R.apply_rotary(x, freqs, offset=offset)
    torch.testing.assert_close(out, bf_rotary(x, freqs, offset), rtol=0, atol=1e-12)
    # the rotation is not the identity (except position 0)
    if n > 1 or offset:
        assert (out - x).abs().max() > 1e-3


def test_apply_rotary_matches_rotary_embedding_torch_fp32():
    rotary_embedding_torch = pytest.importorskip("rotary_embedding_torch")
    x = rnd(2, 77, 3, 16, seed=3, dtype=torch.float32)
    rot = rotary_embedding_torch.RotaryEmbedding(16)
    theirs = rot.rotate_queries_or_keys(x.transpose(1, 2), offset=5).transpose(1, 2)
    ours = R.apply_rotary(x, rot.freqs, offset=5)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-6)


# ------------------------------------------------------------------------------------------------
# 1. compression


@pytest.mark.parametrize("n", [1, 5, 31, 77])
@pytest.mark.parametrize("l,s", [(4, 4), (8, 4), (5, 2), (6, 1), (7, 3)])
def test_compress_windows_bruteforce(n, l, s):
    x = rnd(2, n, 2, 3, seed=n * 10 + l)
    pos = rnd(2, l, 3, seed=99)
    win = R.compress_windows(x, pos, l, s)
    assert win.shape == (2, 2, n // s, l, 3)
    torch.testing.assert_close(win, bf_windows(x, pos, l, s), rtol=0, atol=0)


def test_compress_windows_pad_rows_get_positions_only():
    # window 0 of (l=8, s=4) starts with l - s = 4 pad rows: they hold exactly the positions
    x = rnd(1, 9, 2, 3, seed=1)
    pos = rnd(2, 8, 3, seed=2)
    win = R.compress_windows(x, pos, 8, 4)
    torch.testing.assert_close(win[0, :, 0, :4], pos[:, :4], rtol=0, atol=0)
    torch.testing.assert_close(win[0, 0, 0, 4:], x[0, 0:4, 0] + pos[0, 4:], rtol=0, atol=0)
    # token 8 (the 9th) is not covered: C = 9 // 4 = 2 windows, the last ends at token 7
    assert win.shape[2] == 2
    torch.testing.assert_close(win[0, 1, 1, 4:], x[0, 4:8, 1] + pos[1, 4:], rtol=0, atol=0)


@pytest.mark.parametrize("n", [3, 31])
def test_compress_applies_mlp_per_window(n):
    l, s, d, K = 4, 2, 3, 2
    mlp = torch.nn.Sequential(torch.nn.Flatten(-2), torch.nn.Linear(l * d, 5), torch.nn.ReLU(),
                              torch.nn.Linear(5, d)).double()
    x = rnd(2, n, K, d, seed=n)
    pos = rnd(K, l, d, seed=5)
    out = R.compress(x, pos, mlp, l, s)
    assert out.shape == (2, n // s, K, d)
    win = bf_windows(x, pos, l, s)
    for bb in range(2):
        for kh in range(K):
            for w in range(n // s):
                torch.testing.assert_close(out[bb, w, kh], mlp(win[bb, kh, w]), rtol=1e-12, atol=1e-12)


def test_prepend_memory():
    ck, cv = rnd(2, 5, 3, 4, seed=1), rnd(2, 5, 3, 4, seed=2)
    mem = rnd(2, 3, 2, 4, seed=3)  # (2, K, M, d)
    a, b = R.prepend_memory(ck, cv, mem)
    assert a.shape == (2, 7, 3, 4)
    for bb in range(2):
        for kh in range(3):
            for m in range(2):
                assert torch.equal(a[bb, m, kh], mem[0, kh, m]) and torch.equal(b[bb, m, kh], mem[1, kh, m])
    assert torch.equal(a[:, 2:], ck) and torch.equal(b[:, 2:], cv)


# ------------------------------------------------------------------------------------------------
# 2. compressed attention


@pytest.mark.parametrize("n,C,s", [(1, 0, 4), (5, 2, 2), (31, 7, 4), (77, 25, 3)])
@pytest.mark.parametrize("offset", [0, 3])
def test_compressed_visibility_bruteforce(n, C, s, offset):
    vis = R.compressed_visibility(n, C, s, True, None, query_offset=offset)
    for i in range(n):
        for w in range(C):
            assert bool(vis[i, w]) == bf_visible(i + offset, w, s, True)
    assert R.compressed_visibility(n, C, s, False).all()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n,l,s,M", [(1, 4, 4, 1), (5, 4, 2, 2), (31, 8, 4, 1), (31, 5, 3, 3), (77, 8, 8, 2)])
@pytest.mark.parametrize("H,K", [(4, 2), (2, 2)])
def test_compressed_attention_bruteforce(causal, n, l, s, M, H, K):
    d = 4
    C = n // s
    q = rnd(2, n, H, d, seed=1)
    ck, cv = rnd(2, M + C, K, d, seed=2), rnd(2, M + C, K, d, seed=3)
    out, logits = R.compressed_attention(q, ck, cv, num_mem=M, block_size=l, stride=s, causal=causal,
                                         scale=d ** -0.5)
    bo, bl = bf_compressed_attention(q, ck, cv, M, s, causal, d ** -0.5)
    torch.testing.assert_close(out, bo, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logits, bl, rtol=1e-12, atol=0)
    if causal:
        # query 0 sees no compressed block: its output is the softmax average of the memory values
        assert (logits[:, 0] == MASK64).all()


def test_compressed_attention_no_visible_block_averages_memory():
    q = rnd(1, 3, 2, 4, seed=1)
    ck, cv = rnd(1, 2 + 1, 2, 4, seed=2), rnd(1, 2 + 1, 2, 4, seed=3)  # M = 2, C = 1 (s = 3)
    out, _ = R.compressed_attention(q, ck, cv, num_mem=2, block_size=3, stride=3, causal=True, scale=0.5)
    for i in range(3):  # e_0 = 2 is not < i for i <= 2
        for h in range(2):
            p = torch.softmax(0.5 * ck[0, :2, h] @ q[0, i, h], 0)
            torch.testing.assert_close(out[0, i, h], p @ cv[0, :2, h], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# 4. importance scores


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("H,K", [(4, 2), (3, 3), (12, 1)])
@pytest.mark.parametrize("n", [5, 31])
def test_importance_scores_bruteforce(share, causal, H, K, n):
    s, M, d = 2, 1, 4
    C = n // s
    q = rnd(1, n, H, d, seed=n)
    ck, cv = rnd(1, M + C, K, d, seed=2), rnd(1, M + C, K, d, seed=3)
    _, logits = R.compressed_attention(q, ck, cv, num_mem=M, block_size=s, stride=s, causal=causal, scale=0.5)
    imp = R.importance_scores(logits, groups=H // K, share=share, causal=causal, stride=s)
    torch.testing.assert_close(imp, bf_importance(logits, H // K, share, causal, s), rtol=1e-12, atol=0)


def test_importance_never_sums_masked_values_fp32():
    # 12 heads per group: summing twelve NEG/10 values overflows fp32 to -inf (0.0.75's bug)
    n, s, H, K, C = 9, 2, 12, 1, 4
    logits = torch.randn(1, n, H, C, generator=gen(0))
    vis = R.compressed_visibility(n, C, s, True)
    logits = logits.masked_fill(~vis[None, :, None, :], R.masked_value(torch.float32))
    imp = R.importance_scores(logits, groups=H, share=True, causal=True, stride=s)
    assert torch.isfinite(imp).all()
    assert (imp[0, :, 0][~vis] == R.masked_value(torch.float32)).all()
    torch.testing.assert_close(imp[0, :, 0][vis], logits[0].mean(1)[vis])


# ------------------------------------------------------------------------------------------------
# 4.4-5 block selection


def test_selection_mapping_rule():
    assert R.selection_mapping(4, 4, False) == "a" and R.selection_mapping(4, 4, True) == "a"
    assert R.selection_mapping(4, 8, False) == "b" and R.selection_mapping(2, 8, False) == "b"
    assert R.selection_mapping(4, 8, True) == "c"  # l' > s interpolated
    assert R.selection_mapping(8, 4, False) == "c"  # l' < s
    assert R.selection_mapping(4, 6, False) == "c"  # l' not a multiple of s
    assert R.num_candidates(77, 19, 4, 4, False) == 19
    assert R.num_candidates(77, 19, 4, 8, False) == 9
    assert R.num_candidates(77, 19, 4, 6, False) == 13


# (l, s, l', interpolated) covering (a), (b) and every way into (c)
MAPPINGS = [
    pytest.param(4, 4, 4, False, id="a"),
    pytest.param(8, 4, 4, True, id="a-interp"),
    pytest.param(8, 4, 8, False, id="b-r2"),
    pytest.param(8, 2, 8, False, id="b-r4"),
    pytest.param(8, 4, 8, True, id="c-interp-l'>s"),
    pytest.param(8, 8, 4, False, id="c-l'<s"),
    pytest.param(8, 8, 4, True, id="c-l'<s-interp"),
    pytest.param(4, 4, 6, False, id="c-l'-not-multiple"),
    pytest.param(6, 3, 5, True, id="c-interp-odd"),
]


def _imp(n, s, rows, causal, seed, integer=False):
    C = n // s
    if integer:  # exact ties everywhere
        raw = torch.randint(0, 3, (2, n, rows, C), generator=gen(seed)).to(F64)
    else:
        raw = rnd(2, n, rows, C, seed=seed)
    vis = R.compressed_visibility(n, C, s, causal)
    return raw.masked_fill(~vis[None, :, None, :], MASK64) if causal else raw


def _check_selection(imp, n, s, lsel, k, causal, interp, offset=0):
    idx, valid, vals = R.select_blocks(imp, seq_len=n, stride=s, compress_block_size=s,
                                       selection_block_size=lsel, num_selected=k, causal=causal,
                                       interpolated=interp, query_offset=offset)
    assert idx.dtype == torch.long and valid.dtype == torch.bool
    for (bb, i, r), order, p, ok in bf_select(imp, n, s, lsel, k, causal, interp)[: imp.shape[0] * imp.shape[1] * imp.shape[2]]:
        assert idx.shape[-1] == len(order)
        assert idx[bb, i, r].tolist() == order, (bb, i, r)
        assert valid[bb, i, r].tolist() == ok, (bb, i, r)
        torch.testing.assert_close(vals[bb, i, r], torch.tensor(p, dtype=F64), rtol=1e-9, atol=1e-300)
    return idx, valid, vals


@pytest.mark.parametrize("l,s,lsel,interp", MAPPINGS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", [1, 5, 31, 77])
def test_select_blocks_bruteforce(l, s, lsel, interp, causal, n):
    imp = _imp(n, s, 2, causal, seed=n + s + lsel)
    for k in (1, 3, 50):
        _check_selection(imp, n, s, lsel, k, causal, interp)


@pytest.mark.parametrize("l,s,lsel,interp", MAPPINGS)
@pytest.mark.parametrize("causal", [True, False])
def test_select_blocks_ties_toward_lower_index(l, s, lsel, interp, causal):
    # integer scores: many exact ties, which must break toward the lower block index
    n = 40
    imp = _imp(n, s, 2, causal, seed=7, integer=True)
    idx, valid, vals = _check_selection(imp, n, s, lsel, 4, causal, interp)
    ties = 0
    for row_v, row_i in zip(vals.reshape(-1, idx.shape[-1]).tolist(), idx.reshape(-1, idx.shape[-1]).tolist()):
        for e in range(len(row_v) - 1):
            if row_v[e] == row_v[e + 1]:
                ties += 1
                assert row_i[e] < row_i[e + 1]
    assert ties > 0


def test_select_blocks_tie_example_l_less_than_s():
    # s = 8, l' = 4: the two selection blocks of one compressed block score exactly the same;
    # the lower one wins
    n, s, lsel = 32, 8, 4
    imp = torch.tensor([[[[1.0, 3.0, 2.0, 0.0]]]], dtype=F64).expand(1, n, 1, 4).contiguous()
    idx, valid, _ = R.select_blocks(imp, seq_len=n, stride=s, compress_block_size=s, selection_block_size=lsel,
                                    num_selected=3, causal=False, interpolated=False)
    assert idx[0, 0, 0].tolist() == [2, 3, 4]  # block 1 (score 3) -> selection blocks 2, 3; then 4
    assert idx[0, 10, 0].tolist() == [3, 4, 5]  # own block 2 is masked (NEG)
    assert valid.all()


def test_select_blocks_empty_cases():
    imp = rnd(1, 5, 2, 2, seed=1)
    for k, C in ((0, 2), (3, 0)):
        idx, valid, vals = R.select_blocks(imp[..., :C], seq_len=5, stride=2, compress_block_size=2,
                                           selection_block_size=2, num_selected=k, causal=True,
                                           interpolated=False)
        assert idx.shape == valid.shape == vals.shape == (1, 5, 2, 0)
    # (b) with C // r == 0: no candidate
    idx, _, _ = R.select_blocks(imp[..., :1], seq_len=5, stride=2, compress_block_size=2,
                                selection_block_size=4, num_selected=2, causal=True, interpolated=False)
    assert idx.shape[-1] == 0


def test_select_blocks_mapping_c_interpolation_is_half_pixel_linear():
    # non-causal, every token covered: the token-level scores equal F.interpolate(linear,
    # align_corners=False); with l' = 1 the candidates are the token scores themselves (own masked)
    n, s, C = 24, 4, 6
    imp = rnd(1, n, 1, C, seed=4)
    cand = R._candidates_c(imp, torch.arange(n), stride=s, sel=1, U=n, causal=False, interpolated=True)
    ref = torch.nn.functional.interpolate(imp[0, :, 0, :].unsqueeze(1), size=n, mode="linear",
                                          align_corners=False)[:, 0]  # (n queries, n tokens)
    own = torch.eye(n, dtype=torch.bool)
    torch.testing.assert_close(cand[0, :, 0][~own], ref[~own], rtol=1e-12, atol=1e-12)
    assert (cand[0, :, 0][own] == NEG64).all()


@pytest.mark.parametrize("l,s,lsel,interp", MAPPINGS)
def test_select_blocks_length_causal(l, s, lsel, interp):
    # causal: the valid selections of query i do not depend on n, and decoding one row at
    # position i (query_offset) gives the same as the parallel row
    n = 45
    imp = _imp(n, s, 2, True, seed=11)
    full = R.select_blocks(imp, seq_len=n, stride=s, compress_block_size=l, selection_block_size=lsel,
                           num_selected=3, causal=True, interpolated=interp)

    def valid_set(sel, row):
        idx, valid, vals = sel
        return [(int(u), float(p)) for u, ok, p in zip(idx[row].reshape(-1).tolist(), valid[row].reshape(-1).tolist(),
                                                        vals[row].reshape(-1).tolist()) if ok]

    for n2 in (1, 13, 32, 44):
        C2 = n2 // s
        pre = R.select_blocks(imp[:, :n2, :, :C2], seq_len=n2, stride=s, compress_block_size=l,
                              selection_block_size=lsel, num_selected=3, causal=True, interpolated=interp)
        for i in range(n2):
            assert valid_set(pre, (slice(None), i)) == valid_set(full, (slice(None), i))
        i = n2 - 1
        one = R.select_blocks(imp[:, i : i + 1, :, :C2], seq_len=n2, stride=s, compress_block_size=l,
                              selection_block_size=lsel, num_selected=3, causal=True, interpolated=interp,
                              query_offset=i)
        assert valid_set(one, (slice(None), 0)) == valid_set(full, (slice(None), i))
    assert any(valid_set(full, (slice(None), i)) for i in range(n))  # something was selected


def test_select_blocks_values_are_differentiable():
    imp = rnd(1, 31, 2, 7, seed=1, requires_grad=True)
    for lsel, interp in ((4, False), (8, False), (8, True), (6, False)):
        _, valid, vals = R.select_blocks(imp, seq_len=31, stride=4, compress_block_size=4,
                                         selection_block_size=lsel, num_selected=2, causal=False,
                                         interpolated=interp)
        (g,) = torch.autograd.grad((vals * valid).sum(), imp)
        assert g.abs().sum() > 0


def test_diff_topk_gates_forward_one_gradient_identity():
    v = torch.rand(3, 4, dtype=F64, requires_grad=True)
    g = R.diff_topk_gates(v)
    torch.testing.assert_close(g, torch.ones_like(g))
    (gr,) = torch.autograd.grad((g * torch.arange(4.0, dtype=F64)).sum(), v)
    torch.testing.assert_close(gr, torch.arange(4.0, dtype=F64).expand(3, 4))


# ------------------------------------------------------------------------------------------------
# 5. selected attention


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n,l", [(1, 4), (5, 2), (23, 4), (31, 5)])
@pytest.mark.parametrize("H,K,share", [(4, 2, True), (4, 2, False), (2, 2, True)])
@pytest.mark.parametrize("with_gates", [False, True])
def test_selected_attention_bruteforce_with_grads(causal, n, l, H, K, share, with_gates):
    b, d, kk = 1, 4, 3
    Hs = K if share else H
    q = rnd(b, n, H, d, seed=1, requires_grad=True)
    k = rnd(b, n, K, d, seed=2, requires_grad=True)
    v = rnd(b, n, K, d, seed=3, requires_grad=True)
    idx, valid = rand_selection(b, n, Hs, kk, l, causal, seed=n * 7 + l)
    gates = (torch.rand(b, n, Hs, kk, generator=gen(4), dtype=F64) + 0.5).requires_grad_(True) if with_gates else None
    inputs = [q, k, v] + ([gates] if with_gates else [])
    out = R.selected_attention(q, k, v, idx, valid, gates, block_size=l, causal=causal, scale=d ** -0.5,
                               chunk_size=3)
    ref = bf_selected_attention(q, k, v, idx, valid, gates, l, causal, d ** -0.5)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    go = rnd(*out.shape, seed=5)
    g1 = torch.autograd.grad(out, inputs, go, allow_unused=True)
    g2 = torch.autograd.grad(ref, inputs, go, allow_unused=True)
    for a, bgr in zip(g1, g2):
        a = torch.zeros_like(inputs[0]) if a is None and bgr is None else a
        bgr = torch.zeros_like(a) if bgr is None else bgr
        torch.testing.assert_close(a, bgr, rtol=1e-9, atol=1e-11)
    if with_gates and n > 2 * l:  # with one key per row a gate cannot move the softmax
        assert g1[3].abs().max() > 0


def test_selected_attention_chunking_and_larger_n():
    # n = 77, default chunking vs explicit tiny chunks vs brute force (no grad, to stay fast)
    b, n, H, K, d, l, kk = 1, 77, 2, 1, 4, 8, 2
    q, k, v = rnd(b, n, H, d, seed=1), rnd(b, n, K, d, seed=2), rnd(b, n, K, d, seed=3)
    for causal in (True, False):
        idx, valid = rand_selection(b, n, K, kk, l, causal, seed=9)
        a = R.selected_attention(q, k, v, idx, valid, block_size=l, causal=causal, scale=0.5)
        c = R.selected_attention(q, k, v, idx.int(), valid, block_size=l, causal=causal, scale=0.5, chunk_size=5)
        ref = bf_selected_attention(q, k, v, idx, valid, None, l, causal, 0.5)
        torch.testing.assert_close(a, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(c, ref, rtol=1e-10, atol=1e-12)


def test_selected_attention_noncausal_no_key_is_zero():
    b, n, H, K, d, l = 1, 9, 2, 1, 4, 4
    q, k, v = rnd(b, n, H, d, seed=1), rnd(b, n, K, d, seed=2), rnd(b, n, K, d, seed=3)
    idx = torch.zeros(b, n, K, 2, dtype=torch.long)
    valid = torch.zeros(b, n, K, 2, dtype=torch.bool)
    valid[0, ::2, 0, 0] = True  # even queries select block 0, odd ones nothing
    out = R.selected_attention(q, k, v, idx, valid, block_size=l, causal=False, scale=0.5)
    assert (out[0, 1::2] == 0).all()
    assert (out[0, ::2].abs() > 0).all()


def test_selected_attention_partial_last_block_keys_beyond_n_never_count():
    # non-causal, n = 6, l' = 4: block 1 holds tokens 4, 5 only
    b, n, H, K, d, l = 1, 6, 1, 1, 4, 4
    q, k, v = rnd(b, n, H, d, seed=1), rnd(b, n, K, d, seed=2), rnd(b, n, K, d, seed=3)
    idx = torch.ones(b, n, 1, 1, dtype=torch.long)
    valid = torch.ones(b, n, 1, 1, dtype=torch.bool)
    out = R.selected_attention(q, k, v, idx, valid, block_size=l, causal=False, scale=0.5)
    p = torch.softmax(0.5 * q[0, :, 0] @ k[0, 4:6, 0].T, -1)
    torch.testing.assert_close(out[0, :, 0], p @ v[0, 4:6, 0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 5, 31])
@pytest.mark.parametrize("causal", [True, False])
def test_5b_block_diagonal(n, causal):
    # 5b: causal -> empty selection + own block (j <= i); non-causal -> block_diagonal_selection
    b, H, K, d, l = 2, 4, 2, 4, 4
    q, k, v = rnd(b, n, H, d, seed=1), rnd(b, n, K, d, seed=2), rnd(b, n, K, d, seed=3)
    if causal:
        idx = torch.zeros(b, n, K, 0, dtype=torch.long)
        valid = torch.zeros(b, n, K, 0, dtype=torch.bool)
    else:
        idx, valid = R.block_diagonal_selection(b, n, K, l)
        assert idx.shape == (b, n, K, 1) and valid.all()
        assert idx[0, :, 0, 0].tolist() == [i // l for i in range(n)]
    out = R.selected_attention(q, k, v, idx, valid, block_size=l, causal=causal, scale=0.5)
    for bb in range(b):
        for i in range(n):
            for h in range(H):
                js = [j for j in range((i // l) * l, min(n, (i // l + 1) * l)) if (j <= i or not causal)]
                p = torch.softmax(torch.stack([0.5 * q[bb, i, h] @ k[bb, j, h // 2] for j in js]), 0)
                ref = sum(p[m] * v[bb, j, h // 2] for m, j in enumerate(js))
                torch.testing.assert_close(out[bb, i, h], ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# 6. sliding window


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", [1, 5, 31])
@pytest.mark.parametrize("W", [0, 1, 3, 100])
@pytest.mark.parametrize("H,K", [(4, 2), (3, 3)])
def test_sliding_window_bruteforce_with_grads(causal, n, W, H, K):
    b, d = 1, 4
    q = rnd(b, n, H, d, seed=1, requires_grad=True)
    k = rnd(b, n, K, d, seed=2, requires_grad=True)
    v = rnd(b, n, K, d, seed=3, requires_grad=True)
    out = R.sliding_window_attention(q, k, v, window=W, causal=causal, scale=0.5, chunk_size=4)
    ref = bf_sliding(q, k, v, W, causal, 0.5)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    go = rnd(*out.shape, seed=5)
    for a, bgr in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)):
        torch.testing.assert_close(a, bgr, rtol=1e-9, atol=1e-11)


def test_sliding_window_n77_default_chunks():
    b, n, H, K, d = 2, 77, 2, 1, 4
    q, k, v = rnd(b, n, H, d, seed=1), rnd(b, n, K, d, seed=2), rnd(b, n, K, d, seed=3)
    for causal in (True, False):
        out = R.sliding_window_attention(q, k, v, window=9, causal=causal, scale=0.5)
        torch.testing.assert_close(out, bf_sliding(q, k, v, 9, causal, 0.5), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# query_offset (decoding): the last rows alone equal the parallel rows


def test_query_offset_rows_equal_parallel_rows():
    b, n, H, K, d, l, s, M = 1, 29, 4, 2, 4, 4, 2, 2
    C = n // s
    q, k, v = rnd(b, n, H, d, seed=1), rnd(b, n, K, d, seed=2), rnd(b, n, K, d, seed=3)
    ck, cv = rnd(b, M + C, K, d, seed=4), rnd(b, M + C, K, d, seed=5)
    idx, valid = rand_selection(b, n, K, 2, l, True, seed=6)
    o_full, lg_full = R.compressed_attention(q, ck, cv, num_mem=M, block_size=l, stride=s, causal=True, scale=0.5)
    sw_full = R.sliding_window_attention(q, k, v, window=5, causal=True, scale=0.5)
    sel_full = R.selected_attention(q, k, v, idx, valid, block_size=l, causal=True, scale=0.5)
    for i in (0, 13, n - 1):
        sl = slice(i, i + 1)
        o1, lg1 = R.compressed_attention(q[:, sl], ck, cv, num_mem=M, block_size=l, stride=s, causal=True,
                                         scale=0.5, query_offset=i)
        torch.testing.assert_close(o1, o_full[:, sl], rtol=0, atol=1e-14)
        torch.testing.assert_close(lg1, lg_full[:, sl], rtol=0, atol=1e-14)
        sw1 = R.sliding_window_attention(q[:, sl], k[:, : i + 1], v[:, : i + 1], window=5, causal=True, scale=0.5,
                                         query_offset=i)
        torch.testing.assert_close(sw1, sw_full[:, sl], rtol=0, atol=1e-14)
        se1 = R.selected_attention(q[:, sl], k[:, : i + 1], v[:, : i + 1], idx[:, sl], valid[:, sl], block_size=l,
                                   causal=True, scale=0.5, query_offset=i)
        torch.testing.assert_close(se1, sel_full[:, sl], rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------------------------
# low precision: every function runs in bf16 / fp16 and stays in that dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_reference(dtype):
    b, n, H, K, d, l, s, lsel, M = 1, 37, 4, 2, 8, 8, 4, 8, 1
    C = n // s
    q32, k32, v32 = rnd(b, n, H, d, seed=1, dtype=torch.float32), rnd(b, n, K, d, seed=2, dtype=torch.float32), rnd(b, n, K, d, seed=3, dtype=torch.float32)
    ck32, cv32 = rnd(b, M + C, K, d, seed=4, dtype=torch.float32), rnd(b, M + C, K, d, seed=5, dtype=torch.float32)
    gl32 = rnd(b, n, 3 * H, seed=6, dtype=torch.float32)
    kw = dict(freqs=R.rotary_freqs(d), num_mem=M, compress_block_size=l, stride=s, selection_block_size=lsel,
              num_selected=2, window=6, causal=True, scale=d ** -0.5, use_diff_topk=True)
    ref32 = R.nsa_attention(q32, k32, v32, ck32, cv32, gl32, **kw)
    args = [t.to(dtype).requires_grad_(True) for t in (q32, k32, v32, ck32, cv32, gl32)]
    out = R.nsa_attention(*args, **kw)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - ref32).abs().max() < 0.1
    out.float().sum().backward()
    for a in args:
        assert a.grad is not None and a.grad.dtype == dtype and torch.isfinite(a.grad).all()
    assert R.apply_rotary(args[0], R.rotary_freqs(d)).dtype == dtype


# ------------------------------------------------------------------------------------------------
# the functional core against native-sparse-attention-pytorch 0.2.3 (causal configurations)


UPSTREAM_CASES = [
    # n, H, K, l, s, l', k, diff, share
    (31, 4, 2, 8, 4, 8, 2, True, True),  # (b), GQA, diff top-k
    (77, 4, 2, 8, 4, 4, 3, False, False),  # (a) l' == s, unshared under GQA
    (64, 2, 1, 4, 4, 4, 2, True, True),  # (a) no overlap
    (5, 4, 4, 8, 4, 8, 2, False, True),  # only 5b
    (31, 4, 2, 8, 4, 8, 0, False, True),  # k == 0 -> 5b
]


@pytest.mark.parametrize("case", UPSTREAM_CASES)
def test_matches_upstream_0_2_3(case):
    """Where the spec is silent we follow 0.2.3: the null column is -1000 and sits first; the
    (b) own block gets NEG (not NEG/10); the mean over heads happens before the null-column softmax;
    (a) does not mask the own block; rotary frequencies are rotary-embedding-torch's. Checked here on
    outputs and input gradients of the whole functional core."""
    nsa = pytest.importorskip("native_sparse_attention_pytorch")
    n, H, K, l, s, lsel, k, diff, share = case
    d, dim, M, W = 8, 16, 2, 6
    torch.manual_seed(0)
    m = nsa.SparseAttention(dim=dim, dim_head=d, heads=H, kv_heads=K, sliding_window_size=W, compress_block_size=l,
                            compress_block_sliding_stride=s, selection_block_size=lsel, num_selected_blocks=k,
                            causal=True, use_diff_topk=diff, use_triton_kernel=False,
                            query_heads_share_selected_kv=share, num_compressed_mem_kv=M)
    with torch.no_grad():
        for p in (m.compress_mem_kv, m.k_intrablock_positions, m.v_intrablock_positions):
            p.normal_()
        m.to_strategy_combine[0].weight.normal_(std=0.1)
    x = torch.randn(2, n, dim, requires_grad=True)
    ref = m(x)
    go = torch.randn_like(ref)
    (gx_ref,) = torch.autograd.grad(ref, x, go)
    hx = m.norm(x)
    q, kx, v = m.to_qkv(hx).split(m.qkv_split, -1)
    q, kx, v = q.view(2, n, H, d), kx.view(2, n, K, d), v.view(2, n, K, d)
    ck = R.compress(kx, m.k_intrablock_positions, m.k_compress, l, s)
    cv = R.compress(v, m.v_intrablock_positions, m.v_compress, l, s)
    ck, cv = R.prepend_memory(ck, cv, m.compress_mem_kv)
    o = R.nsa_attention(q, kx, v, ck, cv, m.to_strategy_combine[0](hx), freqs=m.rotary_emb.freqs, num_mem=M,
                        compress_block_size=l, stride=s, selection_block_size=lsel, num_selected=k, window=W,
                        causal=True, scale=d ** -0.5, share=share, use_diff_topk=diff)
    out = m.combine_heads(o.reshape(2, n, H * d))
    (gx,) = torch.autograd.grad(out, x, go)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=2e-6)


def test_nsa_attention_parts_and_gates():
    b, n, H, K, d, l, s, M = 1, 21, 2, 1, 4, 4, 4, 1
    C = n // s
    q, k, v = rnd(b, n, H, d, seed=1), rnd(b, n, K, d, seed=2), rnd(b, n, K, d, seed=3)
    ck, cv = rnd(b, M + C, K, d, seed=4), rnd(b, M + C, K, d, seed=5)
    gl = rnd(b, n, 3 * H, seed=6)
    for causal in (True, False):
        out, parts = R.nsa_attention(q, k, v, ck, cv, gl, freqs=R.rotary_freqs(d), num_mem=M, compress_block_size=l,
                                     stride=s, selection_block_size=l, num_selected=2, window=3, causal=causal,
                                     scale=0.5, return_parts=True)
        g = torch.sigmoid(gl.reshape(b, n, H, 3))
        manual = g[..., 0:1] * parts["o_cmp"] + g[..., 1:2] * parts["o_slc"] + g[..., 2:3] * parts["o_swa"]
        torch.testing.assert_close(out, manual, rtol=0, atol=1e-14)
        qr, kr = R.apply_rotary(q, R.rotary_freqs(d)), R.apply_rotary(k, R.rotary_freqs(d))
        torch.testing.assert_close(parts["o_swa"], bf_sliding(qr, kr, v, 3, causal, 0.5), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            parts["o_slc"],
            bf_selected_attention(qr, kr, v, parts["block_idx"], parts["block_valid"], None, l, causal, 0.5),
            rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# memory at real size (n = 4096): forward + backward within 4 GiB


_BIG = textwrap.dedent(
    """
    import json, resource, sys, time, torch
    from nsa_codegen import reference as R
    torch.manual_seed(0)
    b, n, H, K, d, l, s, sel, k, W = 1, 4096, 8, 2, 64, 32, 16, 64, 16, 512
    interp = sys.argv[1] == "1"
    q = torch.randn(b, n, H, d, requires_grad=True)
    kx = torch.randn(b, n, K, d, requires_grad=True)
    v = torch.randn(b, n, K, d, requires_grad=True)
    mlp = torch.nn.Sequential(torch.nn.Flatten(-2), torch.nn.Linear(l * d, l * d), torch.nn.ReLU(),
                              torch.nn.Linear(l * d, d))
    pos = (0.1 * torch.randn(K, l, d)).requires_grad_(True)
    mem = torch.randn(2, K, 1, d, requires_grad=True)
    gl = torch.randn(b, n, 3 * H, requires_grad=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time()
    ck, cv = R.prepend_memory(R.compress(kx, pos, mlp, l, s), R.compress(v, pos, mlp, l, s), mem)
    out = R.nsa_attention(q, kx, v, ck, cv, gl, freqs=R.rotary_freqs(d), num_mem=1, compress_block_size=l,
                          stride=s, selection_block_size=sel, num_selected=k, window=W, causal=True,
                          scale=d ** -0.5, use_diff_topk=True, interpolated=interp)
    t1 = time.time()
    out.square().sum().backward()
    t2 = time.time()
    ok = all(torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in (q, kx, v, gl, mem))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(fwd_s=t1 - t0, bwd_s=t2 - t1, base_kib=base, peak_kib=peak, grads_ok=bool(ok))))
    """
)


@pytest.mark.slow
def test_real_size_forward_backward_memory():
    """b=1, n=4096, H=8, K=2, d=64, l=32, s=16, l'=64, k=16, W=512, causal, use_diff_topk:
    forward + backward completes with peak RSS growth < 4 GiB (ru_maxrss of a fresh subprocess)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", _BIG, "0"], capture_output=True, text=True, env=env, timeout=1800)
    assert res.returncode == 0, res.stderr[-4000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    print("real-size reference:", info)
    assert info["grads_ok"]
    assert (info["peak_kib"] - info["base_kib"]) * 1024 < 4 * 2**30
    assert info["peak_kib"] * 1024 < 4 * 2**30
