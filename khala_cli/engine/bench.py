"""`khala bench`: our decode and super-res against naive / reference-style baselines.

Everything runs on one random model in the same process, so the ratios compare like with
like: the same weights, prompt, token counts and threads.

- decode_vs_naive: backbone tokens/s (B=1) of `backbone.decode_tokens` over a naive decode
  of the same weights (KV cache grown by concatenation, K/V repeated per head, full-vocab
  logits, one host sync per token).
- batch8_vs_batch1: aggregate tokens/s at B=8 over B=1.
  Both decode `decode_tokens` tokens after a context of `context_len` tokens and time the
  decode steps only (not the prefill). The bench model's KV cache per token is to its
  weights as the real model's is to its weights at 4x the context, so contexts of
  1024..1280 tokens stand for ~4-5k tokens into a real song: about the middle of the
  decode of a 3-minute song (the reference's default duration).
- superres_vs_padded: time of a super-res pass at the real length S over the reference's
  method with rows padded to max(8192, S), scaled to the bench: padded length =
  S x max(8192, S_song) / S_song for a reference song of `song_minutes`.
- catalogue_b8_vs_b1: songs per minute of a catalogue, `batch` different songs (prompts of
  different lengths, one seed each) through `Pipeline.render`, all in one cross-song batch
  over the same songs one at a time, on a model directory of random weights (the bench
  backbone, a tiny super-res model and codec, so the backbone's share of the time is about
  a real song's); their tokens must be equal. Where the batch's gain goes, at the decode:
  catalogue_mixed_vs_sweep (tokens/s of `batch` different prompts of one length over one
  prompt's `batch` seeds: a song's own cache and attention calls) and
  catalogue_settings_cost (one setting over different top-k / temperature per row, sampled
  per group); catalogue_stage_s has each stage's seconds for the catalogue at B=1 and B=8.
- reroll_vs_full: wall time of a full render of one song over a re-roll of it from its
  middle frame (the same prompt, length and seed: the parent's own take comes back, which
  reroll_equal_parent checks), on the catalogue's model. The re-roll replays its kept
  tokens (reroll_kept_tokens, in chunks of rows) instead of decoding them step by step:
  reroll_steps_saved backbone steps; super-res and the codec still cover the whole song.

Rates are medians over chunks of `chunk` decode steps (and pass times medians over
passes), pooled over `rounds` interleaved rounds, so a burst of other load on the machine
moves them less.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from khala_cli.engine import backbone, superres
from khala_cli.engine.backbone import Song
from khala_cli.engine.config import TransformerConfig
from khala_cli.engine.pipeline import Pipeline, Request
from khala_cli.engine.random_model import TINY_SIZES, build_random_model
from khala_cli.engine.tokens import TokenLayout
from khala_cli.engine.transformer import ROW_MAX, Transformer, apply_rope, rope_angles
from khala_cli.prompt import PromptSpec, prompt_ids

FRAME_RATE = 44100 / 2048  # codec frames per second of the real model


@dataclass(frozen=True)
class BenchSpec:
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 64
    ffn_hidden_size: int = 1408
    text_vocab: int = 8192
    codebook_size: int = 512
    num_quantizers: int = 6
    context_len: int = 1024  # backbone prompt: decoding starts this far into the context
    decode_tokens: int = 256
    batch: int = 8
    superres_prompt_len: int = 64
    superres_frames: int = 448
    song_minutes: float = 3.0  # the reference song whose padding the bench scales
    song_prompt_len: int = 300
    top_k: int = 80
    rounds: int = 2
    chunk: int = 32  # decode steps per timed chunk (rates are medians over chunks)
    seed: int = 0

    def layout(self) -> TokenLayout:
        return TokenLayout(audio_offset=self.text_vocab, codebook_size=self.codebook_size,
                           num_quantizers=self.num_quantizers, bos_id=0, end_of_song_id=1,
                           no_use_id=4)

    def sizes(self) -> dict[str, int]:
        return {"hidden_size": self.hidden_size, "num_layers": self.num_layers,
                "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "ffn_hidden_size": self.ffn_hidden_size}

    def config(self) -> TransformerConfig:
        layout = self.layout()
        return TransformerConfig(
            vocab_size=layout.superres_vocab, **self.sizes(),
            max_seq_len=max(self.context_len + self.decode_tokens, 64),
        )

    def padding_factor(self) -> float:
        song = self.song_prompt_len + round(FRAME_RATE * 60 * self.song_minutes)
        return max(8192, song) / song


MID = BenchSpec()
TINY = BenchSpec(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                 ffn_hidden_size=64, text_vocab=300, codebook_size=16, num_quantizers=4,
                 context_len=8, decode_tokens=24, superres_prompt_len=8, superres_frames=24,
                 top_k=8, rounds=1, chunk=4)


@torch.inference_mode()
def naive_decode(model: Transformer, layout: TokenLayout, prompt_ids: list[int], n_tokens: int,
                 *, top_k: int, temperature: float, seed: int) -> tuple[list[int], list[float]]:
    """The textbook decode loop, as a baseline: a growing cache, K/V repeated per head,
    full-vocabulary logits, `torch.multinomial`, and `.item()` every token.
    Returns the tokens and the clock (perf_counter) after each token."""
    c = model.config
    device = model.embed.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    legal = {
        0: torch.tensor([*range(*layout.layer_range(0)), layout.end_of_song_id], device=device),
        1: torch.arange(*layout.layer_range(1), device=device),
    }
    rep = c.num_heads // c.num_kv_heads
    cache: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * c.num_layers
    ids = torch.tensor([prompt_ids], device=device)
    pos = torch.arange(len(prompt_ids), device=device)
    out: list[int] = []
    stamps: list[float] = []
    for t in range(n_tokens):
        x = model.embed_ids(ids)
        cos, sin = rope_angles(pos, c.head_dim, c.rope_base)
        b, s, _ = x.shape
        for i, layer in enumerate(model.layers):
            a, h = layer.attn, layer.attn_norm(x)
            q = a.wq(h).view(b, s, c.num_heads, c.head_dim).transpose(1, 2)
            k = a.wk(h).view(b, s, c.num_kv_heads, c.head_dim).transpose(1, 2)
            v = a.wv(h).view(b, s, c.num_kv_heads, c.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if cache[i] is not None:
                k, v = torch.cat([cache[i][0], k], 2), torch.cat([cache[i][1], v], 2)
            cache[i] = (k, v)
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1)
            x = x + a.wo(y.transpose(1, 2).reshape(b, s, -1))
            x = x + layer.mlp(layer.mlp_norm(x))
        logits = model.output(model.norm(x[:, -1])).float()[0]  # the whole vocabulary
        cand = legal[t % 2]
        vals, idx = torch.topk(logits[cand], min(top_k, len(cand)))
        choice = torch.multinomial(torch.softmax(vals / temperature, -1), 1, generator=gen)
        tok = int(cand[idx[choice]].item())
        out.append(tok)
        stamps.append(time.perf_counter())
        ids = torch.tensor([[tok]], device=device)
        pos = torch.tensor([len(prompt_ids) + t], device=device)
    return out, stamps


def _rates(marks: list[tuple[int, float]]) -> list[float]:
    """Units per second between consecutive (count, clock) marks."""
    pairs = zip(marks, marks[1:], strict=False)
    return [(n2 - n1) / (t2 - t1) for (n1, t1), (n2, t2) in pairs if n2 > n1 and t2 > t1]


def run_bench(spec: BenchSpec = MID, device: str = "cpu", threads: int | None = None,
              log: Callable[[str], None] | None = None) -> dict:
    """Measure everything on one random model; returns the JSON-ready results.
    threads: torch CPU threads for the run (default: torch's own choice)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(spec, torch.device(device), log or (lambda _msg: None))
    finally:
        torch.set_num_threads(before)


def _run(spec: BenchSpec, dev: torch.device, log: Callable[[str], None]) -> dict:
    layout, cfg = spec.layout(), spec.config()
    torch.manual_seed(spec.seed)
    model = Transformer(cfg).to(dev).eval()
    params = sum(p.numel() for p in model.parameters())
    rng = np.random.default_rng(spec.seed)
    top_text = spec.text_vocab - spec.num_quantizers - 1  # below the super-res markers
    context = rng.integers(5, top_text, spec.context_len).tolist()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    log(f"bench model: {params / 1e6:.1f} M parameters ({params * 4 / 2**20:.0f} MiB fp32), "
        f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}")
    decode = _decode_rates(model, layout, spec, context, sync, log)
    sr = _superres_times(model, layout, spec, context, rng, sync, log)
    where = _catalogue_decode(model, layout, spec, context, sync, log)
    with _random_pipeline(spec, dev) as pipe:
        cat = _catalogue(pipe, spec, log)
        reroll = _reroll(pipe, spec, log)
    return {
        **cat, **where, **decode, **sr, **reroll,
        "targets": {
            "decode_vs_naive": 1.5,
            "batch8_vs_batch1": 4.0,
            "superres_vs_padded": 0.5 * sr["superres_padding_factor"],
            "catalogue_b8_vs_b1": 3.0,
        },
        "params": params,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "spec": dataclasses.asdict(spec),
    }


def _decode_rates(model: Transformer, layout: TokenLayout, spec: BenchSpec, context: list[int],
                  sync: Callable[[], None], log: Callable[[str], None]) -> dict:
    """Backbone decode tokens/s: ours at B=1 and B=batch against the naive decode, in
    interleaved rounds; the median chunk of each is kept."""
    n, chunk = spec.decode_tokens, spec.chunk

    def ours(batch: int, tokens: int = n) -> list[float]:
        """Per-row decode steps per second, per chunk of steps after the prefill."""
        marks: list[tuple[int, float]] = []

        def mark(done: int, _rate: float) -> None:
            sync()
            marks.append((done, time.perf_counter()))

        backbone.decode_tokens(model, layout, context, list(range(batch)), top_k=spec.top_k,
                               temperature=1.0, max_new_tokens=tokens, stop_at_end=False,
                               check_every=chunk, progress=mark)
        return _rates(marks)

    def naive() -> list[float]:
        _, stamps = naive_decode(model, layout, context, n, top_k=spec.top_k, temperature=1.0,
                                 seed=0)
        return _rates([(i + 1, stamps[i]) for i in range(chunk - 1, n, chunk)])

    ours(1, 2 * chunk)  # warm-up
    rates: dict[str, list[float]] = {"ours1": [], "naive": [], "ours8": []}
    for r in range(spec.rounds):
        log(f"backbone round {r + 1}/{spec.rounds}: {n} tokens after a {spec.context_len}-token "
            f"context: ours B=1, naive B=1, ours B={spec.batch} ...")
        rates["ours1"] += ours(1)
        rates["naive"] += naive()
        rates["ours8"] += [spec.batch * x for x in ours(spec.batch)]
    tps1, tps_naive, tps_b = (float(np.median(rates[k])) for k in ("ours1", "naive", "ours8"))
    return {"decode_vs_naive": tps1 / tps_naive, "batch8_vs_batch1": tps_b / tps1,
            "backbone_tokens_per_s": tps1, "naive_tokens_per_s": tps_naive,
            "batch1_tokens_per_s": tps1, "batch8_tokens_per_s": tps_b, "batch": spec.batch,
            "decode_tokens": n, "context_tokens": spec.context_len}


def _superres_times(model: Transformer, layout: TokenLayout, spec: BenchSpec,
                    context: list[int], rng: np.random.Generator, sync: Callable[[], None],
                    log: Callable[[str], None]) -> dict:
    """Seconds per super-res pass at the real length against the reference's padding."""
    frames = spec.superres_frames
    q01 = [rng.integers(0, spec.codebook_size, (2, frames))]
    prompt = context[: spec.superres_prompt_len]
    s_real = spec.superres_prompt_len + frames
    s_pad = max(round(s_real * spec.padding_factor()), s_real)
    passes = spec.num_quantizers - 2
    log(f"super-res: {passes} passes at the real S={s_real}, then the reference's method "
        f"padded to {s_pad} ...")

    def pass_times(fn: Callable[..., object]) -> list[float]:
        marks = [(0, time.perf_counter())]

        def mark(done: int, _total: int) -> None:
            sync()
            marks.append((done, time.perf_counter()))

        fn(model, layout, prompt, q01, [0], progress=mark)
        return [1.0 / r for r in _rates(marks)]

    t_sr = float(np.median(pass_times(superres.upsample)))
    t_pad = float(np.median(pass_times(
        lambda *a, **k: superres.upsample_reference_padded(*a, pad_to=s_pad, **k))))
    return {"superres_vs_padded": t_pad / t_sr, "superres_padding_factor": s_pad / s_real,
            "superres_seq_len": s_real, "superres_padded_len": s_pad, "superres_passes": passes,
            "superres_pass_s": t_sr, "superres_padded_pass_s": t_pad}


def _catalogue_decode(model: Transformer, layout: TokenLayout, spec: BenchSpec,
                      context: list[int], sync: Callable[[], None],
                      log: Callable[[str], None]) -> dict:
    """Decode tokens/s of `batch` rows: one prompt's seeds, different prompts of the same
    length (the cost of a song apart: its own cache and attention calls), and those prompts
    with different sampling settings per row."""
    n, b = spec.decode_tokens, spec.batch
    length = max(1, spec.context_len - b + 1)
    prompts = [context[i : i + length] for i in range(b)]
    cases = {
        "sweep": [Song(prompts[0], list(range(b)), spec.top_k, 1.0, n)],
        "mixed": [Song(p, [i], spec.top_k, 1.0, n) for i, p in enumerate(prompts)],
        "settings": [Song(p, [i], max(1, spec.top_k - 8 * i), 0.8 + 0.05 * i, n)
                     for i, p in enumerate(prompts)],
    }
    log(f"catalogue decode: {b} rows as one prompt's seeds, {b} prompts, {b} prompts with "
        f"their own top-k and temperature ...")
    rates: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(spec.rounds):
        for name, songs in cases.items():
            marks: list[tuple[int, float]] = []

            def mark(done: int, _rate: float, marks=marks) -> None:
                sync()
                marks.append((done, time.perf_counter()))

            backbone.decode_songs(model, layout, songs, stop_at_end=False,
                                  check_every=spec.chunk, progress=mark)
            rates[name] += _rates(marks[:-1])  # the last mark repeats the end
    tps = {k: float(np.median(v)) * b for k, v in rates.items()}
    return {"catalogue_mixed_vs_sweep": tps["mixed"] / tps["sweep"],
            "catalogue_settings_cost": tps["mixed"] / tps["settings"],
            "catalogue_decode_tokens_per_s": tps}


@contextlib.contextmanager
def _random_pipeline(spec: BenchSpec, dev: torch.device) -> Iterator[Pipeline]:
    """A loaded Pipeline on a model directory of random weights (untrained: noise): the
    bench backbone, a tiny super-res model and codec, so the backbone's share of a render's
    time is about a real song's."""
    with tempfile.TemporaryDirectory(prefix="khala-bench-catalogue-") as tmp:
        mdir = build_random_model(
            Path(tmp) / "model", name="khala bench catalogue (random weights, untrained: noise)",
            source="khala_cli.engine.bench", demo=True, sizes=spec.sizes(),
            superres_sizes=TINY_SIZES)
        pipe = Pipeline.from_dir(mdir, device=dev)
        pipe.load()
        yield pipe


def _catalogue(pipe: Pipeline, spec: BenchSpec, log: Callable[[str], None]) -> dict:
    """`batch` different songs through Pipeline.render: one cross-song batch against one
    song at a time, songs per minute of each, timed over `rounds` interleaved rounds."""
    reqs = _catalogue_songs(pipe, spec)
    log(f"catalogue: {len(reqs)} songs (prompts of {min(len(r.backbone_ids) for r in reqs)}"
        f"..{max(len(r.backbone_ids) for r in reqs)} tokens, {spec.decode_tokens} tokens "
        f"each) one at a time, then in one batch ...")
    pipe.render(reqs[:1])  # warm-up
    times: dict[int, list[float]] = {1: [], spec.batch: []}
    takes = {}
    for _ in range(spec.rounds):
        for b, batches in ((1, None), (spec.batch, [list(range(len(reqs)))])):
            t = time.perf_counter()
            takes[b] = pipe.render(reqs, batches=batches)
            times[b].append(time.perf_counter() - t)
    t1, tb = (float(np.median(times[b])) for b in (1, spec.batch))
    equal = all(np.array_equal(a[0].codes, c[0].codes)
                for a, c in zip(takes[1], takes[spec.batch], strict=True))
    stages = {}  # seconds per stage for the whole catalogue (the last round)
    for b, per_song in takes.items():
        tm = [t[0].timings for t in per_song]
        stages[b] = {"backbone_s": round(tm[0]["backbone_s"] if b > 1
                                         else sum(x["backbone_s"] for x in tm), 3),
                     "superres_s": round(sum(x["superres_s"] for x in tm), 3),
                     "decode_s": round(tm[0]["decode_s"], 3)}  # one decode call each
    return {"catalogue_b8_vs_b1": t1 / tb, "catalogue_songs": len(reqs),
            "catalogue_tokens_equal": equal,
            "catalogue_songs_per_minute": {str(b): round(len(reqs) * 60.0 / t, 2)
                                           for b, t in ((1, t1), (spec.batch, tb))},
            "catalogue_stage_s": {str(b): v for b, v in stages.items()}}


def _reroll(pipe: Pipeline, spec: BenchSpec, log: Callable[[str], None]) -> dict:
    """A full render of one song against a re-roll of it from its middle frame, with the
    same seed (so the parent comes back), timed over `rounds` interleaved rounds."""
    (req,) = _catalogue_songs(pipe, spec)[:1]
    ((parent,),) = pipe.render([req])  # also the warm-up
    kept = parent.codes.shape[1] // 2
    child = dataclasses.replace(req, kept=parent.codes[:, :kept])
    log(f"re-roll: one song of {parent.backbone_tokens} tokens rendered in full, then "
        f"re-rolled from frame {kept} ...")
    times: dict[str, list[float]] = {"full": [], "reroll": []}
    takes = {}
    for _ in range(spec.rounds):
        for name, r in (("full", req), ("reroll", child)):
            t = time.perf_counter()
            ((takes[name],),) = pipe.render([r])
            times[name].append(time.perf_counter() - t)
    full, reroll = (float(np.median(times[k])) for k in ("full", "reroll"))
    return {"reroll_vs_full": full / reroll,
            "reroll_backbone_vs_full": takes["full"].timings["backbone_s"]
            / max(takes["reroll"].timings["backbone_s"], 1e-9),
            "reroll_tokens": parent.backbone_tokens, "reroll_kept_tokens": 2 * kept,
            "reroll_steps_saved": 2 * kept, "reroll_replay_chunks": -(-2 * kept // ROW_MAX),
            "reroll_equal_parent": bool(np.array_equal(takes["reroll"].codes, parent.codes)),
            "reroll_stage_s": {name: {k: round(t.timings[k], 3)
                                      for k in ("backbone_s", "superres_s", "decode_s")}
                               for name, t in takes.items()}}


def _catalogue_songs(pipe: Pipeline, spec: BenchSpec) -> list[Request]:
    """`batch` songs with prompts of different lengths (lyrics of 1..batch verses)."""
    reqs = []
    for i in range(spec.batch):
        lyrics = "\n".join(f"[verse]\nline {i} {j} of a song that is not music" for j in range(i + 1))
        bb, sr = prompt_ids(pipe.tokenizer, PromptSpec(tags=(f"style {i}",), lyrics=lyrics,
                                                       duration=1))
        reqs.append(Request(backbone_ids=bb, superres_ids=sr, seeds=[i + 1], top_k_bb=spec.top_k,
                            max_new_tokens=spec.decode_tokens, duration=1))
    return reqs
