"""Top-k + temperature sampling whose randomness comes from the row's seed and nothing else.

No generator state: the noise of each candidate is a counter-based hash of
(seed, stream, step, candidate id), computed with integer tensor ops on the logits' device.
A seed therefore draws the same tokens alone or in a batch of any size, on any device,
inside CUDA graphs, and in any order of steps. The draw is an exponential race,
argmax(p / E) with E ~ Exp(1) from the hash, which samples exactly from p.
"""

from __future__ import annotations

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
STREAM_BACKBONE = 0
STREAM_SUPERRES = 1 << 16  # + layer index


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32), without int64 overflow."""
    lo = (x & 0xFFFF) * c
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def mix32(x: Tensor) -> Tensor:
    """A 32-bit avalanche mixer (xorshift-multiply, "lowbias32") on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def seed_tensor(seeds: list[int], device=None) -> Tensor:
    """Python ints (any size; taken mod 2**64) -> int64 tensor [len(seeds)]."""
    vals = [((int(s) % (1 << 64)) ^ (1 << 63)) - (1 << 63) for s in seeds]
    return torch.tensor(vals, dtype=torch.int64, device=device)


def hash_uniform(seed: Tensor, stream: Tensor | int, step: Tensor | int, cand: Tensor) -> Tensor:
    """Uniform fp32 in (0, 1) from (seed, stream, step, candidate); inputs broadcast."""
    h = mix32((seed & MASK32) ^ 0x9E3779B9)
    for i, part in enumerate(((seed >> 32) & MASK32, stream, step, cand)):
        if not isinstance(part, Tensor):
            part = torch.tensor(part, dtype=torch.int64, device=seed.device)
        h = mix32(((h ^ (part & MASK32)) + 0x632BE5AB * (i + 1)) & MASK32)
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


def sample_top_k(
    logits: Tensor,
    seeds: Tensor,
    *,
    top_k: int,
    temperature: float,
    stream: Tensor | int,
    step: Tensor | int,
    candidate_ids: Tensor | None = None,
) -> Tensor:
    """Draw one candidate per row of `logits` [..., N].

    seeds, step: int64, broadcastable to logits.shape[:-1]. candidate_ids: [N] ids that the
    columns stand for (default the column index); the noise is keyed on these ids and the
    result is in them. Top-k first, then softmax(top / temperature); temperature <= 0 or
    top_k == 1 is greedy.
    """
    n = logits.shape[-1]
    k = max(1, min(int(top_k), n))
    vals, idx = torch.topk(logits.float(), k, dim=-1)
    cand = idx if candidate_ids is None else candidate_ids[idx]
    if temperature <= 0 or k == 1:
        return cand[..., 0]
    probs = torch.softmax(vals / temperature, dim=-1)
    seeds = seeds.unsqueeze(-1)
    if isinstance(step, Tensor):
        step = step.unsqueeze(-1) if step.dim() else step
    u = hash_uniform(seeds, stream, step, cand)
    race = probs / -torch.log(u)
    choice = torch.argmax(race, dim=-1, keepdim=True)
    return torch.gather(cand, -1, choice).squeeze(-1)
