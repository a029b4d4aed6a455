"""Rows of different songs in one batch: every take's numbers are its own.

A take's backbone tokens (and log-probabilities), its codes and its audio are the same bits
whether it renders alone, beside its own seeds or beside other songs, at any batch size and
any position in the batch, at 1 and 2 threads, in fp32 on the CPU.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from khala_cli.engine import backbone
from khala_cli.engine.backbone import Song
from khala_cli.engine.config import TransformerConfig
from khala_cli.engine.sampling import row_keys, seed_tensor
from khala_cli.engine.tokens import TokenLayout
from khala_cli.engine.transformer import Transformer

LAYOUT = TokenLayout(audio_offset=300, codebook_size=64, num_quantizers=6, bos_id=1,
                     end_of_song_id=2, no_use_id=4)
WIDE = TransformerConfig(vocab_size=LAYOUT.backbone_vocab, hidden_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=32, ffn_hidden_size=384,
                         max_seq_len=256)


def make_model(seed: int = 5) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(WIDE).eval()
    with torch.no_grad():
        model.output.weight.mul_(6.0)  # peaky enough that seeds matter; end-of-song within
        # reach of a wide top-k, out of reach of the others' narrow ones
    return model


def songs() -> list[Song]:
    """Three songs: prompt lengths 6, 23 and 11, caps 90, 57 and 120, greedy and sampled at
    different top-k and temperatures; the last (top-k 70, end-of-song within reach) ends
    early."""
    gen = np.random.default_rng(3)
    prompts = [gen.integers(5, 290, n).tolist() for n in (6, 23, 11)]
    return [Song(prompts[0], [7], top_k=5, temperature=0.9, max_new_tokens=90),
            Song(prompts[1], [8], top_k=1, temperature=0.0, max_new_tokens=57),
            Song(prompts[2], [9], top_k=70, temperature=1.3, max_new_tokens=120)]


def decode(model, batch: list[Song], **kw) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    return backbone.decode_songs(model, LAYOUT, batch, check_every=8, **kw)


def assert_rows_equal(a, b) -> None:
    for (ta, la), (tb, lb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(ta, tb)
        np.testing.assert_array_equal(la, lb)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_songs_in_one_batch_decode_what_each_decodes_alone(threads):
    model = make_model()
    three = songs()
    alone = [decode(model, [s])[0] for s in three]
    ends = [backbone.row_result(LAYOUT, *rows[0]).ended for rows in alone]
    lengths = [len(rows[0][0]) for rows in alone]
    assert ends[2] == "end_of_song" and lengths[2] < 120  # one ends on its own, early
    assert ends[0] == ends[1] == "token_cap" and lengths[:2] == [90, 57]
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):  # every song at every position
        together = decode(model, [three[i] for i in order])
        for j, i in enumerate(order):
            assert_rows_equal(together[j], alone[i])


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_a_sweep_and_other_songs_share_a_batch_and_keep_their_numbers(threads):
    model = make_model()
    three = songs()
    sweep = Song(three[0].prompt_ids, [7, 11, 12, 13, 14, 15, 16, 17], top_k=5,
                 temperature=0.9, max_new_tokens=90)
    by_seed = {seed: decode(model, [Song(sweep.prompt_ids, [seed], 5, 0.9, 90)])[0][0]
               for seed in sweep.seeds}
    (eight,) = decode(model, [sweep])
    assert_rows_equal(eight, [by_seed[s] for s in sweep.seeds])
    mixed = decode(model, [three[1], Song(sweep.prompt_ids, [12, 7], 5, 0.9, 90), three[2]])
    assert_rows_equal(mixed[1], [by_seed[12], by_seed[7]])
    assert_rows_equal(mixed[0], decode(model, [three[1]])[0])
    assert_rows_equal(mixed[2], decode(model, [three[2]])[0])


def test_a_row_that_ends_early_leaves_its_batch_mates_alone(monkeypatch):
    """Seed 21 is made to end at token 12; its batch-mates' tokens are those they decode
    when it runs to the cap beside them (and those they decode alone)."""
    model = make_model()
    three = songs()
    batch = [three[0], Song(three[1].prompt_ids, [21], 5, 0.9, 100), three[1]]
    free = decode(model, batch)
    real = backbone.sample_top_k
    key = int(row_keys(seed_tensor([21]), 0))

    def ends_21(logits, keys, *, step, candidate_ids, **kw):
        tok, logp = real(logits, keys, step=step, candidate_ids=candidate_ids, **kw)
        return torch.where((keys == key) & (step == 12), LAYOUT.end_of_song_id, tok), logp

    monkeypatch.setattr(backbone, "sample_top_k", ends_21)
    cut = decode(model, batch)
    assert backbone.row_result(LAYOUT, *cut[1][0]).ended == "end_of_song"
    assert len(cut[1][0][0]) == 16  # seen at the check after token 12, then it left
    np.testing.assert_array_equal(cut[1][0][0][:12], free[1][0][0][:12])
    assert_rows_equal(cut[0], free[0])
    assert_rows_equal(cut[2], free[2])


def test_rows_leave_the_batch_and_their_cache_rows_are_reused():
    """After rows leave, the others' attention reads their own keys: a batch whose rows end
    at different steps gives each row its lone tokens (the cache rows were moved)."""
    model = make_model()
    prompt = songs()[0].prompt_ids
    caps = [20, 70, 35, 90, 50]
    batch = [Song(prompt, [40 + i], 5, 0.9, cap) for i, cap in enumerate(caps)]
    together = decode(model, batch)
    for i, s in enumerate(batch):
        assert len(together[i][0][0]) == caps[i]
        assert_rows_equal(together[i], decode(model, [s])[0])
    sweep = Song(prompt, [40, 41, 42, 43, 44], 5, 0.9, 90)
    moved = backbone._compact(5, {0, 2})
    assert moved.order == [4, 1, 3] and moved.moves == [(4, 0), (3, 2)]
    assert backbone._compact(4, {1, 3}).order == [0, 2]
    assert decode(model, [sweep])[0][1][0].shape == (90,)


def _codes(rows) -> list[np.ndarray]:
    return [backbone.row_result(LAYOUT, t, lp).codes for t, lp in rows]


@pytest.mark.slow
def test_a_compiled_decode_of_a_mixed_batch_gives_eager_s_codes():
    """The compiled step (one cache at the cap, each row its own position and mask) decodes
    a mixed batch to eager's codes in fp32 on the CPU."""
    model = make_model()
    three = songs()
    eager = decode(model, three)
    compiled = decode(model, three, compile=True)
    for a, b in zip(eager, compiled, strict=True):
        for x, y in zip(_codes(a), _codes(b), strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_on_cuda_a_mixed_batch_decodes_each_song_alone_on_every_path():
    model = make_model().cuda()
    three = songs()
    alone = [_codes(decode(model, [s])[0]) for s in three]
    for options in ({}, {"cuda_graphs": True}, {"compile": True}):
        together = decode(model, three, **options)
        for i in range(3):
            for x, y in zip(_codes(together[i]), alone[i], strict=True):
                np.testing.assert_array_equal(x, y, err_msg=f"song {i}, {options}")


# ---- the whole pipeline: codes and WAV bytes ---------------------------------------------


def _song_request(pipe, *, mode: str, tags: tuple[str, ...], duration: int, seeds: list[int],
                  tokens: int, top_k: int, temperature: float, lyrics: str = ""):
    from khala_cli.engine.pipeline import Request
    from khala_cli.prompt import PromptSpec, prompt_ids

    spec = PromptSpec(mode=mode, tags=tags, lyrics=lyrics, duration=duration)
    bb, sr = prompt_ids(pipe.tokenizer, spec)
    return Request(backbone_ids=bb, superres_ids=sr, seeds=seeds, top_k_bb=top_k,
                   temperature=temperature, top_k_sr=10, max_new_tokens=tokens,
                   duration=duration)


def _wavs(pipe, takes) -> list[bytes]:
    from khala_cli.outputs import wav_bytes

    return [wav_bytes(t.audio, pipe.codec_config.sample_rate) for t in takes]


def _three(pipe) -> list:
    """Prompts of different lengths, durations 1-3, vocal and instrumental, greedy and
    sampled; the second's cap ends it long before the others."""
    return [
        _song_request(pipe, mode="vocal", tags=("synthwave", "female vocals"), duration=1,
                      seeds=[3], tokens=260, top_k=80, temperature=1.0,
                      lyrics="[verse]\nneon rain on the window\nwe run until the morning"),
        _song_request(pipe, mode="instrumental", tags=("piano",), duration=3, seeds=[4],
                      tokens=90, top_k=1, temperature=1.0),
        _song_request(pipe, mode="vocal", tags=("folk", "male vocals", "acoustic guitar"),
                      duration=2, seeds=[5], tokens=200, top_k=20, temperature=1.3,
                      lyrics="[chorus]\nhome"),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_a_mixed_batch_of_three_songs_renders_each_take_as_alone(demo_model_dir, threads):
    from khala_cli.engine.pipeline import Pipeline

    pipe = Pipeline.from_dir(demo_model_dir)
    reqs = _three(pipe)
    assert len({len(r.backbone_ids) for r in reqs}) == 3
    alone = [pipe.render([r])[0][0] for r in reqs]
    assert [t.codes.shape[1] for t in alone] == [130, 45, 100]
    order = [2, 0, 1]
    together = pipe.render([reqs[i] for i in order], batches=[[0, 1, 2]])
    for j, i in enumerate(order):
        (take,) = together[j]
        assert take.batch_size == 3 and take.batch_songs == 3 and alone[i].batch_size == 1
        assert take.backbone_tokens == alone[i].backbone_tokens
        assert np.array_equal(take.codes, alone[i].codes)
        assert _wavs(pipe, [take]) == _wavs(pipe, [alone[i]])
        assert take.logprob_mean == alone[i].logprob_mean


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_a_sweeps_seeds_render_the_same_bits_at_batch_1_and_8(demo_model_dir, threads):
    from khala_cli.engine.pipeline import Pipeline

    pipe = Pipeline.from_dir(demo_model_dir)
    seeds = [21, 22, 23, 24, 25, 26, 27, 28]
    kw = {"mode": "vocal", "tags": ("synthwave",), "duration": 1, "tokens": 120, "top_k": 80,
          "temperature": 1.0, "lyrics": "[verse]\nla la la"}
    (eight,) = pipe.render([_song_request(pipe, seeds=seeds, **kw)])
    ones = pipe.render([_song_request(pipe, seeds=[s], **kw) for s in seeds])
    assert [t.batch_size for t in eight] == [8] * 8
    for take, (one,) in zip(eight, ones, strict=True):
        assert np.array_equal(take.codes, one.codes)
        assert _wavs(pipe, [take]) == _wavs(pipe, [one])
    assert len({t.codes.tobytes() for t in eight}) == 8  # and the seeds differ


# ---- naming the batch: progress lines, the worker bar, the review page --------------------


def test_progress_names_every_take_of_a_batch(capsys):
    from rich.console import Console

    from khala_cli.cli.display import PlainLog, TtyProgress, takes_label
    from khala_cli.runner.events import Progress, WorkerChanged

    takes = [("a", 1), ("a", 2), ("b", 5), ("c", 1)]
    assert takes_label(takes) == "a s1,2 · b s5 · c s1"
    assert takes_label(takes, most_songs=3) == "a s1,2 · b s5 · c s1"
    assert takes_label(takes + [("d", 9)], most_songs=3) == "4 songs"
    ev = Progress(worker=0, device="cpu:0", job_id="a", seeds=(1, 2, 5, 1), phase="backbone",
                  done=64, total=300, jobs=("a", "a", "b", "c"))
    assert ev.takes() == takes
    old = Progress(worker=0, device="cpu:0", job_id="a", seeds=(1, 2), phase="backbone",
                   done=1, total=2)  # a worker that sends no jobs: every seed is job_id's
    assert old.takes() == [("a", 1), ("a", 2)]
    log = PlainLog(total=4, quiet=False)
    log.event(WorkerChanged(worker=0, device="cpu:0", state="busy", pid=7,
                            renders=("a-s1", "a-s2", "b-s5", "c-s1"), batches=(4,)))
    log.event(ev)
    err = capsys.readouterr().err
    assert "busy (pid 7): a-s1 a-s2 b-s5 c-s1 (batches of 4)" in err
    assert "cpu:0: a s1,2 · b s5 · c s1 backbone 64/300" in err
    tty = TtyProgress(Console(file=io.StringIO(), force_terminal=True), total=5)
    tty.event(Progress(worker=0, device="cpu:0", job_id="a", seeds=(1, 2, 5, 1, 9),
                       phase="backbone", done=1, total=2, jobs=("a", "a", "b", "c", "d")))
    bar = tty.bars.tasks[tty.workers[0]]
    assert bar.description == "  cpu:0 4 songs"
    assert [t for t, _ in tty.partial.values()] == [takes + [("d", 9)]]


def test_the_review_page_says_a_render_time_was_shared_by_a_batch():
    from khala_cli.review.page import take_html

    base = {"job_id": "a", "seed": 1, "timings": {"total_s": 80.0}, "device": "cuda:0"}
    shared = take_html(1, {**base, "batch": {"size": 8, "mates": 7, "songs": 3}})
    assert "80.0 s in a batch of 8 (3 songs) on cuda:0" in shared
    sweep = take_html(1, {**base, "batch": {"size": 4, "mates": 3, "songs": 1}})
    assert "80.0 s in a batch of 4 on" in sweep
    assert "80.0 s on cuda:0" in take_html(1, base)  # sidecars from before: nothing said
