"""Codec: codebook sum, weight-norm folding, windowed decode and its cross-fade seams."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from khala_cli.engine.codec import Codec, plan_windows
from khala_cli.engine.config import CodecConfig

HOP = 2048
# The DAC decoder sees about 11 frames either side of a frame; 16 is safely beyond that.
MARGIN = 16


def make_codec(window: int = 80, overlap: int = 20, seed: int = 0) -> Codec:
    cfg = CodecConfig(
        num_codebooks=4, codebook_size=16, latent_dim=8, n_filters=2,
        rates=(8, 8, 8, 4), channels=2, window_frames=window, overlap_frames=overlap,
    )
    torch.manual_seed(seed)
    codec = Codec(cfg)
    with torch.no_grad():
        codec.codebooks.normal_()
        for name, p in codec.decoder.named_parameters():
            if name.endswith("alpha"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(std=0.1)
    return codec.eval()


def random_codes(frames: int, seed: int = 1, q: int = 4, k: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, k, (q, frames), generator=g)


@pytest.fixture(scope="module")
def codec() -> Codec:
    c = make_codec()
    c.fold_weight_norm()
    return c


def test_latents_are_plain_codebook_sums(codec):
    codes = random_codes(7)
    z = codec.latents(codes.unsqueeze(0))[0]  # [latent, frames]
    for t in range(7):
        expected = sum(codec.codebooks[q, codes[q, t]] for q in range(4))
        torch.testing.assert_close(z[:, t], expected)


def test_codes_out_of_range_are_rejected(codec):
    codes = random_codes(5)
    codes[2, 3] = 16
    with pytest.raises(ValueError, match="out of range"):
        codec.decode(codes.unsqueeze(0))


def test_final_tanh_is_dropped_and_names_match_dac():
    from dac.model.dac import Decoder

    c = make_codec()
    ref = Decoder(8, 2 * 16, [8, 8, 8, 4], d_out=2)
    assert not any(isinstance(m, torch.nn.Tanh) for m in c.decoder.modules())
    ours = {k.removeprefix("decoder."): v.shape for k, v in c.state_dict().items() if k != "codebooks"}
    assert ours == {k: v.shape for k, v in ref.state_dict().items()}
    assert any(k.endswith("weight_g") for k in ours) and any(k.endswith("weight_v") for k in ours)
    # Without a Tanh, loud latents give samples beyond +-1.
    with torch.no_grad():
        c.codebooks.mul_(50.0)
    assert float(c.decode(random_codes(12).unsqueeze(0)).abs().max()) > 1.0


def test_weight_norm_folding_matches_unfolded_decoder():
    plain = make_codec(seed=4)
    folded = make_codec(seed=4)
    assert folded.fold_weight_norm() > 0
    assert not any(k.endswith(("weight_g", "weight_v")) for k in folded.state_dict())
    codes = random_codes(30).unsqueeze(0)
    a, b = plain.decode(codes), folded.decode(codes)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("frames", [1, 37, 80, 81, 139, 200, 257])
def test_samples_are_frames_times_hop(codec, frames):
    (wav,) = codec.decode_windowed([random_codes(frames)])
    assert wav.shape == (frames * HOP, 2) and wav.dtype == np.float32
    assert np.isfinite(wav).all()


def test_window_plan_follows_reference_slicing():
    assert plan_windows(1920, 1920, 480) == [(0, 1920), (1440, 480)]
    assert plan_windows(1440, 1920, 480) == [(0, 1440)]
    assert plan_windows(4000, 1920, 480) == [(0, 1920), (1440, 1920), (2880, 1120)]
    assert plan_windows(10, 4, 0) == [(0, 4), (4, 4), (8, 2)]


def test_windowed_equals_single_shot_away_from_seams(codec):
    frames = 257
    codes = random_codes(frames)
    (win,) = codec.decode_windowed([codes])
    full = codec.decode(codes.unsqueeze(0))[0].numpy().T
    # Window edges inside the song: every start > 0 and every end < frames.
    edges = set()
    for s, n in plan_windows(frames, 80, 20):
        if s > 0:
            edges.add(s)
        if s + n < frames:
            edges.add(s + n)
    far = [t for t in range(frames) if all(abs(t - e) >= MARGIN for e in edges)]
    assert len(far) > 60  # the comparison covers a good part of the song
    idx = np.concatenate([np.arange(t * HOP, (t + 1) * HOP) for t in far])
    np.testing.assert_allclose(win[idx], full[idx], rtol=1e-4, atol=1e-5)
    # ... and near a seam it does differ (the windows see different context).
    near = np.arange(80 * HOP - 4 * HOP, 80 * HOP)
    assert not np.allclose(win[near], full[near], atol=1e-5)


def _fade(n: int) -> tuple[np.ndarray, np.ndarray]:
    j = np.arange(n, dtype=np.float64)
    w_in = j / (n - 1)
    return 1.0 - w_in, w_in


@pytest.mark.parametrize("frames", [200, 130])
def test_cross_fade_at_seams_matches_independent_formula(codec, frames):
    """Rebuild the windowed output from separately decoded windows with a hand-written
    linear cross-fade; 130 frames ends with a window lying wholly inside the one before."""
    codes = random_codes(frames, seed=3)
    (win,) = codec.decode_windowed([codes])
    plan = plan_windows(frames, 80, 20)
    if frames == 130:
        assert plan[-1] == (120, 10)
    pieces = [codec.decode(codes[:, s : s + n].unsqueeze(0))[0].numpy().T.astype(np.float64) for s, n in plan]
    expected = np.zeros((frames * HOP, 2))
    expected[: plan[0][1] * HOP] = pieces[0]
    prev_frames = plan[0][1]
    for (s, n), piece in zip(plan[1:], pieces[1:], strict=True):
        ov = min(20, prev_frames, n) * HOP
        fade_out, fade_in = _fade(ov)
        a = s * HOP
        expected[a : a + ov] = expected[a : a + ov] * fade_out[:, None] + piece[:ov] * fade_in[:, None]
        expected[a + ov : (s + n) * HOP] = piece[ov:]
        prev_frames = n
    np.testing.assert_allclose(win, expected, rtol=1e-5, atol=1e-6)
    # The seam really blends two different signals (each window is wrong near its own edge).
    s = plan[1][0]
    ov = min(20, plan[1][1]) * HOP
    assert not np.allclose(pieces[0][s * HOP : s * HOP + ov], pieces[1][:ov], atol=1e-4)


def test_a_song_decodes_to_the_same_bits_beside_other_songs(codec):
    songs = [random_codes(150, seed=5), random_codes(45, seed=6), random_codes(100, seed=7)]
    together = codec.decode_windowed(songs)
    for i, song in enumerate(songs):
        (alone,) = codec.decode_windowed([song])
        assert np.array_equal(together[i], alone)
    one_at_a_time = codec.decode_windowed([songs[0]], window_batch=1)[0]
    np.testing.assert_allclose(together[0], one_at_a_time, rtol=1e-5, atol=1e-6)


def test_decode_progress_counts_windows(codec):
    seen = []
    codec.decode_windowed([random_codes(200), random_codes(50)], progress=lambda d, t: seen.append((d, t)))
    assert seen[0] == (0, 5) and seen[-1] == (5, 5)  # 200 frames: 4 windows; 50: 1


def test_window_groups_hold_one_song_and_come_from_the_config(monkeypatch):
    codec = make_codec(window=40, overlap=10)
    codec.fold_weight_norm()
    songs = [random_codes(100, seed=8), random_codes(100, seed=9)]  # windows of 40, 40, 40, 10
    inner = codec.decoder.forward
    shapes = []

    def spy(z):
        shapes.append(tuple(z.shape))
        return inner(z)

    monkeypatch.setattr(codec.decoder, "forward", spy)
    monkeypatch.setattr(codec, "window_group", lambda frames: 2)
    codec.decode_windowed(songs)
    latent = codec.config.latent_dim
    # per song: its three 40-frame windows as 2 + 1, its 10-frame tail alone
    assert shapes == [(2, latent, 40), (1, latent, 40), (1, latent, 10)] * 2
    real = CodecConfig()  # the real codec: a 1920-frame window is over 2 GiB on its own
    assert real.window_group(real.window_frames) == 1
    assert make_codec().config.window_group(80) == 16

