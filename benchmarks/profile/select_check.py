"""GPU check of the selected-attention kernels on a CUDA GPU (prints a short table last).

  python3 benchmarks/profile/select_check.py [--out DIR] [--quick] [--skip SECTION,...]

Sections (in order; --skip takes their names: smoke, timing, packing, g16_tokens, resources, configs):

1. smoke: forward + backward of a few variants against the reference (bf16), so compile errors show
   first;
2. timing (bf16, triton.testing.do_bench, median of [0.5, 0.2, 0.8] quantiles): selected forward and
   forward+backward at b=1, H=64, K=4 (G=16), d=128, l'=64, 16 selected blocks, n=8192 (and 65536
   unless --quick), causal;
3. small-G packing (16 // G tokens per program, each distinct block once) vs the padding baseline (one
   token per program, group padded to 16 MMA rows), G in {1, 2, 4, 8}, H = 4G, K = 4, same shape at
   n = 8192, with (a) random selections and (b) locally coherent selections (tokens of one 16-token
   window share most of their blocks, as NSA's importance scores of neighbouring queries do);
4. G = 16 with 2 or 4 tokens per program (over the union of their blocks) vs one, random and local
   selections, n = 8k and 32k (`g16_tokens`);
5. resource model vs compiled kernels: predicted shared memory / registers against the compiled
   kernel's `metadata.shared` and `n_regs` for a few variants (`resources`);
6. forward and forward + backward of n=8192 at G=16 and G=1 under every kept tile config (`configs`).
Everything printed is also written to DIR/select_check.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from nsa_codegen import reference  # noqa: E402
from nsa_codegen.codegen import cache, render  # noqa: E402
from nsa_codegen.codegen.resources import selected as resources  # noqa: E402
from nsa_codegen.codegen.spec import VariantSpec  # noqa: E402
from nsa_codegen.kernels import _launch, selected  # noqa: E402

RESULTS: dict = {"env": {}, "smoke": [], "timing": [], "packing": [], "resources": []}


def log(*a):
    print(*a, flush=True)


def selection(b, n, hs, l, kk, causal, device, coherent=False, seed=0):
    """Random distinct blocks, strictly earlier than the own block when causal (valid iff any)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    nblk = -(-n // l)
    if coherent:  # one score draw per 16-token window + small per-token noise
        base = torch.rand(b, -(-n // 16), hs, nblk, device=device, generator=gen).repeat_interleave(16, dim=1)[:, :n]
        scores = base + 0.02 * torch.rand(b, n, hs, nblk, device=device, generator=gen)
    else:
        scores = torch.rand(b, n, hs, nblk, device=device, generator=gen)
    own = torch.arange(n, device=device) // l
    if causal:
        scores = scores.masked_fill(torch.arange(nblk, device=device)[None, None, None, :] >= own[None, :, None, None], 2.0)
    idx = scores.argsort(dim=-1)[..., :kk].to(torch.int32)
    if causal:
        valid = idx < own[None, :, None, None]
    else:
        valid = torch.ones_like(idx, dtype=torch.bool)
    return idx.contiguous(), valid.contiguous()


def inputs(b, n, H, K, d, l, kk, causal, dtype, coherent=False, gates=True):
    dev = "cuda"
    q = torch.randn(b, n, H, d, device=dev, dtype=dtype)
    k = torch.randn(b, n, K, d, device=dev, dtype=dtype)
    v = torch.randn(b, n, K, d, device=dev, dtype=dtype)
    idx, valid = selection(b, n, K, l, kk, causal, dev, coherent)
    g = (0.5 + torch.rand(idx.shape, device=dev)).to(dtype) if gates else None
    return q, k, v, idx, valid, g


def padded_module(spec: VariantSpec):
    """`spec` rendered with the padding baseline (one token per program, group padded to 16 rows)."""
    return render.load_with_layout(spec, force_pad=True)


def bench_pair(q, k, v, idx, valid, g, l, causal, fwd_mod=None, bwd_mod=None):
    scale = q.shape[-1] ** -0.5
    kw = dict(block_size=l, causal=causal, scale=scale)
    out, lse = selected.selected_attention_fwd_launch(q, k, v, idx, valid, g, **kw, module=fwd_mod)
    dout = torch.randn_like(out)
    f = lambda: selected.selected_attention_fwd_launch(q, k, v, idx, valid, g, **kw, module=fwd_mod)  # noqa: E731

    def fb():
        o, s = selected.selected_attention_fwd_launch(q, k, v, idx, valid, g, **kw, module=fwd_mod)
        selected.selected_attention_bwd_launch(q, k, v, idx, valid, g, o, s, dout, **kw, module=bwd_mod)

    tf = do_bench(f, quantiles=[0.5, 0.2, 0.8], warmup=5, rep=50)
    tfb = do_bench(fb, quantiles=[0.5, 0.2, 0.8], warmup=5, rep=50)
    return tf, tfb, (out, lse)


def smoke():
    for (l, H, K, causal, shared) in [(64, 64, 4, True, True), (16, 8, 4, True, True), (8, 32, 2, False, True),
                                      (20, 4, 2, True, False), (64, 16, 4, False, True)]:
        dtype = torch.bfloat16
        b, n, d, kk = 2, 700, 128, 4
        q, k, v, idx, valid, g = inputs(b, n, H, K, d, l, kk, causal, dtype)
        if not shared:
            idx = idx.repeat_interleave(H // K, dim=2).contiguous()
            valid = valid.repeat_interleave(H // K, dim=2).contiguous()
            g = g.repeat_interleave(H // K, dim=2).contiguous()
        kw = dict(block_size=l, causal=causal, scale=d ** -0.5)
        t0 = time.time()
        out, lse = selected.selected_attention_fwd_launch(q, k, v, idx, valid, g, **kw)
        dout = torch.randn_like(out)
        dq, dk, dv, dg = selected.selected_attention_bwd_launch(q, k, v, idx, valid, g, out, lse, dout, **kw)
        torch.cuda.synchronize()
        dt = time.time() - t0
        errs = {}
        for dt_ in (torch.float32, dtype):
            ts = [t.detach().to(dt_).requires_grad_() for t in (q, k, v, g)]
            o = reference.selected_attention(*ts[:3], idx, valid, ts[3], **kw)
            o.backward(dout.to(dt_))
            errs[dt_] = {"out": o.detach(), "dq": ts[0].grad, "dk": ts[1].grad, "dv": ts[2].grad, "dgates": ts[3].grad}
        got = {"out": out, "dq": dq, "dk": dk, "dv": dv, "dgates": dg}
        row = {"l": l, "H": H, "K": K, "causal": causal, "shared": shared, "first_call_s": round(dt, 2)}
        for name, x in got.items():
            r32, rlo = errs[torch.float32][name].float(), errs[dtype][name].float()
            row[name] = (float((x.float() - r32).abs().max()), float((rlo - r32).abs().max()))
        RESULTS["smoke"].append(row)
        log("smoke", json.dumps(row))


def timing(quick):
    b, H, K, d, l, kk = 1, 64, 4, 128, 64, 16
    for n in ([8192] if quick else [8192, 65536]):
        q, k, v, idx, valid, g = inputs(b, n, H, K, d, l, kk, True, torch.bfloat16, gates=False)
        tf, tfb, _ = bench_pair(q, k, v, idx, valid, None, l, True)
        row = {"n": n, "fwd_ms": tf, "fwd_bwd_ms": tfb}
        RESULTS["timing"].append(row)
        log("timing", json.dumps(row))


def packing():
    b, K, d, l, kk, n = 1, 4, 128, 64, 16, 8192
    for coherent in (False, True):
        for G in (1, 2, 4, 8):
            H = 4 * G
            q, k, v, idx, valid, g = inputs(b, n, H, K, d, l, kk, True, torch.bfloat16, coherent=coherent, gates=False)
            fspec, bspec = VariantSpec("select_fwd", l, G, True), VariantSpec("select_bwd", l, G, True)
            tf, tfb, (o1, s1) = bench_pair(q, k, v, idx, valid, None, l, True)
            pf, pb = padded_module(fspec), padded_module(bspec)
            tf0, tfb0, (o0, s0) = bench_pair(q, k, v, idx, valid, None, l, True, pf, pb)
            same = float((o1.float() - o0.float()).abs().max())
            row = {"G": G, "selection": "coherent" if coherent else "random", "pack_fwd_ms": tf, "pad_fwd_ms": tf0,
                   "pack_fwd_bwd_ms": tfb, "pad_fwd_bwd_ms": tfb0, "max_diff_pack_vs_pad": same}
            RESULTS["packing"].append(row)
            log("packing", json.dumps(row))


def g16_tokens(ns=(8192, 32768), H=64, K=4, d=128, l=64, kk=16):
    """G = 16 with several tokens per program (force_tpp 2, 4: 32 / 64 MMA rows over the union of the
    tokens' blocks) against the default one token per program, on random and local selections: whether
    packing tokens pays at G = 16 where selections have locality (it cannot share loads on random ones)."""
    b = 1
    RESULTS["g16_tokens"] = []
    for n in ns:
        for coherent in (False, True):
            q, k, v, idx, valid, g = inputs(b, n, H, K, d, l, kk, True, torch.bfloat16, coherent=coherent, gates=False)
            base = bench_pair(q, k, v, idx, valid, None, l, True)
            row = {"n": n, "selection": "local" if coherent else "random", "tpp1_fwd_ms": base[0],
                   "tpp1_fwd_bwd_ms": base[1]}
            for tpp in (2, 4):
                fm = render.load_with_layout(VariantSpec("select_fwd", l, 16, True), force_tpp=tpp)
                bm = render.load_with_layout(VariantSpec("select_bwd", l, 16, True), force_tpp=tpp)
                try:
                    tf, tfb, (o, _) = bench_pair(q, k, v, idx, valid, None, l, True, fm, bm)
                    row[f"tpp{tpp}_fwd_ms"], row[f"tpp{tpp}_fwd_bwd_ms"] = tf, tfb
                    row[f"tpp{tpp}_max_diff"] = float((o.float() - base[2][0].float()).abs().max())
                except Exception as exc:  # a layout that does not compile is reported, not fatal
                    row[f"tpp{tpp}_error"] = repr(exc)[:200]
            RESULTS["g16_tokens"].append(row)
            log("g16_tokens", json.dumps(row))


def resource_compare():
    d, dtype = 128, torch.bfloat16
    for name in ["select_fwd_bs64_g16_causal", "select_bwd_bs64_g16_causal", "select_fwd_bs64_g1_causal",
                 "select_bwd_bs64_g1_causal", "select_fwd_bs8_g16_noncausal", "select_bwd_bs8_g16_noncausal",
                 "select_fwd_bs128_g8_causal", "select_bwd_bs128_g8_causal"]:
        spec = VariantSpec.from_name(name)
        mod = cache.load_variant(spec)
        fam = spec.family
        l, G = spec.block_size, spec.group
        H, K = G * 2, 2
        q, k, v, idx, valid, g = inputs(1, 512, H, K, d, l, 4, spec.causal, dtype)
        kw = dict(block_size=l, causal=spec.causal, scale=d ** -0.5)
        out, lse = selected.selected_attention_fwd_launch(q, k, v, idx, valid, g, **kw)
        if fam == "select_bwd":
            selected.selected_attention_bwd_launch(q, k, v, idx, valid, g, out, lse, torch.randn_like(out), **kw)
        torch.cuda.synchronize()
        cfg_kw, launch = _launch.choose_config(mod, d, dtype)  # the default config
        compiled = None
        for dev_cache in mod.kernel.device_caches.values() if hasattr(mod.kernel, "device_caches") else []:
            for kern in dev_cache[0].values():
                compiled = kern
        if compiled is None and hasattr(mod.kernel, "cache"):
            for dev_cache in mod.kernel.cache.values():
                for kern in dev_cache.values():
                    compiled = kern
        config = {**cfg_kw, **launch}
        pred = resources.predict(spec, config, d, 2)
        row = {"variant": name, "config": config, "model_shared": pred["shared"], "model_regs": pred["n_regs"],
               "compiled_shared": getattr(getattr(compiled, "metadata", None), "shared", None),
               "compiled_regs": getattr(compiled, "n_regs", None), "spills": getattr(compiled, "n_spills", None)}
        RESULTS["resources"].append(row)
        log("resources", json.dumps(row))


def config_sweep():
    """fwd and fwd+bwd of the headline shape (n=8192, G=16) and of G=1 under every kept config."""
    import types

    b, K, d, l, kk, n = 1, 4, 128, 64, 16, 8192
    RESULTS["configs"] = []
    for G in (16, 1):
        q, k, v, idx, valid, g = inputs(b, n, 4 * G, K, d, l, kk, True, torch.bfloat16, gates=False)
        for fam in ("select_fwd", "select_bwd"):
            spec = VariantSpec(fam, l, G, True)
            mod = cache.load_variant(spec)
            for cfg in mod.CONFIGS:
                one = types.ModuleType(f"{mod.__name__}_cfg")
                one.__dict__.update({k_: v_ for k_, v_ in vars(mod).items() if not k_.startswith("__")})
                one.CONFIGS = [cfg]
                try:
                    if fam == "select_fwd":
                        t = bench_pair(q, k, v, idx, valid, None, l, True, fwd_mod=one)[0]
                    else:
                        t = bench_pair(q, k, v, idx, valid, None, l, True, bwd_mod=one)[1]
                except Exception as exc:  # a config that fails to compile is reported, not fatal
                    t = [float("nan"), repr(exc)[:80]]
                row = {"G": G, "family": fam, "config": {k_: cfg[k_] for k_ in ("BLOCK_N", "num_warps", "num_stages")},
                       "ms": t[0]}
                RESULTS["configs"].append(row)
                log("config", json.dumps(row))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".", help="folder for select_check.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", default="")
    args = ap.parse_args()
    RESULTS["env"] = {"torch": torch.__version__, "triton": triton.__version__, "gpu": torch.cuda.get_device_name()}
    log("env", RESULTS["env"])
    steps = {"smoke": smoke, "timing": lambda: timing(args.quick), "packing": packing, "g16_tokens": g16_tokens,
             "resources": resource_compare, "configs": config_sweep}
    for name, fn in steps.items():
        if name in args.skip.split(","):
            continue
        t0 = time.time()
        try:
            fn()
        except Exception as exc:  # keep going: later steps still report
            import traceback

            traceback.print_exc()
            RESULTS.setdefault("errors", []).append(f"{name}: {exc!r}")
        log(f"[{name}] {time.time() - t0:.1f}s")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "select_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    log("\n==== summary ====")
    for r in RESULTS["smoke"]:
        log(f"smoke l={r['l']:3d} H={r['H']:2d} K={r['K']} causal={r['causal']!s:5} shared={r['shared']!s:5} "
            + " ".join(f"{k}={v[0]:.2e}/{v[1]:.2e}" for k, v in r.items() if isinstance(v, tuple)))
    for r in RESULTS["timing"]:
        log(f"timing n={r['n']:6d} fwd {r['fwd_ms'][0]:.3f} ms  fwd+bwd {r['fwd_bwd_ms'][0]:.3f} ms")
    for r in RESULTS["packing"]:
        log(f"G={r['G']} {r['selection']:8s} fwd pack {r['pack_fwd_ms'][0]:.3f} / pad {r['pad_fwd_ms'][0]:.3f} ms; "
            f"fwd+bwd pack {r['pack_fwd_bwd_ms'][0]:.3f} / pad {r['pad_fwd_bwd_ms'][0]:.3f} ms")
    for r in RESULTS["resources"]:
        log(f"{r['variant']:32s} shared model {r['model_shared']:6d} compiled {r['compiled_shared']}  "
            f"regs model {r['model_regs']:4d} compiled {r['compiled_regs']} spills {r['spills']}")
    for r in RESULTS.get("configs", []):
        log(f"config G={r['G']:2d} {r['family']} {r['config']} -> {r['ms']:.3f} ms ({'fwd' if r['family'] == 'select_fwd' else 'fwd+bwd'})")
    for e in RESULTS.get("errors", []):
        log("ERROR", e)


if __name__ == "__main__":
    main()
