"""Backbone decode: one prompt, B seeds, interleaved q0/q1 tokens with a static KV cache.

Each batch row is one seed. Step t samples token t: even steps from the q0 codebook plus
end-of-song, odd steps from the q1 codebook only, so the pairing cannot break. The hidden
states are projected onto just those output rows. The loop issues device work only; the
host looks at the tokens every `check_every` steps to stop early and report progress.
The log-probability of every sampled token is kept on the device beside it (no host sync
per token), for the take's `logprob_mean`: the model's own confidence in what it sampled.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from khala_cli.engine.sampling import STREAM_BACKBONE, row_keys, sample_top_k, seed_tensor
from khala_cli.engine.tokens import TokenLayout
from khala_cli.engine.transformer import Transformer, row_linear

CHECK_EVERY = 64  # steps between host looks (stop at end-of-song, progress)
# Compiled / graphed steps read keys up to the next multiple of this, with a causal mask
# (one compiled graph / CUDA graph per bucket); the eager step reads exactly the past keys.
KV_BUCKET = 1024


class _Decoder:
    """Static device state of one batched decode and the step that advances it."""

    def __init__(self, model: Transformer, layout: TokenLayout, seeds: Tensor, top_k: int,
                 temperature: float, max_new: int) -> None:
        self.model, self.top_k, self.temperature = model, top_k, temperature
        dev = seeds.device
        w = model.output.weight
        q0, q1 = layout.layer_range(0), layout.layer_range(1)
        self.ids = {
            0: torch.cat([torch.arange(*q0), torch.tensor([layout.end_of_song_id])]).to(dev),
            1: torch.arange(*q1, device=dev),
        }
        self.weights = {0: w[self.ids[0]].contiguous(), 1: w[q1[0] : q1[1]]}
        self.keys = row_keys(seeds, STREAM_BACKBONE)
        b = seeds.shape[0]
        self.tokens = torch.zeros(b, max_new, dtype=torch.int64, device=dev)
        self.logp = torch.zeros(b, max_new, dtype=torch.float32, device=dev)
        self.tok = torch.zeros(b, dtype=torch.int64, device=dev)  # last sampled token
        self.pos = torch.zeros(1, dtype=torch.int64, device=dev)  # where `tok` goes in
        self.step = torch.zeros(1, dtype=torch.int64, device=dev)  # index of the next token

    def sample(self, hidden: Tensor, parity: int) -> None:
        """Sample token `step` from hidden [B, hidden]; record it; advance the counters."""
        logits = row_linear(hidden, self.weights[parity])
        tok, logp = sample_top_k(logits, self.keys, top_k=self.top_k,
                                 temperature=self.temperature, step=self.step,
                                 candidate_ids=self.ids[parity], with_logprob=True)
        self.tokens.index_copy_(1, self.step, tok[:, None])
        self.logp.index_copy_(1, self.step, logp[:, None])
        self.tok.copy_(tok)
        self.pos.add_(1)
        self.step.add_(1)

    def step_fn(self, parity: int, kv_len: int, masked: bool = True) -> None:
        """Feed `tok` at `pos`, sample the next token (of the given parity). masked=False:
        kv_len is exactly pos + 1 (eager decoding reads no key past the position), which
        the host knows, so the eager step takes the leaner `step_hidden`."""
        if not masked:
            self.sample(self.model.step_hidden(self.tok, kv_len - 1), parity)
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


@torch.inference_mode()
def decode_tokens(
    model: Transformer,
    layout: TokenLayout,
    prompt_ids: list[int],
    seeds: list[int],
    *,
    top_k: int,
    temperature: float,
    max_new_tokens: int,
    progress: Callable[[int, float], None] | None = None,
    max_seq_len: int | None = None,
    stop_at_end: bool = True,
    check_every: int = CHECK_EVERY,
    compile: bool = False,
    cuda_graphs: bool = False,
    with_logprobs: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The raw decode behind `generate`: token ids [B, steps], one row per seed.

    Steps run until every row has emitted end-of-song (looked at every `check_every`
    steps, so rows may run on past theirs: ignore what follows it) or max_new_tokens.
    stop_at_end=False always decodes max_new_tokens (benchmarks).
    with_logprobs: return (tokens, logprobs), logprobs float32 [B, steps], each token's
    log-probability under the distribution it was drawn from (see sample_top_k).
    """
    if not prompt_ids:
        raise ValueError("the backbone needs a non-empty prompt")
    device = model.embed.weight.device
    cap = min(max_seq_len or model.config.max_seq_len, model.config.max_seq_len)
    p = len(prompt_ids)
    max_new = min(int(max_new_tokens), cap - p)
    b = len(seeds)
    if max_new <= 0 or b == 0:
        empty = np.zeros((b, 0), dtype=np.int64)
        return (empty, empty.astype(np.float32)) if with_logprobs else empty
    graphs = cuda_graphs and device.type == "cuda"
    eager = not (graphs or compile)
    # A compiled step is specialised to the shapes it sees (cache, rope table, token
    # buffers): at the cap they are the same for every song of a batch size, so a worker
    # compiles once per batch size rather than once per prompt length and song length.
    cache_len = p + max_new if eager else cap

    model.setup_cache(b, cache_len)
    try:
        st = _Decoder(model, layout, seed_tensor(seeds, device), top_k, temperature,
                      max_new if eager else cap)
        _prefill(model, st, prompt_ids, b)
        step = _step_runner(model, st, compile=compile, graphs=graphs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # once, so the rate leaves the prefill out
        t0 = time.perf_counter()
        done_steps = _decode_steps(step, st, layout.end_of_song_id, eager=eager, p=p,
                                   max_new=max_new, cache_len=cache_len,
                                   stop_at_end=stop_at_end, check_every=check_every,
                                   progress=progress, t0=t0)
        tokens = st.tokens[:, :done_steps].cpu().numpy()
        logprobs = st.logp[:, :done_steps].cpu().numpy()
        elapsed = time.perf_counter() - t0
    finally:
        model.clear_cache()
    if progress is not None:
        progress(done_steps, (done_steps - 1) / elapsed if done_steps > 1 else 0.0)
    return (tokens, logprobs) if with_logprobs else tokens


def _prefill(model: Transformer, st: _Decoder, prompt_ids: list[int], b: int) -> None:
    """Prefill once (row 0), copy the prompt's keys/values to every row, sample token 0: the
    same numbers whatever the batch size."""
    p = len(prompt_ids)
    device = model.embed.weight.device
    prompt = torch.tensor([prompt_ids], dtype=torch.int64, device=device)
    h = model.decode_hidden(prompt, torch.arange(p, device=device), p, masked=False)
    model.copy_cache_row(0, p)
    st.pos.fill_(p - 1)  # `sample` advances it to p, where token 0 goes in
    st.sample(h[:, -1].expand(b, -1), 0)


def _step_runner(model: Transformer, st: _Decoder, *, compile: bool, graphs: bool) -> Callable:
    """The decode step as the chosen path runs it: eager, compiled or replayed as graphs."""
    step = st.step_fn
    if compile:
        # kv_len becomes a dynamic size after its first change: a few compiles, not one
        # per bucket. The batch stays static: a graph generic in the batch size ran ~10x
        # slower than eager on the CPU; each batch size gets its own.
        for t in (st.tok, st.tokens, st.logp, st.keys,
                  *(x for layer in model.layers for x in (layer.attn.cache.k, layer.attn.cache.v))):
            torch._dynamo.mark_static(t, 0)
        step = torch.compile(step)
    if graphs:
        step = _GraphRunner(step, st)
    return step


def _decode_steps(step: Callable, st: _Decoder, eos: int, *, eager: bool, p: int, max_new: int,
                  cache_len: int, stop_at_end: bool, check_every: int,
                  progress: Callable[[int, float], None] | None, t0: float) -> int:
    """Steps 1.. until every row has ended (checked every `check_every`) or max_new; how many
    steps of tokens there are."""
    for t in range(1, max_new):
        if eager:
            step(t % 2, p + t, False)
        else:
            step(t % 2, _kv_len(p + t, KV_BUCKET, cache_len))
        if (t + 1) % check_every == 0:
            if stop_at_end and bool((st.tokens[:, 0 : t + 1 : 2] == eos).any(dim=1).all()):
                return t + 1
            if progress is not None:
                progress(t + 1, t / max(time.perf_counter() - t0, 1e-9))
    return max_new


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


def generate_rows(
    model: Transformer,
    layout: TokenLayout,
    prompt_ids: list[int],
    seeds: list[int],
    *,
    top_k: int,
    temperature: float,
    max_new_tokens: int,
    progress: Callable[[int, float], None] | None = None,
    max_seq_len: int | None = None,
    **options,
) -> list[BackboneRow]:
    """Decode one prompt for every seed (one batch row each); per seed a BackboneRow.

    A row stops at end-of-song (not emitted; ended=end_of_song) or after max_new_tokens
    (capped so prompt + tokens fit max_seq_len and the config's; ended=token_cap); an odd
    count drops the last, unpaired q0. progress(tokens_done, tokens_per_s): tokens decoded
    per row so far and the per-row rate of the steps after the prefill, every
    `check_every` steps and once at the end.
    options: check_every, compile (torch.compile of the decode step), cuda_graphs (a CUDA
    graph of the step per kv-length bucket) -- the last two for CUDA, default off.
    """
    if not seeds:
        return []
    tokens, logprobs = decode_tokens(
        model, layout, prompt_ids, seeds, top_k=top_k, temperature=temperature,
        max_new_tokens=max_new_tokens, progress=progress, max_seq_len=max_seq_len,
        with_logprobs=True, **options)
    return [row_result(layout, t, lp) for t, lp in zip(tokens, logprobs, strict=True)]


def generate(model: Transformer, layout: TokenLayout, prompt_ids: list[int], seeds: list[int],
             **kwargs) -> list[np.ndarray]:
    """generate_rows, codes only: per seed int64 [2, frames] (q0 row 0, q1 row 1)."""
    return [r.codes for r in generate_rows(model, layout, prompt_ids, seeds, **kwargs)]
