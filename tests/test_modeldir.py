"""Model directories: round trip, hashes and fingerprint, atomic writes, and loading errors
that name the tensor and the file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from khala_cli.engine import modeldir as md
from khala_cli.engine.codec import Codec
from khala_cli.engine.config import CodecConfig, TransformerConfig
from khala_cli.engine.random_model import build_tokenizer
from khala_cli.engine.transformer import Transformer

Q, K = 4, 16  # a small token layout: 512 text ids + 4 codebooks of 16


def _tiny_parts(seed: int = 0):
    torch.manual_seed(seed)
    bb_cfg = TransformerConfig(vocab_size=512 + 2 * K, hidden_size=16, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=4, ffn_hidden_size=24)
    sr_cfg = TransformerConfig(vocab_size=512 + Q * K, hidden_size=16, num_layers=1, num_heads=2,
                               num_kv_heads=1, head_dim=8, ffn_hidden_size=32)
    codec_cfg = CodecConfig(num_codebooks=Q, codebook_size=K, latent_dim=4, n_filters=1)
    bb = {k: v.clone() for k, v in Transformer(bb_cfg).state_dict().items()}
    sr = {k: v.clone() for k, v in Transformer(sr_cfg).state_dict().items()}
    codec = Codec(codec_cfg)
    with torch.no_grad():
        codec.codebooks.normal_()
    cd = {k: v.detach().clone() for k, v in codec.state_dict().items()}
    return (bb_cfg, bb), (sr_cfg, sr), (codec_cfg, cd)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    build_tokenizer().save(str(path))
    return path


def _save(path: Path, tokenizer_file: Path, parts=None, **kw):
    bb, sr, cd = parts or _tiny_parts()
    return md.save_model_dir(path, name="tiny", backbone=bb, superres=sr, codec=cd,
                             tokenizer_src=tokenizer_file, source="test", **kw)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer_file):
    parts = _tiny_parts()
    path = tmp_path_factory.mktemp("models") / "tiny"
    info = _save(path, tokenizer_file, parts, transformer_dtype=None)
    return path, info, parts


def test_round_trip_tensors_configs_tokenizer(saved):
    path, info, ((bb_cfg, bb), (sr_cfg, sr), (codec_cfg, cd)) = saved
    assert sorted(p.name for p in path.iterdir()) == sorted([*md.REQUIRED_FILES, md.MODEL_JSON])
    assert md.read_info(path) == info
    assert info.num_quantizers == Q and info.codebook_size == K and not info.demo
    for which, cfg, sd in (("backbone", bb_cfg, bb), ("superres", sr_cfg, sr)):
        assert md.read_config(path, which) == cfg
        model = md.load_transformer(path, which, "cpu", torch.float32)
        assert isinstance(model, Transformer) and not model.training
        got = model.state_dict()
        assert set(got) == set(sd)
        for k in sd:
            assert torch.equal(got[k], sd[k]), k
    codec = md.load_codec(path)
    assert md.read_config(path, "codec") == codec_cfg
    assert torch.equal(codec.codebooks, cd["codebooks"])
    ref = Codec(codec_cfg)
    ref.load_state_dict(cd)
    codes = torch.randint(0, K, (1, Q, 9))
    torch.testing.assert_close(codec.decode(codes), ref.decode(codes), rtol=1e-5, atol=1e-6)
    lay = md.layout(path)
    assert (lay.audio_offset, lay.num_quantizers, lay.codebook_size) == (512, Q, K)
    assert md.load_tokenizer(path).token_to_id("<|end_of_text|>") == lay.end_of_song_id == 257


def test_bf16_storage_by_default(tmp_path, tokenizer_file):
    parts = _tiny_parts()
    _save(tmp_path / "m", tokenizer_file, parts)
    stored = load_file(str(tmp_path / "m" / "backbone.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in stored.values())
    assert load_file(str(tmp_path / "m" / "codec.safetensors"))["codebooks"].dtype == torch.float32
    model = md.load_transformer(tmp_path / "m", "backbone", "cpu", torch.float32)
    assert model.embed.weight.dtype == torch.float32
    assert torch.equal(model.embed.weight, parts[0][1]["embed.weight"].bfloat16().float())


def test_hashes_and_fingerprint_follow_the_files(saved):
    path, info, _ = saved
    for name, digest in info.files.items():
        assert hashlib.sha256((path / name).read_bytes()).hexdigest() == digest
    lines = "".join(f"{n}:{info.files[n]}\n" for n in sorted(info.files))
    assert info.fingerprint == hashlib.sha256(lines.encode()).hexdigest()
    assert md.MODEL_JSON not in info.files
    assert md.verify(path) == []


def test_fingerprint_changes_when_one_tensor_changes(tmp_path, tokenizer_file):
    a = _save(tmp_path / "a", tokenizer_file)
    b = _save(tmp_path / "b", tokenizer_file)
    assert a.fingerprint == b.fingerprint  # same inputs, same bytes
    parts = _tiny_parts()
    parts[1][1]["layers.0.mlp.w_up.bias"][3] += 0.5
    c = _save(tmp_path / "c", tokenizer_file, parts)
    assert c.fingerprint != a.fingerprint
    changed = {n for n in a.files if a.files[n] != c.files[n]}
    assert changed == {"superres.safetensors"}


def test_verify_reports_changed_and_missing_files(tmp_path, tokenizer_file):
    path = tmp_path / "m"
    _save(path, tokenizer_file)
    data = bytearray((path / "codec.safetensors").read_bytes())
    data[-1] ^= 1
    (path / "codec.safetensors").write_bytes(bytes(data))
    (path / "superres.json").unlink()
    problems = md.verify(path)
    assert any("codec.safetensors" in p and "sha256" in p for p in problems)
    assert any("superres.json" in p and "missing" in p for p in problems)
    assert len(problems) == 2


def _rewrite(path: Path, file: str, edit) -> None:
    tensors = load_file(str(path / file))
    edit(tensors)
    save_file(tensors, str(path / file))


@pytest.mark.parametrize(
    "file, edit, fragments",
    [
        ("backbone.safetensors", lambda t: t.pop("layers.1.attn.wk.bias"),
         ["missing tensor 'layers.1.attn.wk.bias'"]),
        ("superres.safetensors", lambda t: t.__setitem__("layers.0.attn.wq.weight", torch.zeros(8, 17)),
         ["'layers.0.attn.wq.weight' has shape [8, 17], expected [16, 16]"]),
        ("backbone.safetensors", lambda t: t.__setitem__("layers.7.attn.wq.weight", torch.zeros(2)),
         ["unexpected tensor 'layers.7.attn.wq.weight'"]),
        ("codec.safetensors", lambda t: t.pop("decoder.model.0.weight_g"),
         ["missing tensor 'decoder.model.0.weight_g'"]),
        ("codec.safetensors", lambda t: t.__setitem__("codebooks", torch.zeros(Q, K + 1, 4)),
         ["'codebooks' has shape"]),
    ],
)
def test_loading_a_bad_tensor_names_tensor_and_file(tmp_path, tokenizer_file, file, edit, fragments):
    path = tmp_path / "m"
    _save(path, tokenizer_file)
    _rewrite(path, file, edit)
    which = file.split(".")[0]
    with pytest.raises(md.ModelDirError) as err:
        if which == "codec":
            md.load_codec(path)
        else:
            md.load_transformer(path, which, "cpu", torch.float32)
    msg = str(err.value)
    assert str(path / file) in msg
    for f in fragments:
        assert f in msg
    # The header check alone (no weights read) finds the same problem.
    with pytest.raises(md.ModelDirError, match="tensor"):
        md.check_file(path, which, md.read_config(path, which))


def test_writer_refuses_a_state_dict_that_does_not_match_its_config(tmp_path):
    (bb_cfg, bb), _, _ = _tiny_parts()
    del bb["norm.weight"]
    with pytest.raises(md.ModelDirError, match="missing tensor 'norm.weight'"):
        md.write_component(tmp_path, "backbone", bb_cfg, bb)


def test_failed_save_leaves_nothing_behind(tmp_path, tokenizer_file):
    bb, sr, (codec_cfg, cd) = _tiny_parts()
    cd["codebooks"] = torch.zeros(Q, K, 5)
    with pytest.raises(md.ModelDirError, match="codebooks"):
        _save(tmp_path / "m", tokenizer_file, (bb, sr, (codec_cfg, cd)))
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_is_not_overwritten_unless_asked(tmp_path, tokenizer_file):
    path = tmp_path / "m"
    first = _save(path, tokenizer_file)
    with pytest.raises(md.ModelDirError, match="already exists"):
        _save(path, tokenizer_file)
    parts = _tiny_parts(seed=1)
    second = _save(path, tokenizer_file, parts, replace=True)
    assert second.fingerprint != first.fingerprint
    assert md.read_info(path).fingerprint == second.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_vocab_too_small_for_the_layout_is_refused(tmp_path, tokenizer_file):
    (bb_cfg, _), sr, cd = _tiny_parts()
    small = TransformerConfig(**{**bb_cfg.to_dict(), "vocab_size": 520})
    sd = {k: v.clone() for k, v in Transformer(small).state_dict().items()}
    with pytest.raises(md.ModelDirError, match="vocab_size 520"):
        _save(tmp_path / "m", tokenizer_file, ((small, sd), sr, cd))


def test_reading_never_unpickles(saved, monkeypatch):
    path, _, _ = saved

    def refuse(*a, **k):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr("pickle.load", refuse)
    monkeypatch.setattr("pickle.loads", refuse)
    md.load_transformer(path, "superres", "cpu", torch.float32)
    md.load_codec(path)
    md.load_tokenizer(path)
    assert md.verify(path) == []


def test_not_a_model_dir_and_wrong_format(tmp_path, saved):
    with pytest.raises(md.ModelDirError, match="no model.json"):
        md.read_info(tmp_path)
    path, _, _ = saved
    data = json.loads((path / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(md.ModelDirError, match="version 99"):
        md.read_info(tmp_path)
