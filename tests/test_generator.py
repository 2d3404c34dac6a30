"""The generator spine: grid, names, rendering, freshness of generated/, the on-demand cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from collections import Counter

import pytest

from nsa_codegen.codegen import cache
from nsa_codegen.codegen import render
from nsa_codegen.codegen.spec import VariantSpec
from nsa_codegen.codegen.variants import default_variants
from nsa_codegen.kernels import BLOCK_SIZES, FAMILIES, GROUPS, SOURCES, shipped_grid

ROOT = Path(__file__).resolve().parent.parent
OFF_GRID = VariantSpec("select_fwd", 24, 2, True)  # l' = 24 is outside the default grid


def test_shipped_grid_is_the_registry_grid_247_unique_variants():
    """Selected attention and top-k (l' x G x causal x {fwd, bwd}: 100 each), sliding window and compressed
    attention (G x causal x {fwd, bwd}: 20 each), decoding (G, causal only, forward only: 5), the gated
    combine (one forward, one backward), in the family order of the registry."""
    specs = list(default_variants())
    assert specs == list(shipped_grid())
    assert len(specs) == 247
    assert len({s.name for s in specs}) == 247
    assert len({s.key for s in specs}) == 247
    assert Counter(s.family for s in specs) == {
        "select_fwd": 50, "select_bwd": 50, "topk_fwd": 50, "topk_bwd": 50,
        "window_fwd": 10, "window_bwd": 10, "cmp_fwd": 10, "cmp_bwd": 10, "decode_fwd": 5,
        "combine_fwd": 1, "combine_bwd": 1}
    assert set(SOURCES) == {s.family for s in specs}
    assert [SOURCES[s.family].name for s in specs] == sorted(
        (SOURCES[s.family].name for s in specs), key=list(FAMILIES).index)
    for family in FAMILIES.values():
        mine = [s for s in specs if s.family in family.sources]
        if family.one_variant:
            assert [(s.block_size, s.group, s.causal) for s in mine] == [(0, 1, False)] * len(family.sources)
            continue
        assert {s.block_size for s in mine} == (set(BLOCK_SIZES) if family.has_block_size else {0})
        assert {s.group for s in mine} == set(GROUPS) and {s.causal for s in mine} == set(family.causal_modes)


def test_names_are_readable_and_invertible():
    spec = VariantSpec("select_fwd", 64, 16, True)
    assert spec.name == "select_fwd_bs64_g16_causal"
    assert VariantSpec("select_bwd", 20, 1, False).name == "select_bwd_bs20_g1_noncausal"
    assert VariantSpec("combine_bwd", 0, 1, False).name == "combine_bwd"  # one variant: the source's name
    for s in default_variants():
        assert VariantSpec.from_name(s.name) == s
    with pytest.raises(ValueError, match="not a variant name"):
        VariantSpec.from_name("select_fwd_64")


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(family="dense", block_size=64, group=1, causal=True), "family"),
        (dict(family="select_fwd", block_size=0, group=1, causal=True), "block_size"),
        (dict(family="select_fwd", block_size=64, group=0, causal=True), "group"),
        (dict(family="select_fwd", block_size=64, group=1, causal=1), "causal"),
        (dict(family="combine_fwd", block_size=0, group=2, causal=False), "one variant"),
        (dict(family="combine_fwd", block_size=0, group=1, causal=True), "one variant"),
    ],
)
def test_spec_rejects_bad_fields(kwargs, word):
    with pytest.raises(ValueError, match=word):
        VariantSpec(**kwargs)


def test_generated_dir_is_fresh_and_generate_is_idempotent(tmp_path):
    first = render.generate(default_variants(), tmp_path)
    assert first["total"] == 247 and len(first["changed"]) == 248  # 247 sources + manifest
    second = render.generate(default_variants(), tmp_path)
    assert second["changed"] == [] and second["removed"] == []
    # the committed generated/ equals a fresh render, byte for byte
    for path in sorted(tmp_path.rglob("*.py")) + [tmp_path / "manifest.json"]:
        shipped = render.GENERATED_DIR / path.relative_to(tmp_path)
        assert shipped.is_file(), f"{shipped} missing: run `make generate`"
        assert shipped.read_text() == path.read_text(), f"{shipped} is stale: run `make generate`"
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entry = manifest["variants"][0]
    assert set(entry) >= {"name", "spec", "template_sha256", "generator_version"}


def test_generate_removes_variants_no_longer_in_the_grid(tmp_path):
    render.generate(default_variants(), tmp_path)
    stale = tmp_path / "select_fwd" / "select_fwd_bs3_g1_causal.py"
    stale.write_text("# old\n")
    result = render.generate(default_variants(), tmp_path)
    assert result["removed"] == ["select_fwd/select_fwd_bs3_g1_causal.py"] and not stale.exists()


def test_rendered_source_records_spec_hash_and_configs():
    text = render.render(VariantSpec("select_fwd", 64, 16, True))
    assert "# variant: select_fwd_bs64_g16_causal" in text
    assert f"# template_sha256: {render.template_sha256('select_fwd.py.j2')}" in text
    assert "# configs kept (" in text and "# configs dropped (" in text
    compile(text, "<generated>", "exec")  # valid Python


def test_causal_and_noncausal_sources_differ_structurally():
    causal = render.render(VariantSpec("select_fwd", 64, 16, True))
    noncausal = render.render(VariantSpec("select_fwd", 64, 16, False))
    assert causal != noncausal


def test_shipped_variant_is_found_and_off_grid_is_not(monkeypatch, tmp_path):
    monkeypatch.setenv("NSA_CODEGEN_CACHE", str(tmp_path))
    assert cache.shipped_path(VariantSpec("select_bwd", 8, 4, False)) is not None
    assert cache.shipped_path(OFF_GRID) is None
    path = cache.source_path(OFF_GRID)
    assert path.is_relative_to(tmp_path) and path.read_text() == render.render(OFF_GRID)


def test_shipped_file_from_other_templates_is_not_used(monkeypatch, tmp_path):
    spec = VariantSpec("select_fwd", 64, 16, True)
    fake_root = tmp_path / "generated"
    fake = render.generated_path(spec, fake_root)
    fake.parent.mkdir(parents=True)
    fake.write_text(render.render(spec).replace(render.template_sha256(spec.template), "0" * 64))
    monkeypatch.setattr(render, "GENERATED_DIR", fake_root)
    assert cache.shipped_path(spec) is None
    fake.write_text(render.render(spec))  # the same file with the current hash is accepted
    assert cache.shipped_path(spec) == fake


def test_stale_cache_entry_is_rerendered_not_imported(monkeypatch, tmp_path):
    monkeypatch.setenv("NSA_CODEGEN_CACHE", str(tmp_path))
    path = cache.source_path(OFF_GRID)
    meta_path = path.parent / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["template_sha256"] = "stale"
    meta_path.write_text(json.dumps(meta))
    path.write_text("raise RuntimeError('stale source imported')\n")
    again = cache.source_path(OFF_GRID)
    assert again.read_text() == render.render(OFF_GRID)
    assert len((tmp_path / "renders.log").read_text().splitlines()) == 2


_RACE = textwrap.dedent(
    """
    import sys, time
    import nsa_codegen.codegen.render as r
    from nsa_codegen.codegen import cache
    from nsa_codegen.codegen.spec import VariantSpec
    slow = r.render
    def render_slowly(spec):  # widen the race window so both processes contend for the lock
        time.sleep(1.0)
        return slow(spec)
    r.render = render_slowly
    barrier_at = float(sys.argv[1])
    time.sleep(max(0.0, barrier_at - time.time()))
    print(cache.source_path(VariantSpec("select_bwd", 24, 2, False)))
    """
)


def test_two_processes_render_a_new_variant_once(tmp_path):
    import time

    env = dict(os.environ, NSA_CODEGEN_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    start_at = str(time.time() + 3.0)
    procs = [
        subprocess.Popen([sys.executable, "-c", _RACE, start_at], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outputs[0] == outputs[1] and Path(outputs[0]).is_file()
    renders = (tmp_path / "cache" / "renders.log").read_text().splitlines()
    assert len(renders) == 1, renders
