"""Plots of a bench JSON: `python -m benchmarks.plot benchmarks/results/bench_*.json [--out DIR]`.

Writes, next to the JSON (or in --out), with the JSON's stem as prefix:
  *_time_fwd.png, *_time_fwdbwd.png  time vs n (log-log), selected branch, one line per implementation
  *_speedup.png                      speedup over dense causal SDPA (flash) vs n, fwd and fwd+bwd
  *_gqa.png                          GQA sweep: achieved TFLOP/s of the selected branch per G
  *_layer.png                        whole-layer core vs dense SDPA, time vs n
  *_branches.png                     each layer branch alone next to the whole layer core, time vs n
Rows that failed or were skipped are listed in a note under each figure, never drawn as numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

STYLE = {
    "ours": dict(color="tab:red", marker="o", lw=2.2),
    "ours_local": dict(color="salmon", marker="o"),
    "fla": dict(color="tab:blue", marker="s"),
    "nsa_pytorch": dict(color="tab:green", marker="^"),
    "flex": dict(color="tab:purple", marker="D"),
    "sdpa_flash": dict(color="black", marker="x", ls="--"),
    "sdpa_cudnn": dict(color="gray", marker="+", ls="--"),
    "reference": dict(color="tab:brown", marker="v", ls=":"),
    "layer_ours": dict(color="tab:red", marker="o", ls="-."),
    "layer_reference": dict(color="tab:brown", marker="v", ls="-."),
    "fla_layer": dict(color="tab:blue", marker="s", ls="-."),
    "branch_compressed": dict(color="tab:orange", marker="<"),
    "branch_topk": dict(color="tab:olive", marker=">"),
    "branch_sliding": dict(color="tab:cyan", marker="P"),
    "branch_compress_mlp": dict(color="tab:pink", marker="*"),
}
SHORT = {
    "ours": "ours (generated Triton)",
    "ours_local": "ours, local selections",
    "fla": "fla parallel_nsa",
    "nsa_pytorch": "native-sparse-attention-pytorch 0.2.3",
    "flex": "FlexAttention (block mask)",
    "sdpa_flash": "dense SDPA flash",
    "sdpa_cudnn": "dense SDPA cuDNN",
    "reference": "PyTorch reference",
    "layer_ours": "layer core: ours (kernels per branch)",
    "layer_reference": "layer: all PyTorch reference",
    "fla_layer": "fla parallel_nsa cmp+topk+slc (no swa)",
    "branch_compressed": "branch: compressed attention (kernel)",
    "branch_topk": "branch: top-k selection (kernel, fwd only)",
    "branch_sliding": "branch: sliding window (kernel)",
    "branch_compress_mlp": "branch: compression MLPs k+v (cuBLAS)",
}
BRANCHES = ("branch_compressed", "branch_topk", "branch_sliding", "branch_compress_mlp")
MODES = {"fwd": "forward", "fwdbwd": "forward + backward"}


def _rows(res, section, impl=None, mode=None, status="ok", G=None):
    out = []
    for r in res["rows"]:
        if r["section"] != section or (impl and r["impl"] != impl) or (mode and r["mode"] != mode):
            continue
        if status and r["status"] != status:
            continue
        if G is not None and r["G"] != G:
            continue
        out.append(r)
    return sorted(out, key=lambda r: (r["n"], r["G"]))


def _impls(res, sections):
    seen = []
    for r in res["rows"]:
        if r["section"] in sections and r["impl"] not in seen:
            seen.append(r["impl"])
    return seen


def _failures(res, sections, mode=None, keep=None):
    lines, seen = [], set()
    for r in res["rows"]:
        if keep is not None and not keep(r["impl"]):
            continue
        if r["section"] in sections and r["status"] != "ok" and (mode is None or r["mode"] == mode):
            key = (r["impl"], r["status"], (r.get("error") or "")[:70])
            if key in seen:
                continue
            seen.add(key)
            lines.append(f"{SHORT.get(r['impl'], r['impl']).splitlines()[0]} ({r['section']}, n={r['n']}, "
                         f"G={r['G']}): {r['status']}: {(r.get('error') or '')[:90]}")
    return lines


def _title(res, what):
    m = res["meta"]
    c = res["config"]
    return (f"{what}\n{m.get('gpu', '?')}, torch {m.get('torch')}, triton {m.get('triton')}, "
            f"{m.get('date_utc', '')[:10]}; b={c['b']} H={c['H']} d={c['d']} l'={c['selection_block_size']} "
            f"k={c['num_selected']} bf16")


def _note(fig, lines, limit=8):
    if not lines:
        return
    text = "\n".join(lines[:limit]) + (f"\n(+{len(lines) - limit} more in the JSON)" if len(lines) > limit else "")
    fig.text(0.01, 0.005, text, fontsize=6.5, va="bottom", ha="left", family="monospace")


def _fmt_n(ax, ns):
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns)
    ax.set_xticklabels([f"{n // 1024}k" for n in ns])
    ax.set_xlabel("sequence length n")


def plot_time(res, mode, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6.2))
    ns = sorted({r["n"] for r in res["rows"] if r["section"] in ("selected", "flex")})
    for impl in _impls(res, ("selected", "flex")):
        rows = _rows(res, "selected", impl, mode) + _rows(res, "flex", impl, mode)
        if not rows:
            continue
        x = [r["n"] for r in rows]
        ax.errorbar(x, [r["ms"] for r in rows],
                    yerr=[[r["ms"] - r["ms_p20"] for r in rows], [r["ms_p80"] - r["ms"] for r in rows]],
                    label=SHORT.get(impl, impl), capsize=2, **STYLE.get(impl, {}))
    ax.set_yscale("log")
    _fmt_n(ax, ns)
    ax.set_ylabel("time per call, ms (median, 20-80% bars)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(_title(res, f"Selected-block attention, {MODES[mode]} (G=16)"), fontsize=9)
    fails = _failures(res, ("selected", "flex"), mode)
    fig.subplots_adjust(bottom=0.12 + 0.018 * min(len(fails), 9))
    _note(fig, fails)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_speedup(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6), sharey=True)
    ns = sorted({r["n"] for r in res["rows"] if r["section"] == "selected"})
    for ax, mode in zip(axes, ("fwd", "fwdbwd")):
        dense = {r["n"]: r["ms"] for r in _rows(res, "selected", "sdpa_flash", mode)}
        for impl, sec in [("ours", "selected"), ("fla", "selected"), ("nsa_pytorch", "selected"),
                          ("flex", "flex"), ("sdpa_cudnn", "selected"), ("layer_ours", "layer"),
                          ("fla_layer", "layer")]:
            rows = [r for r in _rows(res, sec, impl, mode, G=16) if r["n"] in dense]
            if not rows:
                continue
            ax.plot([r["n"] for r in rows], [dense[r["n"]] / r["ms"] for r in rows],
                    label=SHORT.get(impl, impl), **STYLE.get(impl, {}))
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_yscale("log")
        _fmt_n(ax, ns)
        ax.set_title(MODES[mode], fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speedup over dense causal SDPA (flash backend)")
    axes[1].legend(fontsize=7)
    fig.suptitle(_title(res, "Speedup over dense attention"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gqa(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows_all = [r for r in res["rows"] if r["section"] == "gqa"]
    if not rows_all:
        return False
    n_gqa = rows_all[0]["n"]
    # the base G at the sweep's n is the selected section's row (same configuration, same run)
    from_sel = [dict(r, _from_selected=True) for r in res["rows"]
                if r["section"] == "selected" and r["n"] == n_gqa and r["status"] == "ok"
                and r["impl"] in {x["impl"] for x in rows_all}
                and not any(x["G"] == r["G"] and x["impl"] == r["impl"] and x["mode"] == r["mode"]
                            and x["status"] == "ok" for x in rows_all)]
    rows_all = [r for r in rows_all if not any(
        f["G"] == r["G"] and f["impl"] == r["impl"] and f["mode"] == r["mode"] for f in from_sel)] + from_sel
    Gs = sorted({r["G"] for r in rows_all})
    impls = _impls(res, ("gqa",))
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6))
    width = 0.8 / max(1, len(impls))
    for ax, mode in zip(axes, ("fwd", "fwdbwd")):
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for i, G in enumerate(Gs):
                r = [x for x in rows_all if x["impl"] == impl and x["G"] == G and x["mode"] == mode]
                if r and r[0]["status"] == "ok" and r[0].get("tflops"):
                    x = i + (j - (len(impls) - 1) / 2) * width
                    if r[0].get("_from_selected"):
                        ax.bar([x], [r[0]["tflops"]], width=width, hatch="//", edgecolor="k",
                               color=STYLE.get(impl, {}).get("color"))
                    else:
                        xs.append(x)
                        ys.append(r[0]["tflops"])
                elif r:
                    ax.text(i + (j - (len(impls) - 1) / 2) * width, 0, "x", ha="center", va="bottom",
                            color=STYLE.get(impl, {}).get("color", "k"), fontsize=8)
            if xs:
                ax.bar(xs, ys, width=width, color=STYLE.get(impl, {}).get("color"))
        ax.set_xticks(range(len(Gs)))
        ax.set_xticklabels([f"G={G}\n(K={res['config']['H'] // G})" for G in Gs])
        ax.set_ylabel("achieved TFLOP/s (useful FLOPs)")
        ax.set_title(f"{MODES[mode]}, n={n_gqa}", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    from matplotlib.patches import Patch
    axes[1].legend(handles=[Patch(color=STYLE.get(i, {}).get("color"), label=SHORT.get(i, i)) for i in impls],
                   fontsize=7)
    fig.suptitle(_title(res, "GQA sweep of the selected branch at fixed H (x: not run / unsupported; "
                         "hatched: the selected section's row at the same n)"), fontsize=9)
    fails = _failures(res, ("gqa",))
    fig.tight_layout(rect=(0, 0.03 + 0.022 * min(len(fails), 9), 1, 1))
    _note(fig, fails)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_layer(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(r["section"] == "layer" for r in res["rows"]):
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.8), sharey=True)
    ns = sorted({r["n"] for r in res["rows"] if r["section"] in ("layer", "selected")})
    for ax, mode in zip(axes, ("fwd", "fwdbwd")):
        for impl, sec in [("layer_ours", "layer"), ("layer_reference", "layer"), ("fla_layer", "layer"),
                          ("sdpa_flash", "selected"), ("sdpa_cudnn", "selected")]:
            rows = _rows(res, sec, impl, mode, G=16)
            if rows:
                ax.plot([r["n"] for r in rows], [r["ms"] for r in rows], label=SHORT.get(impl, impl),
                        **STYLE.get(impl, {}))
        ax.set_yscale("log")
        _fmt_n(ax, ns)
        ax.set_title(MODES[mode], fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("time per call, ms (median)")
    axes[1].legend(fontsize=7)
    fig.suptitle(_title(res, "Whole-layer core (no projections) vs dense attention"), fontsize=9)
    fails = _failures(res, ("layer",), keep=lambda i: not i.startswith("branch_"))
    fig.tight_layout(rect=(0, 0.03 + 0.022 * min(len(fails), 9), 1, 1))
    _note(fig, fails)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_branches(res, path):
    """Each branch of the layer core timed alone (same inputs and config as the layer rows), with the
    whole layer core (kernels) for scale; fwd and fwd+bwd."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(r["section"] == "layer" and r["impl"].startswith("branch_") for r in res["rows"]):
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.8), sharey=True)
    ns = sorted({r["n"] for r in res["rows"] if r["section"] == "layer"})
    for ax, mode in zip(axes, ("fwd", "fwdbwd")):
        for impl in ("layer_ours",) + BRANCHES:
            rows = _rows(res, "layer", impl, mode)
            if rows:
                ax.plot([r["n"] for r in rows], [r["ms"] for r in rows], label=SHORT.get(impl, impl),
                        **STYLE.get(impl, {}))
        ax.set_yscale("log")
        _fmt_n(ax, ns)
        ax.set_title(MODES[mode], fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("time per call, ms (median)")
    handles = {}
    for ax in axes:  # top-k is forward-only: merge both panels' entries
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if handles:
        axes[1].legend(list(handles.values()), list(handles.keys()), fontsize=7)
    fig.suptitle(_title(res, "Layer core branch by branch (each alone) vs the whole layer core"), fontsize=9)
    fails = _failures(res, ("layer",), keep=lambda i: i.startswith("branch_"))
    fig.tight_layout(rect=(0, 0.03 + 0.022 * min(len(fails), 9), 1, 1))
    _note(fig, fails)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_first_call(res, path):
    """Seconds from building the layer to the end of its first forward + backward, per scenario (fresh
    processes; import time shown apart)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(res, "first_call")
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(8, 3.6))
    names = [r["impl"] for r in rows]
    ax.barh(names, [r["first_s"] for r in rows], color="tab:blue", label="first forward + backward")
    ax.barh(names, [r["import_s"] for r in rows], left=[r["first_s"] for r in rows], color="tab:gray",
            alpha=0.5, label="import torch + nsa_codegen")
    for i, r in enumerate(rows):
        ax.text(r["first_s"] + r["import_s"], i, f"  {r['first_s']:.1f} s (+{r['import_s']:.1f} s import)",
                va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_xlim(0, max(r["first_s"] + r["import_s"] for r in rows) * 1.45)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    m = res["meta"]
    fig.suptitle(f"First call of the README's example layer (H=8, K=2, d=64, l'=16, bf16, n={rows[0]['n']}), "
                 f"fresh process\n{m.get('gpu', '?')}, torch {m.get('torch')}, triton {m.get('triton')}, "
                 f"{m.get('date_utc', '')[:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_all(json_path, out_dir=None) -> list[Path]:
    json_path = Path(json_path)
    res = json.loads(json_path.read_text())
    out = Path(out_dir) if out_dir else json_path.parent
    out.mkdir(parents=True, exist_ok=True)
    stem = json_path.stem
    written = []
    if any(r["section"] in ("selected", "flex") for r in res["rows"]):
        for mode in ("fwd", "fwdbwd"):
            p = out / f"{stem}_time_{mode}.png"
            plot_time(res, mode, p)
            written.append(p)
        p = out / f"{stem}_speedup.png"
        plot_speedup(res, p)
        written.append(p)
    p = out / f"{stem}_first_call.png"
    if plot_first_call(res, p):
        written.append(p)
    p = out / f"{stem}_gqa.png"
    if plot_gqa(res, p):
        written.append(p)
    p = out / f"{stem}_layer.png"
    if plot_layer(res, p):
        written.append(p)
    p = out / f"{stem}_branches.png"
    if plot_branches(res, p):
        written.append(p)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.plot")
    ap.add_argument("json", nargs="+")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    for j in a.json:
        for p in plot_all(j, a.out):
            print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
