"""DAC RVQ decoder: summed codebook vectors -> DAC decoder blocks -> stereo waveform.

The decoder blocks are those of `descript-audio-codec`, built as the reference builds them
(2 output channels) with the final Tanh dropped. Long songs are decoded in overlapping
windows that are joined by a linear cross-fade, with the seam arithmetic of the reference
(`decode_to_wav`); windows of equal length go through the decoder together as one batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from dac.model.dac import Decoder
from torch import nn

from khala_cli.engine.config import CodecConfig

DecodeProgress = Callable[[int, int], None]  # (windows done, windows total)


def build_decoder(config: CodecConfig) -> nn.Module:
    """`dac.model.dac.Decoder` as the reference configures it, without the final Tanh.

    The Tanh is the last module of `decoder.model` and has no parameters, so dropping it
    leaves every state-dict name unchanged.
    """
    with warnings.catch_warnings():
        # dac builds its convs with the (deprecated) torch.nn.utils.weight_norm.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        decoder = Decoder(
            config.latent_dim,
            config.n_filters * 2 ** len(config.rates),
            list(config.rates),
            d_out=config.channels,
        )
    layers = list(decoder.model)
    if not isinstance(layers[-1], nn.Tanh):
        raise RuntimeError("unexpected dac Decoder layout: the last module is not Tanh")
    decoder.model = nn.Sequential(*layers[:-1])
    return decoder


def fold_weight_norm(module: nn.Module) -> int:
    """Replace every weight-norm (weight_g, weight_v) pair under `module` by the plain weight
    it computes. The forward pass is unchanged; it only skips recomputing the weight each
    call. Returns how many modules were folded."""
    count = 0
    for sub in module.modules():
        if hasattr(sub, "weight_g") and hasattr(sub, "weight_v"):
            torch.nn.utils.remove_weight_norm(sub)
            count += 1
    return count


@dataclass(frozen=True)
class Window:
    item: int  # which song of the batch
    start: int  # first frame
    frames: int  # number of frames (the last window of a song can be shorter)


def effective_overlap(window: int, overlap: int) -> int:
    """The overlap the reference actually uses: clamped to 0..window-1."""
    return max(0, min(overlap, window - 1))


def plan_windows(num_frames: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """(start, frames) of each decode window of a song, as the reference slices them:
    starts every `window - overlap` frames until the song ends (so the last window may lie
    entirely inside the one before it, and is cross-faded over it all the same)."""
    overlap = effective_overlap(window, overlap)
    stride = window - overlap
    return [(s, min(window, num_frames - s)) for s in range(0, num_frames, stride)]


def stitch(chunks: Sequence[torch.Tensor], frame_counts: Sequence[int], overlap: int) -> torch.Tensor:
    """Join decoded windows [channels, samples_i] into one waveform [channels, samples].

    Each window after the first overlaps the waveform so far by min(overlap, previous
    window's frames, this window's frames) frames; over those samples the old tail fades out
    and the new head fades in along a straight line (1 -> 0 and 0 -> 1, both ends included).
    """
    if not chunks:
        raise ValueError("no windows to stitch")
    total = chunks[0].shape[-1]
    for k in range(1, len(chunks)):
        total += chunks[k].shape[-1] - _overlap_samples(chunks, frame_counts, overlap, k)
    out = torch.empty(chunks[0].shape[0], total, dtype=chunks[0].dtype)
    end = chunks[0].shape[-1]
    out[:, :end] = chunks[0]
    for k in range(1, len(chunks)):
        chunk = chunks[k]
        n = _overlap_samples(chunks, frame_counts, overlap, k)
        if n > 0:
            fade_out = torch.linspace(1.0, 0.0, n, dtype=out.dtype)
            fade_in = 1.0 - fade_out
            out[:, end - n : end] = out[:, end - n : end] * fade_out + chunk[:, :n] * fade_in
        rest = chunk.shape[-1] - n
        out[:, end : end + rest] = chunk[:, n:]
        end += rest
    return out


def _overlap_samples(chunks, frame_counts, overlap: int, k: int) -> int:
    if overlap <= 0:
        return 0
    prev_frames, cur_frames = frame_counts[k - 1], frame_counts[k]
    ov = min(overlap, prev_frames, cur_frames)
    prev_n = round(chunks[k - 1].shape[-1] * ov / max(1, prev_frames))
    cur_n = round(chunks[k].shape[-1] * ov / max(1, cur_frames))
    return min(prev_n, cur_n)


class Codec(nn.Module):
    """Codebooks [num_codebooks, codebook_size, latent_dim] + DAC decoder (no final Tanh).

    State dict: `codebooks` and `decoder.*` (weight-norm `weight_g`/`weight_v`), as stored in
    a model directory. Call `fold_weight_norm()` after loading for faster decoding.
    """

    def __init__(self, config: CodecConfig):
        super().__init__()
        self.config = config
        self.register_buffer(
            "codebooks",
            torch.zeros(config.num_codebooks, config.codebook_size, config.latent_dim),
        )
        self.decoder = build_decoder(config)

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    @property
    def device(self) -> torch.device:
        return self.codebooks.device

    def fold_weight_norm(self) -> int:
        return fold_weight_norm(self.decoder)

    def latents(self, codes: torch.Tensor) -> torch.Tensor:
        """codes int [B, Q, T] (Q <= num_codebooks) -> summed codebook vectors [B, latent, T]."""
        if codes.dim() != 3:
            raise ValueError(f"codes must be [batch, quantizers, frames], got {tuple(codes.shape)}")
        q = codes.shape[1]
        if q > self.config.num_codebooks:
            raise ValueError(f"{q} quantizers but the codec has {self.config.num_codebooks}")
        codes = codes.to(self.device, torch.long)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.codebook_size):
            raise ValueError(
                f"codes out of range 0..{self.config.codebook_size - 1}: "
                f"min {int(codes.min())}, max {int(codes.max())}"
            )
        z = torch.zeros(
            codes.shape[0], codes.shape[2], self.config.latent_dim,
            dtype=self.codebooks.dtype, device=self.device,
        )
        for i in range(q):  # summed in layer order, as the reference's RVQ decode does
            z = z + self.codebooks[i][codes[:, i]]
        return z.transpose(1, 2)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Single pass, no windows: codes [B, Q, T] -> waveform [B, channels, T * hop]."""
        return self.decoder(self.latents(codes))

    def window_batch_size(self, frames: int) -> int:
        """How many windows of `frames` frames to decode in one forward, from free memory."""
        per_window = self._activation_bytes(frames)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * 0.8)
        else:
            budget = 2 * 1024**3
        return int(max(1, min(16, budget // max(1, per_window))))

    def _activation_bytes(self, frames: int) -> int:
        return self.config.window_activation_bytes(frames, self.codebooks.element_size())

    @torch.inference_mode()
    def decode_windowed(
        self,
        items: Sequence[np.ndarray | torch.Tensor],
        progress: DecodeProgress | None = None,
        window_batch: int | None = None,
    ) -> list[np.ndarray]:
        """Decode songs in overlapping windows, cross-faded as the reference does.

        items: per song, int codes [Q, frames]. Returns per song float32 [samples, channels],
        samples = frames * hop. Windows of equal length, from all songs, are decoded together
        (up to `window_batch` per forward; by default as many as memory allows).
        """
        lat, windows = self._plan(items)
        decoded = self._decode_windows(lat, windows, progress, window_batch)
        return [self._stitched([w for w in windows if w.item == i], decoded)
                for i in range(len(items))]

    def _plan(self, items: Sequence[np.ndarray | torch.Tensor]) -> tuple[list[torch.Tensor], list[Window]]:
        """Per song its latents [latent_dim, frames], and every song's windows."""
        cfg = self.config
        lat, windows = [], []
        for i, codes in enumerate(items):
            codes = torch.as_tensor(np.asarray(codes) if not torch.is_tensor(codes) else codes)
            if codes.dim() != 2:
                raise ValueError(f"item {i}: codes must be [quantizers, frames], got {tuple(codes.shape)}")
            lat.append(self.latents(codes.unsqueeze(0))[0])
            windows += [
                Window(i, s, n) for s, n in plan_windows(codes.shape[1], cfg.window_frames, cfg.overlap_frames)
            ]
        return lat, windows

    def _decode_windows(self, lat: list[torch.Tensor], windows: list[Window],
                        progress: DecodeProgress | None, window_batch: int | None,
                        ) -> dict[Window, torch.Tensor]:
        """Each window's waveform [channels, samples]; windows of equal length go together."""
        decoded: dict[Window, torch.Tensor] = {}
        total = len(windows)
        if progress:
            progress(0, total)
        by_len: dict[int, list[Window]] = {}
        for w in windows:
            by_len.setdefault(w.frames, []).append(w)
        for frames, group in sorted(by_len.items(), reverse=True):
            step = window_batch or self.window_batch_size(frames)
            b = 0
            while b < len(group):
                part = group[b : b + step]
                z = torch.stack([lat[w.item][:, w.start : w.start + w.frames] for w in part])
                try:
                    wav = self.decoder(z).float().cpu()
                except torch.OutOfMemoryError:
                    if step == 1 or window_batch:
                        raise
                    del z
                    step = max(1, step // 2)  # the memory estimate was optimistic
                    torch.cuda.empty_cache()
                    continue
                decoded.update(zip(part, wav, strict=True))
                b += len(part)
                if progress:
                    progress(len(decoded), total)
        return decoded

    def _stitched(self, mine: list[Window], decoded: dict[Window, torch.Tensor]) -> np.ndarray:
        """One song's windows cross-faded into float32 [samples, channels]."""
        cfg = self.config
        if not mine:
            return np.zeros((0, cfg.channels), dtype=np.float32)
        wave = stitch([decoded[w] for w in mine], [w.frames for w in mine],
                      effective_overlap(cfg.window_frames, cfg.overlap_frames))
        return np.ascontiguousarray(wave.numpy().T, dtype=np.float32)
