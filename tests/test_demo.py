"""The demo model: deterministic, small, the real layout, never ends a song early, quiet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from khala_cli.engine import modeldir as md
from khala_cli.engine import random_model
from khala_cli.weights import demo

ROOT = Path(__file__).resolve().parents[1]


def test_two_builds_are_identical_and_small(tmp_path, demo_model_dir):
    a = demo.build_demo(tmp_path / "a")
    proc = subprocess.run([sys.executable, "-m", "khala_cli.weights.demo", str(tmp_path / "b")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "untrained" in proc.stdout and "noise" in proc.stdout
    b = tmp_path / "b"
    infos = [md.read_info(p) for p in (a, b, demo_model_dir)]
    assert infos[0].fingerprint == infos[1].fingerprint == infos[2].fingerprint
    for name in infos[0].files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    size = sum(p.stat().st_size for p in a.iterdir())
    assert size < 25 * 1024 * 1024
    assert md.verify(a) == []
    # built atomically: nothing but the two model directories was left in the parent
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_demo_says_it_is_untrained_noise(demo_model_dir):
    info = md.read_info(demo_model_dir)
    assert info.demo is True
    for text in (info.name, info.source, demo.__doc__, demo.build_demo.__doc__):
        assert "untrained" in text.lower() and "noise" in text
    assert json.loads((demo_model_dir / "model.json").read_text())["demo"] is True


def test_tokenizer_has_the_llama31_specials_in_order(demo_model_dir):
    tok = md.load_tokenizer(demo_model_dir)
    base = 256
    assert len(random_model.LLAMA31_SPECIALS) == 256
    for i, name in enumerate(random_model.LLAMA31_SPECIALS):
        assert tok.token_to_id(f"<|{name}|>") == base + i
    assert tok.token_to_id("<|finetune_right_pad_id|>") == base + 4
    assert tok.token_to_id("<|python_tag|>") == base + 10
    for minutes in range(1, 11):
        assert tok.token_to_id(f"<|reserved_special_token_{minutes}|>") is not None
    lay = md.layout(demo_model_dir)
    assert lay.audio_offset == tok.get_vocab_size(with_added_tokens=True) == 512
    assert (lay.num_quantizers, lay.codebook_size) == (64, 1024)
    # the super-res markers are reserved specials, as in the real vocabulary
    assert tok.id_to_token(lay.marker_id(2)) == "<|reserved_special_token_245|>"  # real: 128253
    assert tok.id_to_token(lay.marker_id(63)).startswith("<|reserved_special_token_")
    # text round-trips byte by byte, specials are single ids
    ids = tok.encode("<|begin_of_text|>Héllo, wörld<|eom_id|>", add_special_tokens=False).ids
    assert ids[0] == lay.bos_id and ids[-1] == tok.token_to_id("<|eom_id|>")
    assert tok.decode(ids[1:-1]) == "Héllo, wörld"


def test_vocab_rows_match_the_layout(demo_model_dir):
    lay = md.layout(demo_model_dir)
    assert md.read_config(demo_model_dir, "backbone").vocab_size == lay.backbone_vocab
    assert md.read_config(demo_model_dir, "superres").vocab_size == lay.superres_vocab
    codec = md.read_config(demo_model_dir, "codec")
    assert codec.hop_length == 2048 and codec.channels == 2 and codec.sample_rate == 44100
    assert (codec.window_frames, codec.overlap_frames) == (1920, 480)


def test_end_of_song_logit_is_always_far_below_audio(demo_model_dir):
    """The untrained backbone must not end songs at random: over random audio histories,
    end-of-song stays far below every q0 candidate."""
    lay = md.layout(demo_model_dir)
    model = md.load_transformer(demo_model_dir, "backbone", "cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 256, (4, 20), generator=g)
    audio = torch.randint(lay.layer_start(0), lay.layer_start(2), (4, 300), generator=g)
    ids = torch.cat([prompt, audio], dim=1)
    with torch.inference_mode():
        logits = model(ids)  # causal, full vocabulary
    eos = logits[..., lay.end_of_song_id]
    q0 = logits[..., lay.layer_start(0) : lay.layer_start(1)]
    assert float((q0.min(-1).values - eos).min()) > 50.0


@pytest.mark.parametrize("seed", [0, 1])
def test_codec_output_is_quiet_noise(demo_model_dir, seed):
    codec = md.load_codec(demo_model_dir)
    codes = np.random.default_rng(seed).integers(0, 1024, (64, 300))
    (wav,) = codec.decode_windowed([codes])
    assert wav.shape == (300 * 2048, 2)
    peak, rms = float(np.abs(wav).max()), float(wav.std())
    assert peak < 0.5  # well under full scale
    assert rms > 1e-3  # but audible, not silence
