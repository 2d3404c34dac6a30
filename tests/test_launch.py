"""What every launcher shares (nsa_codegen/kernels/_launch.py, the family registry in
nsa_codegen/kernels/__init__.py): the one config-choice rule, the routing of the public ops and the
paths they report, the registry as the one list of families; and the poison fixture of conftest.py
(every launcher output passes through the poisoned allocator)."""
from __future__ import annotations

import pytest
import torch

from conftest import POISON_INT, interpreter_lane
from nsa_codegen import reference
from nsa_codegen.codegen import cache
from nsa_codegen.codegen.spec import VariantSpec
from nsa_codegen.kernels import (FAMILIES, SOURCES, _launch, combine, compressed, dense, family_of, selected, topk,
                                 tuning)
from nsa_codegen.kernels import window as window_ops

C = [  # synthetic configs, render-time order
    {"BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "max_d16": 256, "max_d32": 128},
    {"BLOCK_N": 32, "num_warps": 8, "num_stages": 1, "max_d16": 256, "max_d32": 256},
    {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "max_d16": 128, "max_d32": 64},
]


# ----------------------------------------------------------------------------------------------------
# config choice: one rule


def test_default_is_the_first_fitting_config_else_the_largest_limit():
    assert _launch.fitting_configs(C, 128, 2) == C and _launch.default_config(C, 128, 2) == C[0]
    assert _launch.fitting_configs(C, 256, 4) == [C[1]] and _launch.default_config(C, 256, 4) == C[1]
    assert _launch.fitting_configs(C, 256, 2) == C[:2]
    # nothing fits: the config with the largest limit for the dtype width (the first of equals)
    small = [dict(c, max_d16=64, max_d32=32) for c in C[:2]] + [dict(C[2], max_d16=128, max_d32=16)]
    assert _launch.fitting_configs(small, 256, 2) == [] and _launch.default_config(small, 256, 2) == small[2]
    assert _launch.default_config(small, 256, 4) == small[0]
    assert _launch.split(C[2]) == ({"BLOCK_N": 64}, {"num_warps": 4, "num_stages": 3})
    assert _launch.split({"BLOCK_M": 16, "BLOCK_U": 32, "num_warps": 8, "max_d16": 1}) == (
        {"BLOCK_M": 16, "BLOCK_U": 32}, {"num_warps": 8})
    assert [_launch.padded_head_dim(d) for d in (8, 16, 40, 64, 72, 256)] == [16, 16, 64, 64, 128, 256]


def test_choose_config_override_default_and_tuned(monkeypatch):
    mod = cache.load_variant(VariantSpec("select_fwd", 64, 16, True))
    override = {"BLOCK_N": 16, "num_warps": 2, "num_stages": 1}
    assert _launch.choose_config(mod, 128, torch.bfloat16, override=override) == _launch.split(override)
    for d, dtype in ((64, torch.float16), (128, torch.bfloat16), (256, torch.bfloat16), (256, torch.float32)):
        want = _launch.split(_launch.default_config(mod.CONFIGS, _launch.padded_head_dim(d), dtype.itemsize))
        assert _launch.choose_config(mod, d, dtype) == want
    # a tuned kernel asks tuning.kernel_config for its own (module, kernel) key
    asked = []
    monkeypatch.setattr(tuning, "kernel_config", lambda *a, **kw: asked.append(a) or ({"BLOCK_N": 7}, {}))
    probe, run = torch.zeros(2, 300, 1), (lambda c: None)
    assert _launch.choose_config(mod, 96, torch.float16, tune=("dq_kernel", probe, run)) == ({"BLOCK_N": 7}, {})
    assert asked == [(mod, "dq_kernel", 96, torch.float16, 300, probe, run)]


@pytest.mark.parametrize("d", [16, 64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_every_family_uses_the_one_rule(d, dtype):
    """The untuned launch config of every generated kernel is `default_config` of its module's CONFIGS."""
    block_d, nbytes = _launch.padded_head_dim(d), dtype.itemsize
    for family in FAMILIES.values():
        for spec in family.specs(4, True, 32):
            mod = cache.load_variant(spec)
            constexprs, launch = _launch.split(_launch.default_config(mod.CONFIGS, block_d, nbytes))
            if family.name in ("window", "compressed"):
                got, got_launch = dense.launch_config(mod, d, dtype)
                assert {k: got[k] for k in constexprs} == constexprs and got_launch == launch, spec.name
            elif family.name == "topk":
                assert topk._config(mod, d, dtype, None) == (constexprs, launch), spec.name
            elif family.name == "combine":
                got, got_launch = combine._config(mod, d, dtype)
                assert {k: got[k] for k in constexprs} == constexprs and got_launch == launch, spec.name
                assert got["BLOCK_R"] * got["BLOCK_D"] == 4096, spec.name  # the resource model's tile
            else:
                assert _launch.choose_config(mod, d, dtype) == (constexprs, launch), spec.name


# ----------------------------------------------------------------------------------------------------
# the registry


def test_registry_is_the_one_list_of_families():
    assert list(FAMILIES) == ["selected", "window", "compressed", "topk", "decode", "combine"]
    for name, family in FAMILIES.items():
        module = family.module()
        assert module.__name__ == f"nsa_codegen.kernels.{name}" and callable(module.variant_specs)
        assert callable(family.resource_model().tile_configs)
        for op in family.ops:
            assert hasattr(torch.ops.nsa, op), op
        causal = family.causal_modes[-1]
        specs = family.specs(2, causal, 16)
        assert tuple(s.family for s in specs) == family.sources
        for source in family.sources:
            assert family_of(source) is family and SOURCES[source] is family
        grid = list(family.grid())
        if family.one_variant:  # the arguments do not reach the spec: one variant per source
            assert all((s.block_size, s.group, s.causal) == (0, 1, False) for s in specs)
            assert not family.has_block_size and grid == list(specs) and specs[0].name == specs[0].family
            continue
        assert specs[0].group == 2 and specs[0].causal == causal
        assert specs[0].block_size == (16 if family.has_block_size else 0)
        assert len(grid) == (5 if family.has_block_size else 1) * 5 * len(family.causal_modes) * len(family.sources)
    # forward only and causal only: decoding needs no gradient and decodes causal modules
    assert FAMILIES["decode"].sources == ("decode_fwd",) and FAMILIES["decode"].causal_modes == (True,)
    with pytest.raises(ValueError, match="family must be one of"):
        family_of("dense_fwd")


def test_variant_specs_from_tensors():
    q, k = torch.empty(1, 8, 8, 16), torch.empty(1, 8, 2, 16)
    ck = torch.empty(1, 5, 2, 16)
    assert [s.name for s in window_ops.variant_specs(q, k, True)] == ["window_fwd_g4_causal", "window_bwd_g4_causal"]
    assert [s.name for s in compressed.variant_specs(q, ck, False)] == ["cmp_fwd_g4_noncausal",
                                                                        "cmp_bwd_g4_noncausal"]
    assert [s.name for s in topk.variant_specs(q, ck, selection_block_size=32, causal=True, share=True)] == [
        "topk_fwd_bs32_g4_causal", "topk_bwd_bs32_g4_causal"]
    assert topk.variant_specs(q, ck, selection_block_size=32, causal=True, share=False)[0].group == 1
    idx = torch.empty(1, 8, 2, 3, dtype=torch.int32)
    assert [s.name for s in selected.variant_specs(q, k, idx, block_size=64, causal=False)] == [
        "select_fwd_bs64_g4_noncausal", "select_bwd_bs64_g4_noncausal"]
    from nsa_codegen.kernels import decode

    assert [s.name for s in decode.variant_specs(q[:, 0], k)] == ["decode_fwd_g4_causal"]
    assert decode.variant_specs(q[:, 0], k, selection_heads=2)[0].group == 4
    assert decode.variant_specs(q[:, 0], k, selection_heads=8)[0].group == 1
    assert [s.name for s in combine.variant_specs()] == ["combine_fwd", "combine_bwd"]


# ----------------------------------------------------------------------------------------------------
# routing and the reported paths


def test_route_and_report():
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert _launch.route(torch.zeros(1)) == _launch.route(torch.zeros(1), False) == "reference"
    with FakeTensorMode():
        on_cuda = torch.empty(1, device="cuda")
        assert _launch.route(on_cuda) == "triton" and _launch.route(on_cuda, use_kernels=False) == "reference"
    paths = {}
    _launch.report(paths, "sliding", "triton")
    _launch.report(None, "sliding", "reference")  # no dict: nothing recorded
    assert paths == {"sliding": "triton"}


def _family_calls():
    """(branch, kernels module, call(use_kernels, paths) -> output, reference output) of every public op."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 21, h, 16, generator=g) for h in (4, 2, 2))
    ck, cv = (torch.randn(1, 1 + 10, 2, 16, generator=g) for _ in range(2))
    idx = torch.zeros(1, 21, 2, 1, dtype=torch.int64)
    valid = (torch.arange(21) >= 4)[None, :, None, None].expand(1, 21, 2, 1).contiguous()
    sel = dict(block_size=4, causal=True, scale=0.25)
    win = dict(window=3, causal=True, scale=0.25)
    cmp = dict(num_mem=1, block_size=4, stride=2, causal=True, scale=0.25)
    tk = dict(num_mem=1, compress_block_size=2, stride=2, selection_block_size=4, num_selected=2, causal=True,
              share=True, scale=0.25)
    return [
        ("selected", selected, lambda u, p: selected.selected_attention(q, k, v, idx, valid, **sel, use_kernels=u,
                                                                         paths=p),
         reference.selected_attention(q, k, v, idx, valid, **sel)),
        ("sliding", window_ops, lambda u, p: window_ops.sliding_window_attention(q, k, v, **win, use_kernels=u,
                                                                                 paths=p),
         reference.sliding_window_attention(q, k, v, **win)),
        ("compressed", compressed, lambda u, p: compressed.compressed_attention(q, ck, cv, **cmp, use_kernels=u,
                                                                                paths=p)[0],
         reference.compressed_attention(q, ck, cv, **cmp)[0]),
        ("topk", topk, lambda u, p: topk.select_topk(q, ck, **tk, use_kernels=u, paths=p)[2],
         reference.select_topk(q, ck, **tk)[2]),
    ]


def test_public_ops_run_the_reference_on_cpu_and_say_so():
    for branch, _, call, ref in _family_calls():
        for use_kernels in (True, False):
            paths = {}
            torch.testing.assert_close(call(use_kernels, paths), ref, rtol=0, atol=0)
            assert paths == {branch: "reference"}, branch


@interpreter_lane
def test_public_ops_take_the_op_where_route_says_triton(monkeypatch):
    """As on CUDA: each op asks its module's `route` (passing use_kernels on) and, told "triton", calls its
    torch.library op; on CPU tensors the op runs its CPU kernel, the reference."""
    for branch, module, call, ref in _family_calls():
        asked = []
        monkeypatch.setattr(module, "route", lambda x, use_kernels=True: asked.append(use_kernels) or "triton")
        paths = {}
        torch.testing.assert_close(call(False, paths), ref)
        assert paths == {branch: "triton"} and asked == [False], branch


# ----------------------------------------------------------------------------------------------------
# the poison fixture (conftest.py)


def test_poison_fills_every_empty_allocation(poison):
    assert torch.isnan(torch.empty(3, 2)).all() and torch.isnan(torch.empty((2,), dtype=torch.float16)).all()
    assert (torch.empty(4, dtype=torch.int32) == POISON_INT).all()
    assert (torch.empty(4, dtype=torch.int64) == POISON_INT).all()
    assert torch.empty(4, dtype=torch.bool).all()
    assert (torch.empty(4, dtype=torch.uint8) == 255).all()
    assert torch.isnan(torch.empty_like(torch.zeros(2, 3))).all()
    assert torch.isnan(torch.empty_strided((2, 3), (1, 2))).all()
    grad = torch.empty(2, requires_grad=True)
    assert grad.requires_grad and grad.is_leaf and torch.isnan(grad).all()
    assert torch.zeros(2).eq(0).all()  # zero-filled allocations are left alone


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class _Silent:
    """A generated module whose kernels launch and write nothing (every other attribute is the real one)."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return _NoLaunch() if name.endswith("kernel") else getattr(self._real, name)


@interpreter_lane
def test_launcher_outputs_come_from_the_poisoned_allocator(poison, monkeypatch):
    """With kernels that write nothing, every output a kernel must write comes back as poison: the
    poison fixture reaches every launcher's allocations (accumulators that start at zero by design stay
    zero)."""
    real_load = cache.load_variant
    monkeypatch.setattr(cache, "load_variant", lambda spec: _Silent(real_load(spec)))
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, 21, h, 16, generator=g) for h in (4, 2, 2, 4))
    ck, cv = (torch.randn(1, 11, 2, 16, generator=g) for _ in range(2))

    def unwritten(*tensors):
        return all((torch.isnan(t) if t.is_floating_point() else t == POISON_INT).all() for t in tensors)

    win = dict(window=3, causal=True, scale=0.25)
    out, lse = window_ops.sliding_window_fwd_launch(q, k, v, **win)
    assert unwritten(out, lse)
    assert unwritten(*window_ops.sliding_window_bwd_launch(q, k, v, torch.randn_like(q), lse, dout, **win))

    cmp = dict(num_mem=1, block_size=4, stride=2, causal=True, scale=0.25)
    out, lse = compressed.compressed_attention_fwd_launch(q, ck, cv, **cmp)
    assert unwritten(out, lse)
    assert unwritten(*compressed.compressed_attention_bwd_launch(q, ck, cv, torch.randn_like(q), lse, dout, **cmp))

    idx = torch.zeros(1, 21, 2, 2, dtype=torch.int64)
    valid = torch.ones(1, 21, 2, 2, dtype=torch.bool)
    gates = torch.rand(1, 21, 2, 2, generator=g)
    sel = dict(block_size=4, causal=True, scale=0.25)
    out, lse = selected.selected_attention_fwd_launch(q, k, v, idx, valid, gates, **sel)
    assert unwritten(out, lse)
    dq, dk, dv, dgates = selected.selected_attention_bwd_launch(q, k, v, idx, valid, gates, torch.randn_like(q),
                                                                lse, dout, **sel)
    assert unwritten(dq) and (dk == 0).all() and (dv == 0).all() and (dgates == 0).all()  # fp32 atomics: zeros

    tk = dict(num_mem=1, compress_block_size=2, stride=2, selection_block_size=4, num_selected=2, causal=True,
              share=True, scale=0.25)
    block_idx, block_valid, values, lse = topk.select_topk_fwd_launch(q, ck, **tk)
    assert unwritten(block_idx, values, lse) and block_valid.all()
    dq, dck = topk.select_topk_bwd_launch(q, ck, torch.zeros_like(block_idx), torch.rand_like(values),
                                          torch.zeros_like(lse), torch.randn_like(values), **tk)
    assert unwritten(dq) and (dck == 0).all()  # fp32 atomics: zeros
