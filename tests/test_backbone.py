"""Seed-keyed sampling and the batched backbone decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from khala_cli.engine import backbone
from khala_cli.engine.config import TransformerConfig
from khala_cli.engine.sampling import hash_uniform, mix32, row_keys, sample_top_k, seed_tensor
from khala_cli.engine.tokens import TokenLayout
from khala_cli.engine.transformer import Transformer

LAYOUT = TokenLayout(audio_offset=300, codebook_size=64, num_quantizers=6, bos_id=1,
                     end_of_song_id=2, no_use_id=4)
CFG = TransformerConfig(vocab_size=LAYOUT.backbone_vocab, hidden_size=32, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=8, ffn_hidden_size=48,
                        max_seq_len=256)
PROMPT = [1, 17, 42, 99, 200, 298]
Q0, Q1 = LAYOUT.layer_range(0), LAYOUT.layer_range(1)


def make_model(seed: int = 0, eos_row_zero: bool = True) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(CFG).eval()
    with torch.no_grad():
        model.output.weight.mul_(8.0)  # peaky enough that seeds matter but not too much
        if eos_row_zero:
            # logit 0 for end-of-song: with a small top-k it is (almost) never drawn
            model.output.weight[LAYOUT.end_of_song_id] = 0
    return model


def gen(model, seeds, **kw):
    kw = {"top_k": 4, "temperature": 1.0, "max_new_tokens": 40} | kw
    return backbone.generate(model, LAYOUT, PROMPT, seeds, **kw)


# ---- sampling ---------------------------------------------------------------------


def mix_by_hand(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x21F0AAAD) % 2**32
    x ^= x >> 15
    x = (x * 0x735A2D97) % 2**32
    return x ^ (x >> 15)


def test_mix32_matches_python_integers():
    xs = [0, 1, 2, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 123456789, 0xDEADBEEF]
    got = mix32(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [mix_by_hand(x) for x in xs]


def test_seed_tensor_takes_any_int():
    assert seed_tensor([0, 5, -1, 2**64 - 1, 2**63]).tolist() == [0, 5, -1, -1, -(2**63)]


def test_hash_uniform_range_and_independence():
    keys = row_keys(seed_tensor([7, 8]), 0)[:, None]
    u = hash_uniform(keys, torch.arange(5000), torch.tensor(3))
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.02
    assert not torch.equal(u[0], u[1])  # another seed, other noise
    assert torch.equal(u[0], hash_uniform(row_keys(seed_tensor([7]), 0), torch.arange(5000), torch.tensor(3)))
    # streams and candidates are keyed too
    assert not torch.equal(u[0], hash_uniform(row_keys(seed_tensor([7]), 1), torch.arange(5000), torch.tensor(3)))
    assert not torch.equal(u[0], hash_uniform(keys[0], torch.arange(5000), torch.tensor(4)))
    # neighbouring steps are uncorrelated
    assert abs(float(torch.corrcoef(torch.stack([u[0, :-1], u[0, 1:]]))[0, 1])) < 0.05


def test_sample_top_k_follows_the_tempered_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 5.0])
    n = 20000
    keys = row_keys(torch.zeros(n, dtype=torch.int64) + 11, 0)
    steps = torch.arange(n)
    for temperature in (1.0, 0.6):
        got = sample_top_k(logits.expand(n, -1), keys, top_k=3, temperature=temperature, step=steps)
        freq = torch.bincount(got, minlength=5).double() / n
        top = torch.tensor([float("-inf"), 1.0, 2.0, float("-inf"), 5.0])
        want = torch.softmax(top.double() / temperature, 0)
        assert freq[0] == 0 and freq[3] == 0  # outside the top 3
        torch.testing.assert_close(freq, want, atol=0.01, rtol=0)
    # candidate ids stand in for columns, and top_k=1 is greedy
    ids = torch.tensor([10, 11, 12, 13, 14])
    out = sample_top_k(logits[None], keys[:1], top_k=1, temperature=1.0, step=0, candidate_ids=ids)
    assert out.tolist() == [14]


def test_sampling_row_independent_of_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    keys = row_keys(seed_tensor([5, 6, 7, 8]), 0)
    batch = sample_top_k(logits, keys, top_k=20, temperature=1.0, step=torch.tensor([3]))
    for i in range(4):
        one = sample_top_k(logits[i : i + 1], keys[i : i + 1], top_k=20, temperature=1.0,
                           step=torch.tensor([3]))
        assert one.item() == batch[i].item()


# ---- decode -----------------------------------------------------------------------


def slow_decode(model, seed, n, top_k=4, temperature=1.0):
    """Full recomputation every step, legal ids chosen by masking full-vocab logits."""
    seq = list(PROMPT)
    ids = {0: torch.tensor([*range(*Q0), LAYOUT.end_of_song_id]), 1: torch.arange(*Q1)}
    out = []
    with torch.no_grad():
        for t in range(n):
            logits = model(torch.tensor([seq]))[0, -1]
            tok = sample_top_k(logits[ids[t % 2]][None], row_keys(seed_tensor([seed]), 0),
                               top_k=top_k, temperature=temperature, step=torch.tensor([t]),
                               candidate_ids=ids[t % 2])
            out.append(int(tok))
            seq.append(int(tok))
    return out


def test_decode_equals_slow_recompute():
    model = make_model()
    raw = backbone.decode_tokens(model, LAYOUT, PROMPT, [3, 4], top_k=4, temperature=0.9,
                                 max_new_tokens=30, stop_at_end=False)
    assert raw.shape == (2, 30)
    for row, seed in zip(raw, [3, 4], strict=True):
        assert row.tolist() == slow_decode(model, seed, 30, temperature=0.9)


def test_same_seed_same_tokens_and_different_seeds_differ():
    model = make_model()
    a, b = gen(model, [11, 12]), gen(model, [11, 12])
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert a[0].shape == a[1].shape == (2, 20)
    assert not np.array_equal(a[0], a[1])


@pytest.mark.parametrize("reachable_end", [False, True])
def test_seed_alone_equals_seed_in_batch_of_four(reachable_end):
    model = make_model(eos_row_zero=not reachable_end)
    kw = {"max_new_tokens": 200 if reachable_end else 90, "top_k": 65 if reachable_end else 4,
          "check_every": 8}
    batch = gen(model, [100, 101, 102, 103], **kw)
    lengths = [b.shape[1] for b in batch]
    if reachable_end:  # rows end on their own, at different steps
        assert len(set(lengths)) > 1 and min(lengths) < 100
    for i, seed in enumerate([100, 101, 102, 103]):
        np.testing.assert_array_equal(gen(model, [seed], **kw)[0], batch[i])


def test_only_legal_ids_even_when_text_ids_dominate():
    model = make_model(eos_row_zero=False)
    with torch.no_grad():
        w = model.output.weight
        w[: LAYOUT.audio_offset] *= 1000  # text ids would win any full-vocab argmax
        w[Q1[0] : Q1[1]] *= 50  # and q1 would beat q0 at q0 steps
    raw = backbone.decode_tokens(model, LAYOUT, PROMPT, [1, 2, 3], top_k=50, temperature=1.4,
                                 max_new_tokens=64, stop_at_end=False)
    eos = LAYOUT.end_of_song_id
    even, odd = raw[:, 0::2], raw[:, 1::2]
    assert (((even >= Q0[0]) & (even < Q0[1])) | (even == eos)).all()
    assert ((odd >= Q1[0]) & (odd < Q1[1])).all()
    for codes in backbone.generate(model, LAYOUT, PROMPT, [1, 2, 3], top_k=50, temperature=1.4,
                                   max_new_tokens=64):
        assert codes.dtype == np.int64 and codes.shape[0] == 2
        assert codes.min(initial=0) >= 0 and codes.max(initial=0) < LAYOUT.codebook_size


def test_never_computes_full_vocab_logits():
    model = make_model()

    def boom(*args, **kwargs):
        raise AssertionError("full-vocabulary projection")

    model.output.forward = boom
    model.project = boom
    assert gen(model, [1])[0].shape == (2, 20)


def test_end_of_song_stops_each_row(monkeypatch):
    model = make_model()
    eos = LAYOUT.end_of_song_id
    real = backbone.sample_top_k

    key = {int(row_keys(seed_tensor([s]), 0)): s for s in (1, 2, 3)}

    def fake(logits, keys, *, step, candidate_ids, **kw):
        tok, logp = real(logits, keys, step=step, candidate_ids=candidate_ids, **kw)
        # seed 1 ends at token 10, seed 3 at token 70, seed 2 runs to the cap
        seeds = torch.tensor([key[int(k)] for k in keys])
        ends = torch.where(seeds == 1, 10, torch.where(seeds == 3, 70, 10**6))
        return torch.where(ends == step, eos, tok), logp

    monkeypatch.setattr(backbone, "sample_top_k", fake)
    calls = []
    out = backbone.generate(model, LAYOUT, PROMPT, [1, 2, 3], top_k=4, temperature=1.0,
                            max_new_tokens=100, progress=lambda n, r: calls.append((n, r)),
                            check_every=16)
    assert [o.shape[1] for o in out] == [5, 50, 35]
    assert calls and all(r > 0 for _, r in calls) and calls[-1][0] == 100
    rows = backbone.generate_rows(model, LAYOUT, PROMPT, [1, 2, 3], top_k=4, temperature=1.0,
                                  max_new_tokens=100, check_every=16)
    assert [r.ended for r in rows] == ["end_of_song", "token_cap", "end_of_song"]
    # once every row has ended, decoding stops at the next check, not at the cap
    calls.clear()
    raw = backbone.decode_tokens(model, LAYOUT, PROMPT, [3, 1], top_k=4, temperature=1.0,
                                 max_new_tokens=100, progress=lambda n, r: calls.append((n, r)),
                                 check_every=16)
    assert raw.shape == (2, 80) and calls[-1][0] == 80
    out = [backbone.split_codes(LAYOUT, row) for row in raw]
    assert [o.shape[1] for o in out] == [35, 5]


def test_max_tokens_cap_and_odd_count():
    model = make_model()
    raw = backbone.decode_tokens(model, LAYOUT, PROMPT, [5], top_k=4, temperature=1.0,
                                 max_new_tokens=7)
    assert raw.shape == (1, 7)
    (codes,) = gen(model, [5], max_new_tokens=7)
    assert codes.shape == (2, 3)  # the 7th token, a lone q0, is dropped
    np.testing.assert_array_equal(codes[0], raw[0, 0:6:2] - Q0[0])
    np.testing.assert_array_equal(codes[1], raw[0, 1:6:2] - Q1[0])
    # the context length caps too: prompt 6 + 14 new = 20
    (codes,) = gen(model, [5], max_new_tokens=100, max_seq_len=20)
    assert codes.shape == (2, 7)
    (codes,) = gen(model, [5], max_new_tokens=100, max_seq_len=len(PROMPT))
    assert codes.shape == (2, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
@pytest.mark.parametrize("options", [{"cuda_graphs": True}, {"compile": True}])
def test_cuda_accelerations_keep_tokens(options):
    model = make_model().cuda()
    plain = gen(model, [1, 2], max_new_tokens=300)
    fast = gen(model, [1, 2], max_new_tokens=300, **options)
    for a, b in zip(plain, fast, strict=True):
        np.testing.assert_array_equal(a, b)


# ---- log-probabilities and how a row ended ---------------------------------------


def _recomputed_logprobs(model, tokens, top_k, temperature):
    """Each sampled token's log-probability, recomputed from one full forward pass over
    prompt + tokens with the full output projection (no cache, no candidate windows)."""
    seq = torch.tensor([PROMPT + list(tokens)], dtype=torch.int64)
    with torch.no_grad():
        logits = model(seq)[0].float()  # [S, vocab]
    out = []
    for t, tok in enumerate(tokens):
        row = logits[len(PROMPT) - 1 + t]
        legal = torch.full_like(row, float("-inf"))
        lo, hi = (Q0 if t % 2 == 0 else Q1)
        legal[lo:hi] = row[lo:hi]
        if t % 2 == 0:
            legal[LAYOUT.end_of_song_id] = row[LAYOUT.end_of_song_id]
        vals, idx = torch.topk(legal, top_k)
        t_eff = temperature if temperature > 0 else 1.0
        lp = torch.log_softmax(vals / t_eff, dim=-1)
        hit = (idx == tok).nonzero()
        assert hit.numel() == 1, f"token {tok} at step {t} is not in the top-{top_k}"
        out.append(float(lp[hit[0, 0]]))
    return np.array(out)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprob_mean_equals_full_logits_recomputation(temperature):
    model = make_model(3)
    rows = backbone.generate_rows(model, LAYOUT, PROMPT, [11, 12], top_k=5,
                                  temperature=temperature, max_new_tokens=24)
    raw, logp = backbone.decode_tokens(model, LAYOUT, PROMPT, [11, 12], top_k=5,
                                       temperature=temperature, max_new_tokens=24,
                                       with_logprobs=True)
    for row, toks, lps in zip(rows, raw, logp, strict=True):
        want = _recomputed_logprobs(model, toks.tolist(), 5, temperature)
        np.testing.assert_allclose(lps, want, atol=2e-4)
        n = 2 * row.codes.shape[1]
        assert row.logprob_mean == pytest.approx(want[:n].mean(), abs=2e-4)
        assert row.logprob_mean < 0
        assert row.ended == "token_cap"


def test_rows_that_emit_end_of_song_say_so():
    model = make_model(1, eos_row_zero=False)
    with torch.no_grad():
        model.output.weight[LAYOUT.end_of_song_id] = 50.0 * model.output.weight[Q0[0]]
    rows = backbone.generate_rows(model, LAYOUT, PROMPT, [1, 2, 3], top_k=4, temperature=1.0,
                                  max_new_tokens=200, check_every=8)
    raw = backbone.decode_tokens(model, LAYOUT, PROMPT, [1, 2, 3], top_k=4, temperature=1.0,
                                 max_new_tokens=200, check_every=8)
    for row, toks in zip(rows, raw, strict=True):
        has_eos = bool((toks[0::2] == LAYOUT.end_of_song_id).any())
        assert row.ended == ("end_of_song" if has_eos else "token_cap")
    assert any(r.ended == "end_of_song" for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("temperature,seeds", [(0.0, [1]), (0.0, [1, 2, 3]), (0.9, [4]),
                                                (0.9, [1, 2, 3])])
def test_compiled_decode_on_cpu_matches_eager(temperature, seeds):
    """torch.compile (inductor's C++ backend on the CPU) draws the very same tokens, with the
    same log-probabilities, greedy and sampled, alone and in a batch."""
    from torch._dynamo.utils import counters

    model = make_model(3)
    kw = {"top_k": 5, "temperature": temperature, "max_new_tokens": 40, "with_logprobs": True}
    eager, eager_lp = backbone.decode_tokens(model, LAYOUT, PROMPT, seeds, **kw)
    torch._dynamo.reset()
    counters.clear()  # reset() leaves the counters of earlier tests
    comp, comp_lp = backbone.decode_tokens(model, LAYOUT, PROMPT, seeds, compile=True, **kw)
    assert counters["stats"]["unique_graphs"] > 0  # it compiled: not eager under another name
    assert np.array_equal(comp, eager)
    np.testing.assert_allclose(comp_lp, eager_lp, atol=1e-5)


@pytest.mark.slow
def test_compiled_decode_compiles_once_per_batch_size_whatever_the_song():
    """Another prompt length and song length at the same batch size reuse the compiled step:
    a worker pays for compiling once, not once per job."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # reset() leaves the counters of earlier tests
    model = make_model(3)
    kw = {"top_k": 5, "temperature": 0.9, "compile": True, "stop_at_end": False}
    backbone.decode_tokens(model, LAYOUT, PROMPT, [1], max_new_tokens=20, **kw)
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > 0
    with torch._dynamo.config.patch(error_on_recompile=True):
        backbone.decode_tokens(model, LAYOUT, PROMPT[:4], [2], max_new_tokens=33, **kw)
    assert counters["stats"]["unique_graphs"] == compiled


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("temperature,seeds", [(0.0, [1]), (0.9, [4]), (0.9, [1, 2, 3])])
def test_eager_step_draws_what_the_plain_step_draws(monkeypatch, threads, temperature, seeds):
    """The eager decode (step_hidden, row_linear) gives the tokens and log-probabilities of
    the plain one (decode_hidden at the position, F.linear), bit for bit."""
    wide = TransformerConfig(vocab_size=LAYOUT.backbone_vocab, hidden_size=128, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=32, ffn_hidden_size=384,
                             max_seq_len=256)
    torch.manual_seed(5)
    model = Transformer(wide).eval()
    kw = {"top_k": 5, "temperature": temperature, "max_new_tokens": 40, "with_logprobs": True,
          "stop_at_end": False}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast, fast_lp = backbone.decode_tokens(model, LAYOUT, PROMPT, seeds, **kw)

        def plain_step(self, ids, pos):
            h = self.decode_hidden(ids[:, None], torch.tensor([pos]), pos + 1, masked=False)
            return h[:, -1]

        monkeypatch.setattr(Transformer, "step_hidden", plain_step)
        monkeypatch.setattr(backbone, "row_linear", torch.nn.functional.linear)
        plain, plain_lp = backbone.decode_tokens(model, LAYOUT, PROMPT, seeds, **kw)
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(fast, plain)
    assert np.array_equal(fast_lp, plain_lp)
