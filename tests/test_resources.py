"""The sympy resource model of the selected-attention kernels (nsa_codegen/codegen/resources/selected.py) on
the shared core (nsa_codegen/codegen/resources/__init__.py)."""
from __future__ import annotations

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


def test_layout_rules():
    lay = resources.layout
    assert lay(VariantSpec("select_fwd", 64, 16, True))["TOKENS_PER_PROGRAM"] == 1
    assert lay(VariantSpec("select_fwd", 64, 32, True))["BLOCK_M"] == 32
    assert lay(VariantSpec("select_fwd", 64, 4, True))["TOKENS_PER_PROGRAM"] == 4
    assert lay(VariantSpec("select_fwd", 64, 4, True), force_pad=True)["TOKENS_PER_PROGRAM"] == 1
    assert lay(VariantSpec("select_fwd", 64, 3, True))["TOKENS_PER_PROGRAM"] == 4  # G = 3 pads to 4 rows
    assert lay(VariantSpec("select_fwd", 8, 16, True))["GATHERED"] is True
    assert lay(VariantSpec("select_fwd", 8, 16, True))["BLOCK_N"] == (16, 32, 64)
    assert lay(VariantSpec("select_fwd", 20, 16, True))["BLOCK_N"] == (32,)


@pytest.mark.parametrize("spec", [VariantSpec("select_fwd", 8, 16, True), VariantSpec("select_bwd", 64, 2, False),
                                  VariantSpec("select_fwd", 20, 3, True), VariantSpec("select_bwd", 128, 32, True)],
                         ids=lambda s: s.name)
def test_rendered_file_matches_layout_and_records_configs(spec):
    text = render.render(spec)
    lay = resources.layout(spec)
    assert f"BLOCK_M = {lay['BLOCK_M']}\n" in text
    assert f"TOKENS_PER_PROGRAM = {lay['TOKENS_PER_PROGRAM']}\n" in text
    kept, dropped = resources.tile_configs(spec)
    assert f"# configs kept ({len(kept)}):" in text and f"# configs dropped ({len(dropped)}):" in text
    ns = {}
    exec(compile(text.split("@triton.jit")[0], spec.name, "exec"), ns)  # module constants only
    assert ns["CONFIGS"] == kept
    # structural specialization: no causal code in non-causal sources, no packing loop with one token
    assert ("own block" in text) == spec.causal
    assert ("for t in range(" in text) == (lay["TOKENS_PER_PROGRAM"] > 1)


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


@pytest.mark.parametrize("name", ["select_bwd_bs64_g16_causal", "select_bwd_bs8_g4_noncausal",
                                  "select_bwd_bs128_g1_causal", "select_bwd_bs20_g3_causal"])
def test_dkv_model_layout_matches_the_rendered_kernel(name):
    """predict_dkv repeats the template's dkv layout rules (key tile, gathered rows): they must agree."""
    from nsa_codegen.codegen import cache

    spec = VariantSpec.from_name(name)
    module = cache.load_variant(spec)
    pred = resources.predict_dkv(spec, 128, 2, 4, 1)
    gp = 1 << (spec.group - 1).bit_length()
    assert pred["DKV_BLOCK_K"] == module.DKV_BLOCK_K
    assert pred["DKV_ROWS"] == module.DKV_TOKENS * gp
