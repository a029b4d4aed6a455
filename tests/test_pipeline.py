"""End to end on the demo model (untrained: it renders noise): stages, residency, progress."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from khala_cli.engine import modeldir as md
from khala_cli.engine.pipeline import Pipeline, Request, Take
from khala_cli.prompt import PromptSpec, prompt_ids

HALF_MINUTE_TOKENS = 2584 // 2  # the reference's 2584 tokens per minute
SEEDS = [11, 12]


def _request(p: Pipeline, seeds=SEEDS, max_new_tokens=HALF_MINUTE_TOKENS) -> Request:
    spec = PromptSpec(mode="vocal", tags=("synthwave", "female vocals"),
                      lyrics="[verse]\nneon rain on the window\nwe run", duration=1)
    bb, sr = prompt_ids(p.tokenizer, spec)
    return Request(backbone_ids=bb, superres_ids=sr, seeds=list(seeds), top_k_bb=80,
                   temperature=1.0, top_k_sr=10, max_new_tokens=max_new_tokens, duration=1)


SHORT_TOKENS = 300  # the residency comparison needs no full half minute


@pytest.fixture(scope="module")
def renders(demo_model_dir):
    """keep_loaded: a 1-minute request capped at half a minute, then a short one;
    one_shot: the short one. Each with its progress events."""
    out = {}
    p = Pipeline.from_dir(demo_model_dir, device="cpu", residency="keep_loaded")
    events = []
    takes = p.render([_request(p)], progress=lambda *e: events.append(e))
    out["keep_loaded"] = (p, takes, events)
    out["keep_loaded_short"] = (p, p.render([_request(p, max_new_tokens=SHORT_TOKENS)]), None)
    p = Pipeline.from_dir(demo_model_dir, device="cpu", residency="one_shot")
    events = []
    takes = p.render([_request(p, max_new_tokens=SHORT_TOKENS)], progress=lambda *e: events.append(e))
    out["one_shot"] = (p, takes, events)
    return out


@pytest.mark.slow
def test_demo_renders_finite_stereo_of_the_expected_length(renders):
    p, takes, _ = renders["keep_loaded"]
    assert len(takes) == 1 and [t.seed for t in takes[0]] == SEEDS
    hop = p.codec_config.hop_length
    assert hop == 2048
    for take in takes[0]:
        assert isinstance(take, Take)
        frames = take.codes.shape[1]
        # the demo never ends a song early: it runs to the 0.5-minute cap
        assert frames == HALF_MINUTE_TOKENS // 2
        assert take.backbone_tokens == 2 * frames
        assert take.codes.shape == (64, frames) and take.codes.dtype == np.int64
        assert take.codes.min() >= 0 and take.codes.max() < 1024
        assert take.audio.shape == (frames * 2048, 2) and take.audio.dtype == np.float32
        assert np.isfinite(take.audio).all()
        assert 1e-3 < float(take.audio.std()) and float(np.abs(take.audio).max()) < 1.0
        assert set(take.timings) >= {"backbone_s", "superres_s", "decode_s", "total_s"}
        assert all(v >= 0 for v in take.timings.values())
        parts = take.timings["backbone_s"] + take.timings["superres_s"] + take.timings["decode_s"]
        assert take.timings["total_s"] == pytest.approx(parts)
    a, b = takes[0]
    assert not np.array_equal(a.codes, b.codes)  # different seeds, different takes


@pytest.mark.slow
def test_one_shot_and_keep_loaded_give_identical_audio(renders):
    _, kept, _ = renders["keep_loaded_short"]
    _, shot, _ = renders["one_shot"]
    for a, b in zip(kept[0], shot[0], strict=True):
        assert a.seed == b.seed and a.codes.shape == (64, SHORT_TOKENS // 2)
        assert np.array_equal(a.codes, b.codes)
        assert np.array_equal(a.audio, b.audio)


@pytest.mark.slow
def test_residency_keeps_or_releases_stages(renders):
    assert renders["keep_loaded"][0].loaded() == ["backbone", "superres", "codec"]
    assert renders["one_shot"][0].loaded() == ["codec"]


@pytest.mark.slow
@pytest.mark.parametrize("residency", ["keep_loaded", "one_shot"])
def test_progress_phases_in_reference_order(renders, residency):
    _, _, events = renders[residency]
    phases = []
    for phase, *_ in events:
        if not phases or phases[-1] != phase:
            phases.append(phase)
    assert phases == ["loading_backbone", "backbone", "loading_superres", "superres",
                      "loading_decoder", "decoding"]
    if residency == "keep_loaded":
        return
    bb = [e for e in events if e[0] == "backbone"]
    assert all("tokens_per_s" in e[3] for e in bb)
    assert bb[-1][1] == bb[-1][2] == SHORT_TOKENS  # estimate capped at max_new_tokens
    assert bb[-1][3]["tokens_per_s"] > 0
    sr = [e for e in events if e[0] == "superres"]
    assert [e[1] for e in sr] == list(range(0, 63)) and all(e[2] == 62 for e in sr)
    dec = [e for e in events if e[0] == "decoding"]
    assert dec[-1][1] == dec[-1][2] >= 2


@pytest.mark.slow
def test_stages_compose_like_render(renders):
    """backbone -> superres -> decode called one by one give the render's take."""
    p, takes, _ = renders["keep_loaded"]
    req = _request(p, seeds=[SEEDS[1]], max_new_tokens=40)
    (row,) = p.backbone(req)
    q01 = row.codes
    assert q01.shape == (2, 20) and row.ended == "token_cap"
    # the same seed decodes the same first tokens whatever the cap and the batch
    assert np.array_equal(q01, takes[0][1].codes[:2, :20])
    (codes,) = p.superres(req, [q01])
    assert codes.shape == (64, 20) and np.array_equal(codes[:2], q01)
    (audio,) = p.decode([codes])
    assert audio.shape == (20 * 2048, 2)


def test_defaults_dtype_and_release(demo_model_dir):
    p = Pipeline.from_dir(demo_model_dir)
    assert p.device == torch.device("cpu") and p.dtype == torch.float32 and p.residency == "keep_loaded"
    assert p.info.demo and p.layout.audio_offset == 512 and p.codec_config.sample_rate == 44100
    assert p.loaded() == []  # weights load on first use
    p.load(["backbone"])
    assert p.loaded() == ["backbone"]
    p.release("backbone")
    assert p.loaded() == []
    with pytest.raises(ValueError):
        p.release("vocoder")
    b = Pipeline.from_dir(demo_model_dir, dtype="bfloat16", residency="one_shot")
    b.load(["backbone", "superres"])
    assert b.loaded() == ["superres"]  # one_shot: loading a stage releases the others
    assert b._models["superres"].embed.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="residency"):
        Pipeline.from_dir(demo_model_dir, residency="sometimes")


def test_from_dir_checks_tensors_before_any_render(demo_model_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(demo_model_dir, bad)
    tensors = load_file(str(bad / "superres.safetensors"))
    del tensors["layers.1.mlp.w_down.bias"]
    save_file(tensors, str(bad / "superres.safetensors"))
    with pytest.raises(md.ModelDirError) as err:
        Pipeline.from_dir(bad)
    assert "layers.1.mlp.w_down.bias" in str(err.value)
    assert str(bad / "superres.safetensors") in str(err.value)


def test_empty_requests(demo_model_dir):
    p = Pipeline.from_dir(demo_model_dir)
    assert p.render([]) == []
    assert p.render([_request(p, seeds=[])]) == [[]]
    assert p.loaded() == []
