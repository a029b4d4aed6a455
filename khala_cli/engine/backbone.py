"""Backbone decode: rows of one or several songs, interleaved q0/q1 tokens, static KV caches.

Each batch row is one take: a song (prompt, sampling settings, token cap) at one seed. Step t
samples token t of every row: even steps from the q0 codebook plus end-of-song, odd steps
from the q1 codebook only, so the pairing cannot break. The hidden states are projected onto
just those output rows. The loop issues device work only; the host looks at the tokens every
`check_every` steps to stop rows at end-of-song and report progress. The log-probability of
every sampled token is kept on the device beside it (no host sync per token), for the take's
`logprob_mean`: the model's own confidence in what it sampled.

A row's numbers never depend on its batch-mates (docs/DESIGN.md, Randomness): each song is
prefilled alone into a KV cache of its own length; each step's products are row products
(transformer.row_linear); each song's rows attend over their own cache in a call of their
own; rows are sampled in groups of equal settings with noise keyed on (seed, step,
candidate). On the eager path a row that ends leaves the batch (its cache row is reused).

A song may start from a kept prefix (`Song.prefix`: a parent take's first frames). After
the prompt's prefill the prefix tokens are replayed through the decode step itself, a chunk
of positions at a time: each position is a row of the step's row products and a query of
its own over exactly its past keys, so the KV cache holds the very bits the parent's decode
wrote, and each prefix token's log-probability is the one it was drawn with. Decoding goes
on at step len(prefix) (the noise keys line up with the parent's); each row keeps its own
step, so songs with prefixes of different lengths share a batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from khala_cli.engine.sampling import (
    STREAM_BACKBONE,
    logprob_of,
    row_keys,
    sample_top_k,
    seed_tensor,
)
from khala_cli.engine.tokens import TokenLayout
from khala_cli.engine.transformer import ROW_MAX, Span, Transformer, row_linear

CHECK_EVERY = 64  # steps between host looks (stop at end-of-song, progress)
# Compiled / graphed steps read keys up to the next multiple of this, with a causal mask
# (one compiled graph / CUDA graph per bucket); the eager step reads exactly the past keys.
KV_BUCKET = 1024


@dataclass(frozen=True)
class Song:
    """One prompt's rows in a backbone batch: its seeds, sampling settings and token cap
    (max_new_tokens: the row's tokens from step 0, a kept prefix included)."""

    prompt_ids: list[int]
    seeds: list[int]
    top_k: int
    temperature: float
    max_new_tokens: int
    # raw ids of kept q0/q1 pairs (interleaved, offsets added; see prefix_ids): every row
    # starts with them and decodes on from step len(prefix)
    prefix: tuple[int, ...] = ()
    allow_end: bool = True  # False: end-of-song is never drawn; rows run to their cap


@dataclass(frozen=True)
class _Row:
    song: int  # index into the batch's songs
    seed: int
    prompt_len: int
    cap: int  # tokens this row may hold (its song's cap, within the sequence length)
    start: int = 0  # tokens it starts with (its song's prefix)


class _Decoder:
    """Device state of one batched decode over `rows` (a slot per live row, grouped by song
    in cache order) and the step that advances it."""

    def __init__(self, model: Transformer, layout: TokenLayout, songs: Sequence[Song],
                 rows: list[_Row], width: int, per_row_pos: bool) -> None:
        self.model, self.songs, self.rows = model, songs, list(rows)
        dev = model.embed.weight.device
        w = model.output.weight
        q0, q1 = layout.layer_range(0), layout.layer_range(1)
        self.ids = {
            0: torch.cat([torch.arange(*q0), torch.tensor([layout.end_of_song_id])]).to(dev),
            1: torch.arange(*q1, device=dev),
        }
        self.weights = {0: w[self.ids[0]].contiguous(), 1: w[q1[0] : q1[1]]}
        self.keys = row_keys(seed_tensor([r.seed for r in rows], dev), STREAM_BACKBONE)
        b = len(rows)
        # -1: no id, so a look for end-of-song never sees a token not yet written
        self.tokens = torch.full((b, width), -1, dtype=torch.int64, device=dev)
        self.logp = torch.zeros(b, width, dtype=torch.float32, device=dev)
        self.tok = torch.zeros(b, dtype=torch.int64, device=dev)  # last sampled token
        # where `tok` goes in: one position for all rows, or each row its own ([B, 1])
        self.pos = torch.zeros((b, 1) if per_row_pos else (1,), dtype=torch.int64, device=dev)
        self.last_pos = model.cache_len - 1  # a row past its cap stays inside the cache
        # each row's index of its next token (its noise step); a row past its cap writes
        # at index cap, never into its kept tokens
        self.step = torch.tensor([r.start for r in rows], dtype=torch.int64, device=dev)
        self.cap = torch.tensor([r.cap for r in rows], dtype=torch.int64, device=dev)
        self.regroup()

    def regroup(self) -> None:
        """Sampling groups: live slots of equal (top_k, temperature, allow_end), as index
        tensors (None: every slot, the one-setting case)."""
        dev = self.tok.device
        by: dict[tuple[int, float, bool], list[int]] = {}
        for i, r in enumerate(self.rows):
            song = self.songs[r.song]
            by.setdefault((song.top_k, song.temperature, song.allow_end), []).append(i)
        self.groups = [(k, t, end, None if len(by) == 1 else torch.tensor(ix, device=dev))
                       for (k, t, end), ix in by.items()]

    def _draw(self, logits: Tensor, parity: int, top_k: int, temperature: float, end: bool,
              ix: Tensor | None) -> tuple[Tensor, Tensor]:
        """One group's draw; without `end` the q0 draw leaves end-of-song (the last
        candidate) out."""
        ids = self.ids[parity]
        if ix is not None:
            logits = logits[ix]
        if parity == 0 and not end:
            logits, ids = logits[:, :-1], ids[:-1]
        keys, step = (self.keys, self.step) if ix is None else (self.keys[ix], self.step[ix])
        return sample_top_k(logits, keys, top_k=top_k, temperature=temperature, step=step,
                            candidate_ids=ids, with_logprob=True)

    def sample(self, hidden: Tensor, parity: int) -> None:
        """Sample each row's token `step` from hidden [B, hidden]; record it; advance the
        counters."""
        logits = row_linear(hidden, self.weights[parity])
        if len(self.groups) == 1:  # one setting for every row: no gathering
            tok, logp = self._draw(logits, parity, *self.groups[0])
        else:
            tok, logp = torch.empty_like(self.tok), torch.empty_like(self.logp[:, 0])
            for group in self.groups:
                t, lp = self._draw(logits, parity, *group)
                tok.index_copy_(0, group[-1], t)
                logp.index_copy_(0, group[-1], lp)
        self.tokens.scatter_(1, self.step[:, None], tok[:, None])
        self.logp.scatter_(1, self.step[:, None], logp[:, None])
        self.tok.copy_(tok)
        self.pos.add_(1)
        if self.pos.dim() == 2:
            self.pos.clamp_(max=self.last_pos)
        self.step.add_(1)
        torch.minimum(self.step, self.cap, out=self.step)

    def step_fn(self, parity: int, kv_len: int, masked: bool = True,
                spans: Sequence[Span] | None = None) -> None:
        """Feed `tok` at `pos`, sample the next token (of the given parity). masked=False:
        the eager step, each span of rows reading exactly its own cache's past keys
        (`step_hidden`, host positions)."""
        if not masked:
            self.sample(self.model.step_hidden(self.tok, spans), parity)
            return
        h = self.model.decode_hidden(self.tok[:, None], self.pos, kv_len, masked=True)
        self.sample(h[:, -1], parity)


class _GraphRunner:
    """Replays one captured CUDA graph of the decode step per (parity, kv_len)."""

    def __init__(self, fn: Callable[[int, int], None], state: _Decoder) -> None:
        self.fn, self.state, self.graphs = fn, state, {}
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, parity: int, kv_len: int) -> None:
        key = (parity, kv_len)
        if key not in self.graphs:
            s = self.state
            saved = [t.clone() for t in (s.tok, s.pos, s.step)]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.fn(parity, kv_len)  # warm-up (same inputs: its writes are redone below)
            torch.cuda.current_stream().wait_stream(side)
            for t, v in zip((s.tok, s.pos, s.step), saved, strict=True):
                t.copy_(v)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.fn(parity, kv_len)
            self.graphs[key] = graph
        self.graphs[key].replay()


def _kv_len(needed: int, bucket: int, cap: int) -> int:
    return min(cap, math.ceil(needed / bucket) * bucket)


RowTokens = tuple[np.ndarray, np.ndarray]  # one row's tokens [steps] and log-probabilities


@torch.inference_mode()
def decode_songs(
    model: Transformer,
    layout: TokenLayout,
    songs: Sequence[Song],
    *,
    progress: Callable[[int, float], None] | None = None,
    max_seq_len: int | None = None,
    stop_at_end: bool = True,
    check_every: int = CHECK_EVERY,
    compile: bool = False,
    cuda_graphs: bool = False,
) -> list[list[RowTokens]]:
    """The raw decode of several songs in one batch: per song, per seed, (tokens [steps],
    logprobs [steps]), each token's log-probability under the distribution it was drawn
    from (see sample_top_k).

    A row runs until its song's cap (within the sequence length) or until it has emitted
    end-of-song (looked at every `check_every` steps, so a row may run on past its end:
    ignore what follows it). stop_at_end=False always decodes to the cap (benchmarks).
    A song's rows begin with its prefix (their log-probabilities computed in its replay).
    """
    if any(not s.prompt_ids for s in songs):
        raise ValueError("the backbone needs a non-empty prompt")
    seq_cap = min(max_seq_len or model.config.max_seq_len, model.config.max_seq_len)
    rows = [_Row(i, int(seed), len(s.prompt_ids),
                 max(0, min(int(s.max_new_tokens), seq_cap - len(s.prompt_ids))),
                 len(s.prefix))
            for i, s in enumerate(songs) for seed in s.seeds]
    for r in rows:
        _check_prefix(layout, songs[r.song].prefix, r.cap)
    out: dict[int, RowTokens] = {}
    empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))
    live = [(i, r) for i, r in enumerate(rows) if r.cap > 0]
    if live:
        done = _decode(model, layout, songs, [r for _, r in live], seq_cap, progress=progress,
                       stop_at_end=stop_at_end, check_every=check_every, compile=compile,
                       cuda_graphs=cuda_graphs)
        out = {i: done[j] for j, (i, _) in enumerate(live)}
    results: list[list[RowTokens]] = [[] for _ in songs]
    for i, r in enumerate(rows):
        results[r.song].append(out.get(i, empty))
    return results


def _check_prefix(layout: TokenLayout, prefix: tuple[int, ...], cap: int) -> None:
    """A prefix is whole q0/q1 pairs of audio ids that leave the row something to decode."""
    if not prefix:
        return
    if len(prefix) % 2:
        raise ValueError(f"a kept prefix must be whole q0/q1 pairs, got {len(prefix)} tokens")
    ids = np.asarray(prefix, dtype=np.int64)
    for parity in (0, 1):
        lo, hi = layout.layer_range(parity)
        if ids[parity::2].min() < lo or ids[parity::2].max() >= hi:
            raise ValueError(f"kept prefix: its q{parity} tokens must be ids {lo}..{hi - 1}")
    if len(prefix) >= cap:
        raise ValueError(f"a kept prefix of {len(prefix)} tokens leaves nothing to decode "
                         f"under the row's cap of {cap} tokens")


def prefix_ids(layout: TokenLayout, q01: np.ndarray) -> tuple[int, ...]:
    """Codes int64 [2, frames] -> Song.prefix: raw ids, q0 and q1 interleaved with the
    layer offsets added (split_codes' inverse)."""
    q01 = np.asarray(q01, dtype=np.int64)
    if q01.ndim != 2 or q01.shape[0] != 2:
        raise ValueError(f"kept q0/q1 codes must be [2, frames], got {q01.shape}")
    ids = q01 + np.array([[layout.layer_start(0)], [layout.layer_start(1)]])
    return tuple(int(i) for i in ids.T.reshape(-1))


def _decode(model: Transformer, layout: TokenLayout, songs: Sequence[Song], rows: list[_Row],
            seq_cap: int, *, progress, stop_at_end: bool, check_every: int, compile: bool,
            cuda_graphs: bool) -> list[RowTokens]:
    """decode_songs over rows that all decode at least one token, in their order."""
    device = model.embed.weight.device
    graphs = cuda_graphs and device.type == "cuda"
    eager = not (graphs or compile)
    width = max(r.cap for r in rows) + 1  # + 1: where a row past its cap writes
    used = sorted({r.song for r in rows})
    if eager:  # each song its own cache, of the length it would have alone
        model.setup_caches([(sum(r.song == s for r in rows),
                             len(songs[s].prompt_ids) + max(r.cap for r in rows if r.song == s))
                            for s in used])
    else:
        # A compiled step is specialised to the shapes it sees (cache, rope table, token
        # buffers): at the cap they are the same for every song of a batch size, so a
        # worker compiles once per batch size rather than once per prompt and song length.
        model.setup_cache(len(rows), seq_cap)
        width = seq_cap + 1
    try:
        mixed = len({r.prompt_len + r.start for r in rows}) > 1
        st = _Decoder(model, layout, songs, rows, width, per_row_pos=mixed and not eager)
        _prefill(model, st, songs, rows, eager)
        step = _step_runner(model, st, compile=compile, graphs=graphs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # once, so the rate leaves the prefill out
        loop = _Loop(st, layout.end_of_song_id, stop_at_end=stop_at_end,
                     check_every=check_every, progress=progress)
        if eager:
            loop.eager(step)
        else:
            loop.masked(step, seq_cap)
        return [loop.results[i] for i in range(len(rows))]
    finally:
        model.clear_cache()


def _prefill(model: Transformer, st: _Decoder, songs: Sequence[Song], rows: list[_Row],
             eager: bool) -> None:
    """Prefill each song once, alone, replay its prefix, copy its keys/values to each of
    its rows, and sample each row's first new token: the same numbers whatever the batch."""
    device = model.embed.weight.device
    last = []
    for g, s in enumerate(sorted({r.song for r in rows})):
        song = songs[s]
        p, n = len(song.prompt_ids), len(song.prefix)
        mine = [i for i, r in enumerate(rows) if r.song == s]
        cache, first = (g, 0) if eager else (0, mine[0])
        prompt = torch.tensor([song.prompt_ids], dtype=torch.int64, device=device)
        h = model.decode_hidden(prompt, torch.arange(p, device=device), p, masked=False,
                                cache=cache, row=first)[:, -1]
        if n:
            h = _replay(model, st, song, h, Span(cache, 1, p, first), mine)
        for i in mine[1:]:
            model.copy_cache_row(first, p + n, cache=cache, dst=i - mine[0] if eager else i)
        last.append(h.expand(len(mine), -1))
        if st.pos.dim() == 2:
            st.pos[mine] = p + n - 1
    if st.pos.dim() == 1:  # `sample` advances it to where the first new token goes
        st.pos.fill_(rows[0].prompt_len + rows[0].start - 1)
    st.sample(torch.cat(last), 0)


def _replay(model: Transformer, st: _Decoder, song: Song, hidden: Tensor, at: Span,
            mine: list[int]) -> Tensor:
    """Feed a song's prefix through the decode step into one cache row (`at`: the row and
    the prompt's length), ROW_MAX positions a step, each position a row of the step's
    products and a query over exactly its past keys, as the parent's decode computed it.
    Records the prefix and its log-probabilities in the song's rows `mine`; returns the
    hidden state [1, hidden] the first new token is drawn from. hidden: the prompt's last
    [1, hidden], which drew token 0."""
    ids = torch.tensor(song.prefix, dtype=torch.int64, device=hidden.device)
    n = len(ids)
    logp = [_logprobs(st, song, hidden, ids[:1], 0)]
    for j0 in range(0, n, ROW_MAX):
        j1 = min(n, j0 + ROW_MAX)
        spans = [Span(at.cache, 1, at.pos + j, at.row) for j in range(j0, j1)]
        hidden = model.step_hidden(ids[j0:j1], spans)  # drew tokens j0 + 1 .. j1
        logp.append(_logprobs(st, song, hidden, ids[j0 + 1 : j1 + 1], j0 + 1))
    st.tokens[mine, :n] = ids
    st.logp[mine, :n] = torch.cat(logp)
    return hidden[-1:]


def _logprobs(st: _Decoder, song: Song, hidden: Tensor, ids: Tensor, t0: int) -> Tensor:
    """The log-probabilities of tokens ids [m] (tokens t0.. of a row), drawn from hidden
    [>= m, hidden] under the song's top-k and temperature, every candidate in the running
    as when they were drawn (the step's row products, one parity a product)."""
    out = torch.empty(len(ids), dtype=torch.float32, device=ids.device)
    for parity in (0, 1):
        i0 = (parity - t0) % 2  # the first i whose token t0 + i has this parity
        if i0 < len(ids):
            logits = row_linear(hidden[i0 : len(ids) : 2], st.weights[parity])
            out[i0::2] = logprob_of(logits, ids[i0::2], top_k=song.top_k,
                                    temperature=song.temperature,
                                    candidate_ids=st.ids[parity])
    return out


def _step_runner(model: Transformer, st: _Decoder, *, compile: bool, graphs: bool) -> Callable:
    """The decode step as the chosen path runs it: eager, compiled or replayed as graphs."""
    step = st.step_fn
    if compile:
        # kv_len becomes a dynamic size after its first change: a few compiles, not one
        # per bucket. The batch stays static: a graph generic in the batch size ran ~10x
        # slower than eager on the CPU; each batch size gets its own.
        for t in (st.tok, st.tokens, st.logp, st.keys, st.step, st.cap,
                  *(x for layer in model.layers for x in (layer.attn.cache.k, layer.attn.cache.v))):
            torch._dynamo.mark_static(t, 0)
        step = torch.compile(step)
    if graphs:
        step = _GraphRunner(step, st)
    return step


class _Loop:
    """Steps 1.. of a decode until every row has ended: the host side of `_Decoder`."""

    def __init__(self, st: _Decoder, eos: int, *, stop_at_end: bool, check_every: int,
                 progress: Callable[[int, float], None] | None) -> None:
        self.st, self.eos, self.stop_at_end = st, eos, stop_at_end
        self.check_every, self.progress = check_every, progress
        self.slots = list(range(len(st.rows)))  # slot -> index of the row it holds
        self.cache_of = {s: g for g, s in enumerate(sorted({r.song for r in st.rows}))}
        self.results: dict[int, RowTokens] = {}
        self.t0 = time.perf_counter()
        # new tokens decoded per row so far (the first came with the prefill); a row holds
        # its prefix's `start` tokens before them
        self.steps = 1
        self.top_start = max(r.start for r in st.rows)

    def _ended(self) -> list[int]:
        """Slots whose row has emitted end-of-song (a host look at the device)."""
        if not self.stop_at_end:
            return []
        hit = (self.st.tokens[:, 0 : self.top_start + self.steps : 2] == self.eos).any(dim=1)
        return [i for i in torch.nonzero(hit).flatten().tolist()]

    def _report(self) -> None:
        if self.progress is not None:
            elapsed = max(time.perf_counter() - self.t0, 1e-9)
            self.progress(self.top_start + self.steps, (self.steps - 1) / elapsed)

    def _keep(self, slot: int) -> None:
        r = self.st.rows[slot]
        n = min(r.start + self.steps, r.cap)
        self.results[self.slots[slot]] = (self.st.tokens[slot, :n].cpu().numpy(),
                                          self.st.logp[slot, :n].cpu().numpy())

    def eager(self, step: Callable) -> None:
        """The eager loop: rows leave the batch at their cap or end-of-song."""
        st = self.st
        while True:
            gone = [i for i, r in enumerate(st.rows) if r.start + self.steps >= r.cap]
            if self.steps % self.check_every == 0:
                gone = sorted(set(gone) | set(self._ended()))
                self._report()
            if gone:
                self._drop(gone)
            if not st.rows:
                break
            step(self.steps % 2, 0, False, self._spans())
            self.steps += 1
        self._report()

    def masked(self, step: Callable, seq_cap: int) -> None:
        """The compiled / graphed loop: static shapes, so every row runs to the last."""
        st = self.st
        width = max(r.cap - r.start for r in st.rows)
        top = max(r.prompt_len + r.start for r in st.rows)
        while self.steps < width:
            step(self.steps % 2, _kv_len(min(top + self.steps, seq_cap), KV_BUCKET, seq_cap))
            self.steps += 1
            if self.steps % self.check_every == 0:
                ended = set(self._ended())
                if all(i in ended or r.start + self.steps >= r.cap
                       for i, r in enumerate(st.rows)):
                    break
                self._report()
        for i in range(len(st.rows)):
            self._keep(i)
        self._report()

    def _spans(self) -> list[Span]:
        """Runs of live slots of one song: rows 0.. of that song's cache, one position."""
        spans: list[Span] = []
        for r in self.st.rows:
            cache = self.cache_of[r.song]
            if spans and spans[-1].cache == cache:
                spans[-1] = Span(cache, spans[-1].rows + 1, spans[-1].pos)
            else:
                spans.append(Span(cache, 1, r.prompt_len + r.start + self.steps - 1))
        return spans

    def _drop(self, gone: list[int]) -> None:
        """Keep the results of the rows in slots `gone` and take them out of the batch: in
        each song's cache the last live row moves into a freed row."""
        st = self.st
        for slot in gone:
            self._keep(slot)
        order: list[int] = []  # new slot -> old slot
        base = 0
        while base < len(st.rows):
            song = st.rows[base].song
            n = next((i for i in range(base, len(st.rows)) if st.rows[i].song != song),
                     len(st.rows)) - base
            rows = _compact(n, {i - base for i in gone if base <= i < base + n})
            first = st.rows[base]
            for src, dst in rows.moves:
                st.model.copy_cache_row(src, first.prompt_len + first.start + self.steps,
                                        cache=self.cache_of[song], dst=dst)
            order += [base + i for i in rows.order]
            base += n
        ix = torch.tensor(order, dtype=torch.int64, device=st.tok.device)
        for name in ("tok", "keys", "tokens", "logp", "step", "cap"):
            setattr(st, name, getattr(st, name).index_select(0, ix))
        st.rows = [st.rows[i] for i in order]
        self.slots = [self.slots[i] for i in order]
        st.regroup()


@dataclass
class _Compacted:
    order: list[int]  # new cache row -> old cache row
    moves: list[tuple[int, int]]  # (from, to) cache rows, in order


def _compact(n: int, gone: set[int]) -> _Compacted:
    """Rows 0..n-1 of a cache without the rows in `gone`: each freed row below the new end
    takes the last live row (one move per freed row)."""
    order, moves = list(range(n)), []
    for j in sorted(gone):
        while order and order[-1] in gone:
            order.pop()
        if j >= len(order):
            break
        moves.append((len(order) - 1, j))
        order[j] = order.pop()
    return _Compacted(order, moves)


@torch.inference_mode()
def decode_tokens(model: Transformer, layout: TokenLayout, prompt_ids: list[int],
                  seeds: list[int], *, with_logprobs: bool = False,
                  **kw) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """decode_songs for one prompt, as arrays: token ids [B, steps], one row per seed (a row
    that ended early is padded with end-of-song, its log-probabilities with 0). kw: top_k,
    temperature, max_new_tokens (required), then decode_songs' options.
    with_logprobs: return (tokens, logprobs [B, steps])."""
    song, options = _one_song(prompt_ids, seeds, **kw)
    (rows,) = decode_songs(model, layout, [song], **options)
    steps = max((len(t) for t, _ in rows), default=0)
    tokens = np.full((len(rows), steps), layout.end_of_song_id, dtype=np.int64)
    logprobs = np.zeros((len(rows), steps), dtype=np.float32)
    for i, (t, lp) in enumerate(rows):
        tokens[i, : len(t)], logprobs[i, : len(lp)] = t, lp
    return (tokens, logprobs) if with_logprobs else tokens


def _one_song(prompt_ids: list[int], seeds: list[int], *, top_k: int, temperature: float,
              max_new_tokens: int, **options) -> tuple[Song, dict]:
    if not prompt_ids:
        raise ValueError("the backbone needs a non-empty prompt")
    return Song(list(prompt_ids), list(seeds), top_k, temperature, max_new_tokens), options


def _kept(layout: TokenLayout, row: np.ndarray, stop_at_end: bool = True) -> tuple[int, bool]:
    """(tokens kept, ended at end-of-song) of one raw row: cut at the first end-of-song,
    then an unpaired last q0 dropped."""
    n, ended = len(row), False
    if stop_at_end:
        hits = np.flatnonzero(row[0::2] == layout.end_of_song_id)
        if hits.size:
            n, ended = 2 * int(hits[0]), True
    return n - n % 2, ended


def split_codes(layout: TokenLayout, row: np.ndarray, stop_at_end: bool = True) -> np.ndarray:
    """One row of raw tokens -> int64 [2, frames] codes: cut at the first end-of-song,
    drop an unpaired last q0, subtract the q0 / q1 offsets."""
    n, _ = _kept(layout, row, stop_at_end)
    pairs = np.asarray(row[:n], dtype=np.int64).reshape(-1, 2).T.copy()
    pairs[0] -= layout.layer_start(0)
    pairs[1] -= layout.layer_start(1)
    return pairs


ENDED_EOS = "end_of_song"  # the row emitted end-of-song by itself
ENDED_CAP = "token_cap"  # max_new_tokens (or the sequence length) cut it


@dataclass
class BackboneRow:
    """One seed's backbone result."""

    codes: np.ndarray  # int64 [2, frames]: q0, q1 (offsets subtracted)
    ended: str  # ENDED_EOS | ENDED_CAP
    logprob_mean: float | None  # mean log-probability of the kept tokens; None if none


def row_result(layout: TokenLayout, tokens: np.ndarray, logprobs: np.ndarray) -> BackboneRow:
    """One raw row of tokens [steps] and their log-probabilities [steps] -> BackboneRow."""
    n, ended = _kept(layout, tokens)
    mean = float(np.mean(logprobs[:n], dtype=np.float64)) if n else None
    return BackboneRow(codes=split_codes(layout, tokens), ended=ENDED_EOS if ended else ENDED_CAP,
                       logprob_mean=mean)


def generate_rows(model: Transformer, layout: TokenLayout, prompt_ids: list[int],
                  seeds: list[int], **kw) -> list[BackboneRow]:
    """Decode one prompt for every seed (one batch row each); per seed a BackboneRow:
    generate_batch with one song. kw: top_k, temperature, max_new_tokens (required), then
    generate_batch's progress, max_seq_len and options."""
    song, options = _one_song(prompt_ids, seeds, **kw)
    if not seeds:
        return []
    (rows,) = generate_batch(model, layout, [song], **options)
    return rows


def generate_batch(
    model: Transformer,
    layout: TokenLayout,
    songs: Sequence[Song],
    *,
    progress: Callable[[int, float], None] | None = None,
    max_seq_len: int | None = None,
    **options,
) -> list[list[BackboneRow]]:
    """Decode several songs in one batch (one row per seed of each); per song, per seed a
    BackboneRow, the same as the song would get alone.

    A row stops at end-of-song (not emitted; ended=end_of_song) or after its song's
    max_new_tokens (capped so prompt + tokens fit max_seq_len and the config's;
    ended=token_cap); an odd count drops the last, unpaired q0. progress(tokens_done,
    tokens_per_s): steps decoded so far (the tokens of the longest row) and the per-row
    rate of the steps after the prefill, every `check_every` steps and once at the end.
    options: check_every, compile (torch.compile of the decode step), cuda_graphs (a CUDA
    graph of the step per kv-length bucket) -- the last two for CUDA, default off.
    """
    if not any(s.seeds for s in songs):
        return [[] for _ in songs]
    raw = decode_songs(model, layout, songs, progress=progress, max_seq_len=max_seq_len,
                       **options)
    return [[row_result(layout, t, lp) for t, lp in rows] for rows in raw]


def generate(model: Transformer, layout: TokenLayout, prompt_ids: list[int], seeds: list[int],
             **kwargs) -> list[np.ndarray]:
    """generate_rows, codes only: per seed int64 [2, frames] (q0 row 0, q1 row 1)."""
    return [r.codes for r in generate_rows(model, layout, prompt_ids, seeds, **kwargs)]
