"""Top-k + temperature sampling whose randomness comes from the row's seed and nothing else.

No generator state: the noise of each candidate is a counter-based hash of
(seed, stream, step, candidate id), computed with integer tensor ops on the logits' device.
A seed therefore draws the same tokens alone or in a batch of any size, inside CUDA graphs,
and in any order of steps. The draw is an exponential race, argmax(p / E) with
E = -log(U) ~ Exp(1) from the hash, which samples exactly from p.

The hash: `row_key(seed, stream)` once per row and stream, then per draw
mix(mix(key ^ step) ^ mix(candidate)). `mix32` is a two-round xorshift-multiply mixer whose
multipliers are below 2**31, so every product of a 32-bit value fits in int64.
"""

from __future__ import annotations

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
STREAM_BACKBONE = 0
STREAM_SUPERRES = 1 << 16  # + layer index
_M1, _M2 = 0x21F0AAAD, 0x735A2D97  # < 2**31


def mix32(x: Tensor) -> Tensor:
    """A 32-bit avalanche mixer on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & MASK32
    return x ^ (x >> 15)


def seed_tensor(seeds: list[int], device=None) -> Tensor:
    """Python ints (any size; taken mod 2**64) -> int64 tensor [len(seeds)]."""
    vals = [((int(s) % (1 << 64)) ^ (1 << 63)) - (1 << 63) for s in seeds]
    return torch.tensor(vals, dtype=torch.int64, device=device)


def row_keys(seeds: Tensor, stream: int) -> Tensor:
    """Per-row 32-bit keys (int64) from int64 seeds and a stream number."""
    h = mix32((seeds & MASK32) ^ 0x9E3779B9)
    h = mix32(h ^ ((seeds >> 32) & MASK32))
    return mix32(h ^ (int(stream) & MASK32))


def hash_uniform(keys: Tensor, step: Tensor | int, cand: Tensor) -> Tensor:
    """Uniform fp32 in (0, 1) for (row key, step, candidate id); the three broadcast."""
    h = mix32(keys ^ (step & MASK32)) ^ mix32(cand & MASK32)
    h = mix32(h)
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


def sample_top_k(
    logits: Tensor,
    keys: Tensor,
    *,
    top_k: int,
    temperature: float,
    step: Tensor | int,
    candidate_ids: Tensor | None = None,
    with_logprob: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Draw one candidate per row of `logits` [..., N].

    keys (from `row_keys`) and step: int64, broadcastable to logits.shape[:-1].
    candidate_ids: [N] ids the columns stand for (default the column index); the noise is
    keyed on these ids and the result is in them. Top-k first, then
    softmax(top / temperature); temperature <= 0 or top_k == 1 is greedy.
    with_logprob: also return the fp32 log-probability [...] of the drawn candidate under
    the distribution it was drawn from (greedy: softmax of the top-k at temperature 1,
    since a point mass says nothing about the model's confidence).
    """
    scaled, cand, greedy = _top(logits, top_k, temperature, candidate_ids)
    if greedy:
        tok = cand[..., 0]
        if not with_logprob:
            return tok
        return tok, torch.log_softmax(scaled, dim=-1)[..., 0]
    probs = torch.softmax(scaled, dim=-1)
    if isinstance(step, Tensor) and step.dim():
        step = step.unsqueeze(-1)
    u = hash_uniform(keys.unsqueeze(-1), step, cand)
    choice = torch.argmax(probs / -torch.log(u), dim=-1, keepdim=True)
    tok = torch.gather(cand, -1, choice).squeeze(-1)
    if not with_logprob:
        return tok
    return tok, torch.gather(torch.log_softmax(scaled, dim=-1), -1, choice).squeeze(-1)


def _top(logits: Tensor, top_k: int, temperature: float,
         candidate_ids: Tensor | None) -> tuple[Tensor, Tensor, bool]:
    """The distribution sample_top_k draws from: (top-k logits, tempered unless greedy;
    the candidates they stand for; greedy)."""
    k = max(1, min(int(top_k), logits.shape[-1]))
    vals, idx = torch.topk(logits.float(), k, dim=-1)
    cand = idx if candidate_ids is None else candidate_ids[idx]
    greedy = temperature <= 0 or k == 1
    return (vals if greedy else vals / temperature), cand, greedy


def logprob_of(logits: Tensor, tokens: Tensor, *, top_k: int, temperature: float,
               candidate_ids: Tensor | None = None) -> Tensor:
    """The fp32 log-probability [...] of given tokens [...] under the distribution
    sample_top_k draws from with these settings: the number it returns with a token it
    drew (-inf for a token outside the top-k)."""
    scaled, cand, _ = _top(logits, top_k, temperature, candidate_ids)
    hit = cand == tokens.unsqueeze(-1)
    lp = torch.gather(torch.log_softmax(scaled, dim=-1), -1,
                      hit.int().argmax(dim=-1, keepdim=True)).squeeze(-1)
    return torch.where(hit.any(dim=-1), lp, float("-inf"))
