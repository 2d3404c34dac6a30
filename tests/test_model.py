"""`nsa_codegen.Transformer` on CPU: shapes, cached decoding against the parallel forward, sampling,
weight tying, argument errors, a training sanity check and the example script end to end."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nsa_codegen import StaticCache, Transformer
from nsa_codegen.model import DenseCache, sample_next_token

ROOT = Path(__file__).resolve().parents[1]

# small enough to be fast, large enough that decoding crosses compression windows (l 4, s 2),
# selection blocks (l' 4, 2 selected) and the sliding window (8)
SMALL = dict(num_tokens=64, dim=32, depth=2, heads=4, kv_heads=2, dim_head=16, sliding_window_size=8,
             compress_block_size=4, compress_block_sliding_stride=2, selection_block_size=4,
             num_selected_blocks=2)
KINDS = ("nsa", "dense")


def small_model(attn: str, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(**{**SMALL, "attn": attn, **overrides}).eval()


@pytest.mark.parametrize("attn", KINDS)
def test_forward_shapes_and_cache(attn):
    model = small_model(attn)
    tokens = torch.randint(0, 64, (3, 11))
    logits = model(tokens)
    assert logits.shape == (3, 11, 64) and logits.dtype == torch.float32
    logits2, cache = model(tokens, return_cache=True)
    torch.testing.assert_close(logits2, logits)
    assert isinstance(cache, list) and len(cache) == SMALL["depth"]
    assert all(isinstance(c, StaticCache if attn == "nsa" else DenseCache) for c in cache)
    assert all(c.seq_len == 11 for c in cache)
    step, cache = model(tokens[:, :1], cache=cache, return_cache=True)
    assert step.shape == (3, 1, 64) and cache[0].seq_len == 12


@pytest.mark.parametrize("attn", KINDS)
def test_cached_decoding_equals_parallel_forward_and_greedy_generate(attn):
    """Every decoded step's logits equal the full forward's logits at that position (fp32, 1e-4), and
    generate(temperature=0) is the argmax continuation computed by re-running the full forward."""
    model = small_model(attn)
    prompt = torch.randint(0, 64, (2, 5))
    new = 14
    seq = prompt
    logits, cache = model(prompt, return_cache=True)
    last = logits[:, -1]
    for _ in range(new):
        full = model(seq)
        torch.testing.assert_close(last, full[:, -1], rtol=1e-4, atol=1e-4)
        nxt = full[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat((seq, nxt), dim=1)
        step_logits, cache = model(nxt, cache=cache, return_cache=True)
        last = step_logits[:, -1]
    torch.testing.assert_close(last, model(seq)[:, -1], rtol=1e-4, atol=1e-4)

    out = model.generate(prompt, new, temperature=0)
    assert torch.equal(out, seq)
    # a 1-D prompt gives a 1-D result; top_k=1 at any temperature is greedy
    assert torch.equal(model.generate(prompt[1], new, temperature=0), seq[1])
    assert torch.equal(model.generate(prompt, new, temperature=1.5, top_k=1), seq)
    assert torch.equal(model.generate(prompt, 0), prompt)


def test_sample_next_token_only_picks_allowed_tokens():
    probs = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.03, 0.02])
    logits = probs.log().expand(4000, -1)
    gen = torch.Generator().manual_seed(0)

    def picks(**kw):
        out = sample_next_token(logits, generator=gen, **kw)
        assert out.shape == (4000, 1)
        return set(out.flatten().tolist())

    assert picks(top_k=3) == {0, 1, 2}
    # top_p: keep a token while the mass before it is below top_p (0.5 < 0.75, then 0.8 >= 0.75)
    assert picks(top_p=0.75) == {0, 1}
    assert picks(top_p=0.5) == {0}
    assert picks(top_k=4, top_p=0.85) == {0, 1, 2}      # after top-k: 0.526, 0.316, 0.105, ...
    assert picks(temperature=0.5, top_k=2) == {0, 1}
    assert picks() == set(range(6))
    assert set(sample_next_token(logits, temperature=0).flatten().tolist()) == {0}


@pytest.mark.parametrize("attn", KINDS)
def test_generate_decodes_into_preallocated_caches(attn, monkeypatch):
    """generate makes its caches with init_cache, sized for the prompt and the new tokens: they never grow,
    and every step writes into the same tensors."""
    model = small_model(attn)
    made = []
    real = Transformer.init_cache

    def recording(self, *args, **kwargs):
        made.append(real(self, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(Transformer, "init_cache", recording)
    prompt = torch.randint(0, 64, (2, 5))
    out = model.generate(prompt, 9, temperature=0)
    assert out.shape == (2, 14) and len(made) == 1
    for cache in made[0]:
        assert not cache.growable and cache.max_seq_len == cache.seq_len == 13 and cache.k.shape[1] == 13
        assert cache.lengths.tolist() == [13, 13]


@pytest.mark.parametrize("attn", KINDS)
def test_ragged_prompts_in_one_batch(attn):
    """Prompts of different lengths in one batch (per-sequence lengths), then the next tokens of each: every
    sequence's logits equal those of its own parallel forward."""
    model = small_model(attn)
    torch.manual_seed(3)
    streams = torch.randint(0, 64, (2, 20))
    lengths = [3, 8]
    prompt = torch.stack([torch.cat((streams[0, :3], torch.zeros(5, dtype=torch.long))), streams[1, :8]])
    cache = model.init_cache(2, 20)
    with torch.no_grad():
        first = model(prompt, cache=cache, lengths=torch.tensor(lengths))
        steps = [model(torch.stack([streams[0, 3 + j], streams[1, 8 + j]])[:, None], cache=cache)
                 for j in range(12)]
        for i, n in enumerate(lengths):
            got = torch.cat([first[i, :n]] + [s[i] for s in steps])
            torch.testing.assert_close(got, model(streams[i:i + 1, :n + 12])[0], rtol=1e-4, atol=1e-4)
    assert cache[0].lengths.tolist() == [15, 20]


@pytest.mark.parametrize("attn", KINDS)
def test_decoding_step_has_no_data_dependent_op(attn):
    """Under FakeTensorMode a value-dependent operation raises: the model's decoding steps have none (the
    CPU-only token range check reads values, so the embedding gets fake token ids it does not check)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = small_model(attn)
    with FakeTensorMode(allow_non_fake_inputs=True):
        cache = model.init_cache(2, 12)
        x = model.token_emb(torch.zeros(2, 5, dtype=torch.long))
        for layer, c in zip(model.layers, cache):
            x, _ = layer(x, cache=c)
        for _ in range(3):
            x = model.token_emb(torch.zeros(2, 1, dtype=torch.long))
            for layer, c in zip(model.layers, cache):
                x, _ = layer(x, cache=c)
            assert x.shape == (2, 1, SMALL["dim"])
    assert cache[0].seq_len == 8


@pytest.mark.parametrize("attn", KINDS)
def test_generate_sampling_respects_top_k_and_is_reproducible(attn):
    model = small_model(attn)
    prompt = torch.randint(0, 64, (3, 4))
    out = model.generate(prompt, 10, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(1))
    again = model.generate(prompt, 10, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(1))
    assert out.shape == (3, 14) and torch.equal(out, again) and torch.equal(out[:, :4], prompt)
    allowed = model(out).topk(3, dim=-1).indices            # (b, n, 3): the top 3 after each position
    for pos in range(4, 14):
        assert (allowed[:, pos - 1] == out[:, pos : pos + 1]).any(-1).all()

    out = model.generate(prompt, 10, top_p=0.3, generator=torch.Generator().manual_seed(2))
    probs = model(out).softmax(-1)
    for pos in range(4, 14):
        p = probs[:, pos - 1]
        chosen = p.gather(-1, out[:, pos : pos + 1])
        mass_above = (p * (p > chosen)).sum(-1, keepdim=True)   # mass strictly more likely than the pick
        assert (mass_above < 0.3 + 1e-6).all()


def test_tied_and_untied_output_head():
    tied = small_model("nsa")
    assert tied.to_logits.weight is tied.token_emb.weight
    assert tied.to_logits.weight.data_ptr() == tied.token_emb.weight.data_ptr()
    names = [n for n, _ in tied.named_parameters()]
    assert "token_emb.weight" in names and "to_logits.weight" not in names   # counted once
    untied = small_model("dense", tie_embedding=False)
    assert untied.to_logits.weight.data_ptr() != untied.token_emb.weight.data_ptr()
    # a state_dict round trip keeps the tie
    rebuilt = Transformer(**tied.config)
    rebuilt.load_state_dict(tied.state_dict())
    assert rebuilt.to_logits.weight is rebuilt.token_emb.weight
    torch.testing.assert_close(rebuilt.token_emb.weight, tied.token_emb.weight)


@pytest.mark.parametrize("kwargs, match", [
    (dict(attn="sparse"), r"attn must be one of 'nsa', 'dense', got 'sparse'"),
    (dict(num_tokens=0), r"num_tokens must be an int >= 1"),
    (dict(depth=1.5), r"depth must be an int >= 1"),
    (dict(heads=4, kv_heads=3), r"heads \(4\) must be divisible by kv_heads \(3\)"),
    (dict(dim_head=15), r"dim_head must be even"),
    (dict(ff_mult=0), r"ff_mult must be a number > 0"),
    (dict(tie_embedding="yes"), r"tie_embedding must be True or False"),
    (dict(causal=False), r"unknown Transformer argument\(s\) causal \(causal set by the model"),
    (dict(window=8), r"unknown Transformer argument\(s\) window; allowed SparseAttention options: .*"
                     r"sliding_window_size"),
    (dict(sliding_window_size=-1), r"sliding_window_size must be an int >= 0"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Transformer(**{**SMALL, **kwargs})


@pytest.mark.parametrize("call, match", [
    (lambda m, p: m.generate(p, 3, temperature=-1), r"temperature must be a number >= 0"),
    (lambda m, p: m.generate(p, 3, top_k=0), r"top_k must be an int >= 1"),
    (lambda m, p: m.generate(p, 3, top_p=0.0), r"top_p must be a number in \(0.0, 1.0\]"),
    (lambda m, p: m.generate(p, 3, top_p=1.5), r"top_p must be a number in \(0.0, 1.0\]"),
    (lambda m, p: m.generate(p, -1), r"max_new_tokens must be an int >= 0"),
    (lambda m, p: m.generate(p, 3, generator=0), r"generator must be None or a torch.Generator"),
    (lambda m, p: m.generate(p[:, :0], 3), r"prompt must hold at least one token"),
    (lambda m, p: m.generate(p.float(), 3), r"prompt must hold integer token ids"),
    (lambda m, p: m.generate(p[None], 3), r"prompt must be a tensor of token ids of shape"),
    (lambda m, p: m(p + 64), r"tokens ids must be in \[0, num_tokens=64\), got values in"),
    (lambda m, p: m(p[0]), r"tokens must have shape \(batch, seq_len\)"),
    (lambda m, p: m(p, cache=m(p, return_cache=True)[1], lengths=torch.tensor([1, 2])),
     r"lengths is only allowed with a prefill"),
    (lambda m, p: m(p, cache=m.init_cache(2, 4)), r"cache is full: 0 of max_seq_len=4"),
    (lambda m, p: m(p[:, :1], cache=[]), r"cache must be the list of 2 StaticCaches"),
    (lambda m, p: m(p[:1, :1], cache=m(p, return_cache=True)[1]), r"cache was made for batch 2"),
])
def test_bad_call_arguments(call, match):
    model = small_model("nsa")
    prompt = torch.randint(0, 64, (2, 5))
    with pytest.raises(ValueError, match=match):
        call(model, prompt)


@pytest.mark.parametrize("attn", KINDS)
def test_training_reduces_loss_on_a_repeated_batch(attn):
    model = small_model(attn).train()
    torch.manual_seed(1)
    tokens = torch.randint(0, 64, (2, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def _load_example():
    spec = importlib.util.spec_from_file_location("train_lm_example", ROOT / "examples" / "train_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_script_runs_end_to_end(tmp_path, capsys):
    example = _load_example()
    rc = example.main(["--device", "cpu", "--steps", "3", "--seq-len", "64", "--batch", "2", "--dim", "32",
                       "--depth", "1", "--heads", "2", "--kv-heads", "1", "--dim-head", "16",
                       "--log-every", "2", "--eval-every", "2", "--eval-batches", "1",
                       "--max-bytes", "200000", "--sample-tokens", "8", "--attn", "both",
                       "--out", str(tmp_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "loss" in printed and "tok/s" in printed and "held-out loss" in printed and "sample" in printed
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert set(curves) == {"nsa", "dense"}
    for kind in ("nsa", "dense"):
        assert [s for s, _ in curves[kind]["train"]] == [2, 3]
        assert [s for s, _ in curves[kind]["held_out"]] == [2, 3]
        ckpt = torch.load(tmp_path / f"{kind}.pt", weights_only=True)
        assert ckpt["config"]["attn"] == kind
        model = Transformer(**ckpt["config"])
        model.load_state_dict(ckpt["state_dict"])
        out = model.generate(torch.tensor([100, 101]), 4, temperature=0)
        assert out.shape == (6,)
