"""Super-resolution: fill RVQ layers 2..Q-1 from q0/q1, one layer per non-causal pass.

Rows [S, C]: the prompt (column 0 = text id, other columns pad), then one row per audio
frame. The pass filling layer L marks the last prompt row with `layout.marker_id(L)`, runs
the model over columns 0..L-1 with full attention, projects the audio rows' hidden states
onto that layer's output rows only, and samples each frame (top-k, temperature 1) with noise
keyed on (seed, L, frame, code). Batched seeds with different frame counts are padded at
the end and their padding keys masked; S is the real length, not the reference's 8192.
A seed may keep a parent's first frames (`kept`): every pass writes their codes over what
it sampled, so the new frames are conditioned on the kept ones in every layer.

`upsample_reference_padded` is the reference's method (every row padded to a fixed length,
ids re-embedded every pass, all rows projected), kept to check that the two agree and to
benchmark the difference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from khala_cli.engine.sampling import STREAM_SUPERRES, row_keys, sample_top_k, seed_tensor
from khala_cli.engine.tokens import PAD, TokenLayout
from khala_cli.engine.transformer import Transformer

REFERENCE_PAD_TO = 8192


def _rows(layout: TokenLayout, prompt_ids: list[int], q01: list[np.ndarray], length: int, device) -> Tensor:
    """ids [B, length, Q]: prompt rows, then the q0/q1 frames (as ids), all else PAD."""
    p, q = len(prompt_ids), layout.num_quantizers
    ids = torch.full((len(q01), length, q), PAD, dtype=torch.int64)
    ids[:, :p, 0] = torch.tensor(prompt_ids, dtype=torch.int64)
    for b, codes in enumerate(q01):
        codes = _check_q01(layout, codes)
        f = codes.shape[1]
        ids[b, p : p + f, 0] = torch.from_numpy(codes[0]) + layout.layer_start(0)
        ids[b, p : p + f, 1] = torch.from_numpy(codes[1]) + layout.layer_start(1)
    return ids.to(device)


def _check_q01(layout: TokenLayout, codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim != 2 or codes.shape[0] != 2:
        raise ValueError(f"q01 codes must be [2, frames], got {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= layout.codebook_size):
        raise ValueError("q01 codes outside 0..codebook_size-1")
    return codes


def _codes(layout: TokenLayout, ids: Tensor, p: int, frames: list[int]) -> list[np.ndarray]:
    offsets = torch.tensor([layout.layer_start(i) for i in range(layout.num_quantizers)])
    ids = ids.cpu()
    return [(ids[b, p : p + f].T - offsets[:, None]).numpy().astype(np.int64) for b, f in enumerate(frames)]


@torch.inference_mode()
def upsample(
    model: Transformer,
    layout: TokenLayout,
    prompt_ids: list[int],
    q01: list[np.ndarray],
    seeds: list[int],
    *,
    top_k: int = 10,
    progress: Callable[[int, int], None] | None = None,
    q_block: int | None = None,
    kept: Sequence[np.ndarray | None] | None = None,
) -> list[np.ndarray]:
    """q0/q1 codes ([2, frames] per seed) -> all layers' codes ([num_quantizers, frames],
    offsets subtracted; rows 0 and 1 are the given q0, q1), the same prompt for all seeds.
    Each seed's passes run on its own rows alone, so its codes never depend on what it is
    rendered beside (a padded batch rounds differently). progress(layers_done,
    layers_total) once every seed has filled a layer.
    kept: per seed None or int64 [num_quantizers, K] codes of its first K frames (their q0,
    q1 those given), held in every layer; the other frames are sampled beside them."""
    if len(q01) != len(seeds):
        raise ValueError("one q01 array per seed")
    if not seeds:
        return []
    if not prompt_ids:
        raise ValueError("super-res needs a non-empty prompt (its last row carries the marker)")
    device = model.embed.weight.device
    p, nq = len(prompt_ids), layout.num_quantizers
    frames = [int(np.asarray(c).shape[-1]) for c in q01]
    held = _held(layout, q01, kept, device)
    ids = [_rows(layout, prompt_ids, [c], p + f, device) for c, f in zip(q01, frames, strict=True)]
    # Per seed the sum of the embeddings of columns 0..L-1 (fp32), grown by one column per pass.
    acc = [model.add_column(model.add_column(None, x[..., 0]), x[..., 1]) for x in ids]
    for layer in range(2, nq):
        for i, seed in enumerate(seeds):
            if frames[i]:
                acc[i] = _fill_layer(model, layout, ids[i], acc[i], layer, seed, p, top_k, q_block,
                                     held[i])
            else:
                ids[i][:, :, layer] = PAD
        if progress is not None:
            progress(layer - 1, nq - 2)
    return [_codes(layout, x, p, [f])[0] for x, f in zip(ids, frames, strict=True)]


def check_kept(layout: TokenLayout, kept, frames: int | None = None) -> np.ndarray:
    """Kept codes as int64 [num_quantizers, K], 1 <= K (<= frames), 0..codebook_size-1;
    otherwise ValueError."""
    k = np.asarray(kept)
    q = layout.num_quantizers
    if (k.ndim != 2 or k.shape[0] != q or k.shape[1] < 1
            or not np.issubdtype(k.dtype, np.integer)):
        raise ValueError(f"kept codes must be integers [{q}, K] with K >= 1, got {k.dtype} "
                         f"{k.shape}")
    if frames is not None and k.shape[1] > frames:
        raise ValueError(f"{k.shape[1]} kept frames, more than the take's {frames}")
    if k.min() < 0 or k.max() >= layout.codebook_size:
        raise ValueError(f"kept codes outside 0..{layout.codebook_size - 1}")
    return k.astype(np.int64)


def _held(layout: TokenLayout, q01: Sequence[np.ndarray],
          kept: Sequence[np.ndarray | None] | None, device) -> list[Tensor | None]:
    """Per seed its kept frames' ids [K, Q] (offsets added) or None, checked against its
    frames and its q0/q1."""
    if kept is None:
        return [None] * len(q01)
    if len(kept) != len(q01):
        raise ValueError("one kept array (or None) per seed")
    out: list[Tensor | None] = []
    offsets = np.array([layout.layer_start(i) for i in range(layout.num_quantizers)])
    for codes, k in zip(q01, kept, strict=True):
        if k is None:
            out.append(None)
            continue
        codes = _check_q01(layout, codes)
        k = check_kept(layout, k, codes.shape[1])
        if not np.array_equal(k[:2], codes[:, : k.shape[1]]):
            raise ValueError("kept codes: their q0/q1 differ from the seed's first frames")
        out.append(torch.from_numpy(k.T + offsets).to(device))
    return out


def _fill_layer(model: Transformer, layout: TokenLayout, ids: Tensor, acc: Tensor, layer: int,
                seed: int, p: int, top_k: int, q_block: int | None,
                held: Tensor | None = None) -> Tensor:
    """One pass over one seed's rows ids [1, S, Q]: sample layer `layer` of its frames (noise
    keyed on seed, layer, frame, code) into ids, the held frames' ids [K, Q] written over
    theirs; its embedding sum with that column added."""
    marker = layout.marker_id(layer)
    ids[:, p - 1, 0] = marker
    x = acc.to(model.embed.weight.dtype, copy=True)
    x[:, p - 1] = model.embed.weight[marker]  # the marker row's only non-pad column is 0
    hidden = model.full_hidden(x, None, q_block=q_block)[:, p:]
    start, end = layout.layer_range(layer)
    logits = model.project(hidden, slice(start, end))  # [1, F, codebook]
    keys = row_keys(seed_tensor([seed], ids.device), STREAM_SUPERRES + layer)[:, None]
    frame_idx = torch.arange(ids.shape[1] - p, device=ids.device)
    code = sample_top_k(logits, keys, top_k=top_k, temperature=1.0, step=frame_idx)
    ids[:, p:, layer] = code + start
    if held is not None:
        ids[0, p : p + held.shape[0], layer] = held[:, layer]
    return model.add_column(acc, ids[..., layer])


@torch.inference_mode()
def upsample_reference_padded(
    model: Transformer,
    layout: TokenLayout,
    prompt_ids: list[int],
    q01: list[np.ndarray],
    seeds: list[int],
    *,
    top_k: int = 10,
    pad_to: int = REFERENCE_PAD_TO,
    progress: Callable[[int, int], None] | None = None,
) -> list[np.ndarray]:
    """The reference's method, one seed at a time: rows padded to max(pad_to, S) with their
    keys masked, columns 0..L-1 embedded from ids every pass, every row projected onto the
    layer's window and sampled, non-audio rows reset to pad. Same noise as `upsample`."""
    if len(q01) != len(seeds):
        raise ValueError("one q01 array per seed")
    device = model.embed.weight.device
    p, nq = len(prompt_ids), layout.num_quantizers
    out = []
    for codes, seed in zip(q01, seeds, strict=True):
        f = int(np.asarray(codes).shape[-1])
        s = max(pad_to, p + f)
        ids = _rows(layout, prompt_ids, [codes], s, device)
        key_mask = torch.arange(s, device=device)[None, :] < p + f
        loss_mask = ids[..., 1] != PAD  # rows that carry audio
        seed_t = seed_tensor([seed], device)
        frame_idx = (torch.arange(s, device=device) - p).clamp_min(0)
        for layer in range(2, nq):
            ids[:, p - 1, 0] = layout.marker_id(layer)
            hidden = model.full_hidden(ids[..., :layer], key_mask)
            start, end = layout.layer_range(layer)
            logits = model.project(hidden, slice(start, end))
            keys = row_keys(seed_t, STREAM_SUPERRES + layer)[:, None]
            code = sample_top_k(logits, keys, top_k=top_k, temperature=1.0, step=frame_idx)
            ids[..., layer] = torch.where(loss_mask, code + start, PAD)
            if progress is not None:
                progress(layer - 1, nq - 2)
        out.extend(_codes(layout, ids, p, [f]))
    return out
