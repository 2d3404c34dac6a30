"""Where the selected-attention backward spends its time on a CUDA GPU (short table last).

  python3 benchmarks/profile/select_bwd_profile.py [--ns 8192,65536] [--out DIR]

bf16, b=1, H=64, K=4, d=128, l'=64, kk=16, causal, random causal-valid selections (as in the benchmark):
the forward; the whole backward (launcher: dq kernel (+ delta) + selection inversion + dkv kernel +
casts); the inversion alone; the dkv kernel alone under several (num_warps, num_stages). G=16 (shared
selection) and G=1 (unshared: every query head selects). Writes DIR/select_bwd_profile.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent))  # select_check beside this file

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from select_check import selection  # noqa: E402
from nsa_codegen.codegen import cache  # noqa: E402
from nsa_codegen.codegen.spec import VariantSpec  # noqa: E402
from nsa_codegen.kernels import _launch, selected  # noqa: E402


def ms(fn):
    return do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=5, rep=60)


def profile(n, shared, H=64, K=4, d=128, l=64, kk=16):
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(1, n, H, d, device=dev, dtype=dt)
    k = torch.randn(1, n, K, d, device=dev, dtype=dt)
    v = torch.randn(1, n, K, d, device=dev, dtype=dt)
    hs = K if shared else H
    idx, valid = selection(1, n, hs, l, kk, True, dev)
    g = (0.5 + torch.rand(idx.shape, device=dev)).to(dt)
    kw = dict(block_size=l, causal=True, scale=d ** -0.5)
    out, lse = selected.selected_attention_fwd_launch(q, k, v, idx, valid, g, **kw)
    dout = torch.randn_like(out)
    bwd_mod = cache.load_variant(VariantSpec("select_bwd", l, H // K if shared else 1, True))
    row = {"n": n, "G": H // K if shared else 1, "H": H, "K": K}
    row["fwd"] = ms(lambda: selected.selected_attention_fwd_launch(q, k, v, idx, valid, g, **kw))
    row["bwd"] = ms(lambda: selected.selected_attention_bwd_launch(q, k, v, idx, valid, g, out, lse, dout, **kw))
    row["schedule"] = ms(lambda: selected.dkv_schedule(idx, valid, n, l, True, bwd_mod.DKV_SEGMENT))
    entries, segments = selected.dkv_schedule(idx, valid, n, l, True, bwd_mod.DKV_SEGMENT)
    row["segments"] = int(segments.shape[1])
    row["live_segments"] = int((segments[..., 0] >= 0).sum())
    delta = (dout.float() * out.float()).sum(-1)
    dk = torch.zeros(k.shape, device=dev)
    dv = torch.zeros(v.shape, device=dev)
    row["dkv"] = {}
    for warps, stages in ((8, 1), (8, 2), (4, 1), (4, 2), (8, 3)):
        try:
            row["dkv"][f"w{warps}s{stages}"] = ms(lambda: selected._launch_dkv(
                bwd_mod, _launch.no_wrap, q, k, v, g, g.stride(), True, dout, lse, delta, dk, dv, entries, segments,
                hs, kk, d ** -0.5, num_warps=warps, num_stages=stages))
        except Exception as exc:  # noqa: BLE001
            row["dkv"][f"w{warps}s{stages}"] = repr(exc)[:200]
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", default="8192,65536")
    ap.add_argument("--out", default=".", help="folder for select_bwd_profile.json")
    a = ap.parse_args()
    rows = []
    for n in [int(x) for x in a.ns.split(",")]:
        for shared in (True, False):
            try:
                rows.append(profile(n, shared))
            except Exception as exc:  # noqa: BLE001
                rows.append({"n": n, "shared": shared, "error": repr(exc)[:400]})
            print(json.dumps(rows[-1]), flush=True)
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    Path(a.out, "select_bwd_profile.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(f"{'n':>6} {'G':>3} {'fwd':>8} {'bwd':>8} {'sched':>7} segs(live)  dkv by warps/stages")
    for r in rows:
        if "error" in r:
            print(r)
            continue
        print(f"{r['n']:6d} {r['G']:3d} {r['fwd'][0]:8.2f} {r['bwd'][0]:8.2f} {r['schedule'][0]:7.2f} "
              f"{r['segments']}({r['live_segments']}) "
              + " ".join(f"{c}={t[0]:.2f}" if isinstance(t, list) else f"{c}=ERR" for c, t in r["dkv"].items()))


if __name__ == "__main__":
    main()
