"""The sympy resource model of the selected-attention kernels (nsa_codegen/codegen/resources/selected.py) on
the shared core (nsa_codegen/codegen/resources/__init__.py), and the program layout the templates render
from (`layout`: its rules per group size, block size and forced option)."""
from __future__ import annotations

import itertools
import re

import pytest

from nsa_codegen.codegen import render
from nsa_codegen.codegen import resources as core
from nsa_codegen.codegen.resources import selected as resources
from nsa_codegen.codegen.spec import VariantSpec
from nsa_codegen.codegen.variants import default_variants

SELECT = [s for s in default_variants() if s.family in ("select_fwd", "select_bwd")]


def test_formulas_are_sympy_and_lambdified_once():
    import sympy

    for fam in ("select_fwd", "select_bwd"):
        formula = resources.FORMULAS[fam]
        assert isinstance(formula.smem, sympy.Expr) and isinstance(formula.regs, sympy.Expr)
        first = formula(16, 64, 128, 2, 2, 4)
        functions = dict(formula._fns)
        assert formula(16, 64, 128, 2, 2, 4) == first and formula._fns == functions  # lambdified once


def test_shared_memory_formula_by_hand():
    spec = VariantSpec("select_fwd", 64, 16, True)
    cfg = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    # 2 stages x (K + V tiles 64 x 128 x 2 B) + Q 16 x 128 x 2 B + P 16 x 64 x 2 B
    assert resources.predict(spec, cfg, 128, 2)["shared"] == 2 * 2 * 64 * 128 * 2 + 16 * 128 * 2 + 16 * 64 * 2
    assert resources.predict(spec, cfg, 100, 2)["BLOCK_D"] == 128  # head dims pad to a power of two


@pytest.mark.parametrize("spec", SELECT, ids=[s.name for s in SELECT])
def test_kept_configs_fit_at_the_largest_head_dim(spec):
    kept, dropped = resources.tile_configs(spec)
    assert kept, f"{spec.name}: every config dropped"
    for cfg in kept:
        assert resources.predict(spec, cfg, core.MAX_HEAD_DIM, 2)["shared"] <= core.SMEM_LIMIT
        assert cfg["max_d16"] == core.MAX_HEAD_DIM and 0 < cfg["max_d32"] <= core.MAX_HEAD_DIM
    for line in dropped:
        assert re.search(r"shared memory \d+ B > 232448 B at head dim 256", line), line


def test_large_blocks_drop_deep_pipelines():
    kept, dropped = resources.tile_configs(VariantSpec("select_bwd", 128, 16, False))
    assert all(c["num_stages"] == 1 for c in kept)
    assert any("num_stages=2" in d for d in dropped) and any("num_stages=3" in d for d in dropped)
    kept, dropped = resources.tile_configs(VariantSpec("select_fwd", 16, 16, True))
    assert not dropped and len(kept) == 6


def _layout(block_size, group, **force):
    return resources.layout(VariantSpec("select_fwd", block_size, group, True), **force)


@pytest.mark.parametrize("group,gp,tpp,rows", [(1, 1, 16, 16), (2, 2, 8, 16), (3, 4, 4, 16), (4, 4, 4, 16),
                                               (8, 8, 2, 16), (16, 16, 1, 16), (32, 32, 1, 32)])
def test_layout_packs_groups_below_16_into_16_rows(group, gp, tpp, rows):
    """Rows per token: the group padded to a power of two. Below 16, 16 // GP consecutive tokens share the
    MMA's 16 rows; a group of 16 or more fills them alone."""
    lay = _layout(64, group)
    assert (lay["GP"], lay["TOKENS_PER_PROGRAM"], lay["BLOCK_M"]) == (gp, tpp, rows)
    assert lay["PADDING_BASELINE"] is False


@pytest.mark.parametrize("block_size,lp,tile", [(2, 2, 16), (4, 4, 16), (8, 8, 16), (16, 16, 16), (20, 32, 32),
                                                (32, 32, 32), (64, 64, 64), (128, 128, 128)])
def test_layout_key_tiles(block_size, lp, tile):
    """A selected block, and the causal own block, sit in one key tile of max(16, LP) keys; with one token
    per program, blocks under 16 keys are gathered several to a tile (any of the supported widths);
    programs of several tokens never gather."""
    one_token, packed = _layout(block_size, 16), _layout(block_size, 4)
    for lay in (one_token, packed):
        assert (lay["LP"], lay["BLOCK_TILE"], lay["BLOCK_DIAG"]) == (lp, tile, tile)
    gathered = block_size < 16
    assert one_token["GATHERED"] is gathered
    assert one_token["BLOCK_N"] == ((16, 32, 64) if gathered else (tile,))
    assert packed["GATHERED"] is False and packed["BLOCK_N"] == (tile,)


def test_layout_force_options():
    """force_pad: one token per program, the group padded to 16 rows (so small blocks gather); force_tpp:
    that many tokens per program, over force_pad too, never gathered. Neither changes the dkv tiling."""
    default = _layout(8, 4)
    pad = _layout(8, 4, force_pad=True)
    assert (pad["TOKENS_PER_PROGRAM"], pad["BLOCK_M"], pad["GATHERED"], pad["PADDING_BASELINE"]) == (1, 16, True, True)
    assert pad["BLOCK_N"] == (16, 32, 64)
    assert _layout(64, 16, force_pad=True) == {**_layout(64, 16), "PADDING_BASELINE": True}  # G = 16 pads nothing
    tpp2 = _layout(64, 16, force_tpp=2)
    assert (tpp2["TOKENS_PER_PROGRAM"], tpp2["BLOCK_M"], tpp2["GATHERED"]) == (2, 32, False)
    small = _layout(8, 16, force_tpp=2)
    assert small["GATHERED"] is False and small["BLOCK_N"] == (16,)
    assert _layout(8, 2, force_tpp=16)["BLOCK_M"] == 32
    both = _layout(8, 4, force_pad=True, force_tpp=2)
    assert (both["TOKENS_PER_PROGRAM"], both["PADDING_BASELINE"]) == (2, True)
    dkv = [k for k in default if k.startswith("DKV_")]
    for lay in (pad, both):
        assert {k: lay[k] for k in dkv} == {k: default[k] for k in dkv}


@pytest.mark.parametrize("block_size,group,block_k,tiles,tokens,segment", [
    (8, 1, 16, 1, 64, 4096), (20, 3, 32, 1, 16, 1024), (64, 4, 64, 1, 16, 1024), (128, 16, 64, 2, 4, 256),
    (64, 32, 64, 1, 2, 128), (16, 128, 16, 1, 1, 32)])
def test_layout_dkv_tiling(block_size, group, block_k, tiles, tokens, segment):
    """dkv_kernel: key tiles of at most 64 keys, whole groups gathered to 64 or more rows per step, segments
    of about 4096 rows."""
    lay = resources.layout(VariantSpec("select_bwd", block_size, group, False))
    assert (lay["DKV_BLOCK_K"], lay["DKV_KEY_TILES"], lay["DKV_TOKENS"], lay["DKV_SEGMENT"]) == (
        block_k, tiles, tokens, segment)
    assert lay["DKV_ROWS"] == tokens * lay["GP"] >= 64


def test_layout_invariants():
    """Over block sizes 1..129 and groups 1..39: the tiles hold the block (the dkv key tiles cover exactly
    the block tile, which its l' mask relies on) and a program's rows are whole groups."""
    for block_size, group in itertools.product(range(1, 130), range(1, 40)):
        lay = _layout(block_size, group)
        assert lay["GP"] >= group and lay["GP"] & (lay["GP"] - 1) == 0
        assert lay["BLOCK_TILE"] >= lay["LP"] >= block_size and lay["LP"] & (lay["LP"] - 1) == 0
        assert lay["DKV_BLOCK_K"] * lay["DKV_KEY_TILES"] == lay["BLOCK_TILE"] and lay["DKV_BLOCK_K"] <= 64
        assert lay["BLOCK_M"] == lay["GP"] * lay["TOKENS_PER_PROGRAM"] >= 16


@pytest.mark.parametrize("spec", [VariantSpec("select_fwd", 8, 16, True), VariantSpec("select_bwd", 64, 2, False),
                                  VariantSpec("select_fwd", 20, 3, True), VariantSpec("select_bwd", 128, 32, True)],
                         ids=lambda s: s.name)
def test_rendered_file_records_configs_and_specializes(spec):
    text = render.render(spec)
    kept, dropped = resources.tile_configs(spec)
    assert f"# configs kept ({len(kept)}):" in text and f"# configs dropped ({len(dropped)}):" in text
    ns = {}
    exec(compile(text.split("@triton.jit")[0], spec.name, "exec"), ns)  # module constants only
    assert ns["CONFIGS"] == kept
    # structural specialization: no causal code in non-causal sources, no packing loop with one token
    assert ("own block" in text) == spec.causal
    assert ("for t in range(" in text) == (resources.layout(spec)["TOKENS_PER_PROGRAM"] > 1)


def test_predict_reports_registers():
    spec = VariantSpec("select_bwd", 64, 16, True)
    p4 = resources.predict(spec, {"BLOCK_N": 64, "num_warps": 4, "num_stages": 1}, 128, 2)
    p8 = resources.predict(spec, {"BLOCK_N": 64, "num_warps": 8, "num_stages": 1}, 128, 2)
    assert p8["n_regs"] < p4["n_regs"] and p4["n_regs"] > 0


def test_unknown_family_is_rejected():
    class Fake:
        family = "cmp_fwd"

    with pytest.raises(ValueError, match="no resource model"):
        resources.tile_configs(Fake())


def test_dkv_shared_memory_by_hand():
    spec = VariantSpec("select_bwd", 64, 16, True)  # DKV_BLOCK_K = 64 keys, DKV_ROWS = 4 tokens x 16 heads
    pred = resources.predict_dkv(spec, 128, 2, 4, 1)
    assert (pred["DKV_BLOCK_K"], pred["DKV_ROWS"], pred["BLOCK_D"]) == (64, 64, 128)
    # K, V tiles 64 x 128 x 2 B + 1 stage x (Q, dO rows 64 x 128 x 2 B) + P^T, dS^T 64 x 64 x 2 B
    assert pred["shared"] == 2 * 64 * 128 * 2 + 2 * 64 * 128 * 2 + 2 * 64 * 64 * 2
