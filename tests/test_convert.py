"""`khala convert`: tiny checkpoints in the exact Megatron / Lightning formats -> model dir.

The converted transformers are checked against a reference forward written here straight
from the Megatron tensors (fused QKV grouped per KV group, fc1 weight_w/weight_v, the double
fc1 bias); the converted codec against a DAC decoder built from the raw generator tensors.
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from megatron_fixtures import (
    CODEC,
    RunsCodeOnLoad,
    megatron_args,
    megatron_model_tensors,
    text_vocab,
    unstack,
    write_lightning_checkpoint,
    write_megatron_checkpoint,
    write_raw_download,
    write_tokenizer,
)

from khala_cli.engine import modeldir
from khala_cli.weights.convert import (
    CONVERT_ERRORS,
    ConvertError,
    convert,
    default_destination,
    parse_iteration,
)
from khala_cli.weights.megatron import MegatronError
from khala_cli.weights.safe_load import CheckpointReadError, UnsafeCheckpointError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def download(tmp_path_factory):
    root = tmp_path_factory.mktemp("download")
    raw = write_raw_download(root)
    return root, raw


@pytest.fixture(scope="module")
def converted(download, tmp_path_factory):
    root, raw = download
    dst = tmp_path_factory.mktemp("converted") / "khala-tiny"
    report = convert(root, dst)
    return dst, raw, report


def _siblings(dst: Path) -> list[str]:
    """Anything a failed conversion might have left beside its destination."""
    if not dst.parent.exists():
        return []
    return sorted(p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}"))


def same_tensors(a: Path, b: Path, stages=("backbone", "superres", "codec")) -> bool:
    """Two model directories hold identical tensors (file hashes can differ: safetensors
    writes its header metadata in no fixed order)."""
    from safetensors.torch import load_file

    for stage in stages:
        ta, tb = load_file(str(a / f"{stage}.safetensors")), load_file(str(b / f"{stage}.safetensors"))
        if ta.keys() != tb.keys() or any(not torch.equal(ta[k], tb[k]) for k in ta):
            return False
    return True


def assert_nothing_left(dst: Path) -> None:
    assert not dst.exists(), f"{dst} was left behind"
    assert _siblings(dst) == [], f"temporary directories left: {_siblings(dst)}"


# ---- an independent reference forward over the Megatron tensors -------------------------


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, base):
    # x [S, heads, d]: rotate-half RoPE, positions 0..S-1
    s, _, d = x.shape
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(s, dtype=torch.float64)[:, None] * inv[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None, :].float()
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None, :].float()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def megatron_reference_logits(tensors, args, ids, causal=True):
    """Logits of one sequence `ids` [S] computed from Megatron-named tensors (fp32)."""
    t = {k: v.float() for k, v in unstack(tensors, args.num_layers).items()}
    heads, groups, d = args.num_attention_heads, args.num_query_groups, args.kv_channels
    per = heads // groups
    eps, base = args.norm_epsilon, float(args.rotary_base)
    x = t["embedding.word_embeddings.weight"][ids]
    s = x.shape[0]
    for i in range(args.num_layers):
        p = f"decoder.layers.{i}."
        h = _rms(x, t[p + "self_attention.linear_qkv.layer_norm_weight"], eps)
        qkv = h @ t[p + "self_attention.linear_qkv.weight"].T + t[p + "self_attention.linear_qkv.bias"]
        qkv = qkv.view(s, groups, per + 2, d)
        q = qkv[:, :, :per].reshape(s, heads, d)  # head g*per + j belongs to group g
        k = qkv[:, :, per]
        v = qkv[:, :, per + 1]
        q, k = _rope(q, base), _rope(k, base)
        out = torch.empty(s, heads, d)
        for hd in range(heads):
            g = hd // per
            scores = (q[:, hd] @ k[:, g].T) / math.sqrt(d)
            if causal:
                scores = scores.masked_fill(torch.ones(s, s).triu(1).bool(), float("-inf"))
            out[:, hd] = scores.softmax(-1) @ v[:, g]
        x = x + out.reshape(s, heads * d) @ t[p + "self_attention.linear_proj.weight"].T \
            + t[p + "self_attention.linear_proj.bias"]
        h = _rms(x, t[p + "mlp.linear_fc1.layer_norm_weight"], eps)
        bw, bv = t[p + "mlp.linear_fc1.bias_w"], t[p + "mlp.linear_fc1.bias_v"]
        gate = h @ t[p + "mlp.linear_fc1.weight_w"].T + bw
        up = h @ t[p + "mlp.linear_fc1.weight_v"].T + bv
        # The trained model adds the fc1 bias a second time inside the fused SwiGLU.
        act = torch.nn.functional.silu(gate + bw) * (up + bv)
        x = x + act @ t[p + "mlp.linear_fc2.weight"].T + t[p + "mlp.linear_fc2.bias"]
    x = _rms(x, t["decoder.final_layernorm.weight"], eps)
    return x @ t["output_layer.weight"].T


@pytest.mark.parametrize("stage,dirname,causal", [
    ("backbone", "backbone", True), ("superres", "superresolution", False),
])
def test_logits_equal_megatron_reference(converted, stage, dirname, causal):
    dst, raw, _ = converted
    args, tensors = raw[dirname]["args"], raw[dirname]["tensors"]
    model = modeldir.load_transformer(dst, stage, dtype=torch.float32)
    vocab = raw[dirname]["rows"]
    assert model.config.vocab_size == vocab  # the padded rows, from the embedding's shape
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (12,), generator=g)
    want = megatron_reference_logits(tensors, args, ids, causal=causal)
    with torch.no_grad():
        got = model(ids[None], causal=causal)[0]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_single_bias_would_differ(converted):
    """Guard for the test itself: the double fc1 bias is visible in the logits."""
    dst, raw, _ = converted
    args, tensors = raw["backbone"]["args"], raw["backbone"]["tensors"]
    ids = torch.arange(10)
    want = megatron_reference_logits(tensors, args, ids)
    halved = dict(tensors)
    for i in range(args.num_layers):
        for b in ("bias_w", "bias_v"):
            halved[f"decoder.layers.{i}.mlp.linear_fc1.{b}"] = tensors[f"decoder.layers.{i}.mlp.linear_fc1.{b}"] * 0
    assert not torch.allclose(megatron_reference_logits(halved, args, ids), want, atol=1e-3)


def test_config_from_training_args(converted):
    dst, raw, report = converted
    cfg = modeldir.read_config(dst, "backbone")
    args = raw["backbone"]["args"]
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.ffn_hidden_size) == (args.hidden_size, args.num_layers, args.num_attention_heads,
                                     args.num_query_groups, args.kv_channels, args.ffn_hidden_size)
    assert cfg.norm_eps == args.norm_epsilon and cfg.rope_base == args.rotary_base
    assert cfg.double_fc1_bias is True
    assert cfg.vocab_size == raw["backbone"]["rows"]
    assert report.iterations == {"backbone": 1000, "superres": 2000}
    assert report.skipped["backbone"] > 0  # optimizer, RNG and _extra_state entries


def test_stored_dtypes_and_fingerprints(converted):
    from safetensors import safe_open

    dst, raw, report = converted
    assert modeldir.verify(dst) == []
    info = modeldir.read_info(dst)
    assert info.fingerprint == report.info.fingerprint and not info.demo
    assert (info.num_quantizers, info.codebook_size) == (CODEC.num_codebooks, CODEC.codebook_size)
    assert "backbone iter 1000" in info.source
    for stage, dtype in (("backbone", torch.bfloat16), ("superres", torch.bfloat16), ("codec", torch.float32)):
        with safe_open(str(dst / f"{stage}.safetensors"), framework="pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}
    assert (dst / "tokenizer.json").read_bytes() == raw["tokenizer"].read_bytes()


def test_tensor_values_carried_exactly(converted):
    """bf16 source tensors come through bit for bit, split as the layout says."""
    from safetensors.torch import load_file

    dst, raw, _ = converted
    args, t = raw["backbone"]["args"], raw["backbone"]["tensors"]
    ours = load_file(str(dst / "backbone.safetensors"))
    per, d = args.num_attention_heads // args.num_query_groups, args.kv_channels
    qkv = t["decoder.layers.1.self_attention.linear_qkv.weight"].view(args.num_query_groups, per + 2, d, -1)
    assert torch.equal(ours["layers.1.attn.wk.weight"], qkv[:, per].reshape(-1, args.hidden_size))
    assert torch.equal(ours["layers.1.attn.wv.weight"], qkv[:, per + 1].reshape(-1, args.hidden_size))
    assert torch.equal(ours["layers.1.attn.wq.weight"], qkv[:, :per].reshape(-1, args.hidden_size))
    assert torch.equal(ours["layers.0.mlp.w_gate.bias"], t["decoder.layers.0.mlp.linear_fc1.bias_w"])
    assert torch.equal(ours["layers.0.mlp.w_up.weight"], t["decoder.layers.0.mlp.linear_fc1.weight_v"])
    assert torch.equal(ours["output.weight"], t["output_layer.weight"])


@pytest.mark.parametrize("stacked,fused_fc1,writer", [
    (True, False, "megatron"),  # decoder.layers.<name> [layers, ...], one chunk per layer
    (True, True, "megatron"),  # ... and linear_fc1.weight as [gate; up] chunks
    (False, True, "megatron"),
    (False, False, "flat"),  # whole tensors saved by torch DCP alone
])
def test_other_layouts_convert_to_the_same_model(converted, tmp_path, stacked, fused_fc1, writer):
    _, _, report = converted
    root = tmp_path / "dl"
    write_raw_download(root, stacked=stacked, fused_fc1=fused_fc1, writer=writer)  # same seed
    rep = convert(root, tmp_path / "out")
    assert same_tensors(rep.model_dir, report.model_dir)


# ---- the codec ----------------------------------------------------------------------------


def test_codec_decodes_like_the_raw_decoder(converted):
    from dac.model.dac import Decoder

    dst, raw, _ = converted
    gen = raw["generator"]
    cfg = modeldir.read_config(dst, "codec")
    assert cfg.latent_dim == CODEC.latent_dim and cfg.rates == CODEC.rates
    assert cfg.n_filters == CODEC.n_filters and cfg.channels == CODEC.channels
    # Reference: the dac Decoder as the reference builds it, from the unconverted tensors.
    ref = Decoder(CODEC.latent_dim, CODEC.n_filters * 2 ** len(CODEC.rates), list(CODEC.rates),
                  d_out=CODEC.channels)
    ref.model = torch.nn.Sequential(*list(ref.model)[:-1])  # the reference has no final Tanh
    ref.load_state_dict({k[len("decoder."):]: v for k, v in gen.items() if k.startswith("decoder.")})
    ref.eval()
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, CODEC.codebook_size, (2, CODEC.num_codebooks, 20), generator=g)
    z = sum(gen[f"quantizer.vq_layer_{i}._codebook.embed"][codes[:, i]] for i in range(CODEC.num_codebooks))
    with torch.no_grad():
        want = ref(z.transpose(1, 2))
    codec = modeldir.load_codec(dst)
    got = codec.decode(codes)
    assert got.shape == want.shape == (2, CODEC.channels, 20 * CODEC.hop_length)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


# ---- end to end ---------------------------------------------------------------------------


def test_render_with_converted_model(converted):
    import numpy as np

    from khala_cli.engine.pipeline import Pipeline, Request
    from khala_cli.prompt import PromptSpec, prompt_ids

    dst, _, _ = converted
    pipe = Pipeline.from_dir(dst, device="cpu")
    bb, sr = prompt_ids(pipe.tokenizer, PromptSpec(tags=("Pop", "Rock"), lyrics="la la", duration=1))
    takes = pipe.render([Request(backbone_ids=bb, superres_ids=sr, seeds=[1, 2], max_new_tokens=24)])
    assert len(takes) == 1 and [t.seed for t in takes[0]] == [1, 2]
    for take in takes[0]:
        assert take.codes.shape[0] == CODEC.num_codebooks
        assert take.audio.ndim == 2 and take.audio.shape[1] == CODEC.channels
        assert take.audio.shape[0] == take.codes.shape[1] * CODEC.hop_length
        assert np.isfinite(take.audio).all()


@pytest.mark.slow
def test_khala_render_cli_with_converted_model(converted, tmp_path):
    dst, _, _ = converted
    manifest = tmp_path / "jobs.yaml"
    manifest.write_text(
        f"model: {dst}\n"
        "output_dir: out\n"
        "defaults:\n  duration: 1\n  max_minutes: 0.05\n"
        "jobs:\n  - id: tiny\n    tags: [Pop]\n    lyrics: la la\n    seeds: [1]\n"
    )
    proc = subprocess.run([sys.executable, "-m", "khala_cli", "render", str(manifest), "--devices", "cpu"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the take was rendered by the converted model, and its audio reads back whole
    import json
    import math

    import soundfile as sf

    side = json.loads((tmp_path / "out" / "tiny" / "tiny-s1.json").read_text())
    info = json.loads((dst / "model.json").read_text())
    assert side["model"]["fingerprint"] == info["fingerprint"]
    audio, sr = sf.read(str(tmp_path / "out" / "tiny" / "tiny-s1.wav"), always_2d=True)
    frames = side["tokens"]["backbone"] // 2
    codec = json.loads((dst / "codec.json").read_text())
    hop = math.prod(codec["rates"])
    assert audio.shape == (frames * hop, codec["channels"]) and frames > 0
    assert sr == codec["sample_rate"]


@pytest.mark.slow
def test_render_on_raw_download_names_the_command_then_converts(tmp_path):
    root = tmp_path / "dl"
    write_raw_download(root)
    manifest = tmp_path / "jobs.yaml"
    manifest.write_text(
        "model: dl\n"
        "output_dir: out\n"
        "defaults:\n  duration: 1\n  max_minutes: 0.05\n"
        "jobs:\n  - id: tiny\n    tags: [Pop]\n    lyrics: la la\n    seeds: [1]\n"
    )
    cmd = [sys.executable, "-m", "khala_cli", "render", str(manifest), "--devices", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert f"khala convert {root.resolve()} {tmp_path.resolve() / 'dl-khala'}" in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "dl-khala").exists()

    proc = subprocess.run(cmd + ["--convert"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "dl-khala" / "model.json").exists()
    assert f"converting the download {root.resolve()} once" in proc.stderr
    assert len(list((tmp_path / "out").rglob("*.wav"))) == 1


# ---- failures: clear messages, nothing left behind ---------------------------------------


def _fresh(tmp_path, **kw) -> tuple[Path, dict]:
    root = tmp_path / "dl"
    raw = write_raw_download(root, **kw)
    return root, raw


def _shard(root: Path, stage: str = "backbone") -> Path:
    shards = sorted((root / "checkpoints" / stage).glob("iter_*/*.distcp"))
    assert shards
    return shards[0]


def test_truncated_shard(tmp_path):
    from khala_cli.weights.safe_load import safe_dcp_metadata

    root, _ = _fresh(tmp_path)
    shard = _shard(root, "superresolution")
    md = safe_dcp_metadata(shard.parent / ".metadata")
    # Cut the file in the middle of the model tensor stored last in it.
    last = max((info for index, info in md.storage_data.items()
                if not index.fqn.startswith(("optimizer", "rng")) and "_extra_state" not in index.fqn),
               key=lambda info: info.offset)
    with open(shard, "r+b") as f:
        f.truncate(last.offset + last.length // 2)
    dst = tmp_path / "model"
    with pytest.raises(CheckpointReadError) as e:
        convert(root, dst)
    msg = str(e.value)
    assert shard.name in msg and "truncated" in msg and "download" in msg
    assert_nothing_left(dst)


def test_truncated_decoder_checkpoint(tmp_path):
    root, _ = _fresh(tmp_path)
    ck = root / "checkpoints" / "dac_rvq_2490000.ckpt"
    data = ck.read_bytes()
    ck.write_bytes(data[: len(data) // 2])
    dst = tmp_path / "model"
    with pytest.raises(CheckpointReadError, match="dac_rvq_2490000.ckpt"):
        convert(root, dst)
    assert_nothing_left(dst)


def _rewrite_megatron(root: Path, stage: str, edit, stacked=False, **kw) -> None:
    """Rewrite one Megatron checkpoint of a download with edited model tensors."""
    d = root / "checkpoints" / stage
    shutil.rmtree(d)
    vocab = text_vocab(root / "models" / "Tokenizer" / "tokenizer.json") + 2 * CODEC.codebook_size
    args = megatron_args(vocab, **kw.pop("args", {}))
    tensors = megatron_model_tensors(args, vocab + 5, stacked=stacked)
    edit(tensors)
    write_megatron_checkpoint(d, args, tensors, **kw)


def test_missing_tensor(tmp_path):
    root, _ = _fresh(tmp_path)
    _rewrite_megatron(root, "backbone", lambda t: t.pop("decoder.layers.1.mlp.linear_fc2.bias"))
    dst = tmp_path / "model"
    with pytest.raises(MegatronError) as e:
        convert(root, dst)
    assert "layers.1.mlp.w_down.bias" in str(e.value)
    assert "decoder.layers.1.mlp.linear_fc2.bias" in str(e.value)
    assert_nothing_left(dst)


def test_wrong_shape(tmp_path):
    root, _ = _fresh(tmp_path)

    def edit(t):
        w = t["decoder.layers.0.self_attention.linear_qkv.weight"]
        t["decoder.layers.0.self_attention.linear_qkv.weight"] = w[:-8]

    _rewrite_megatron(root, "backbone", edit)
    dst = tmp_path / "model"
    with pytest.raises(MegatronError) as e:
        convert(root, dst)
    msg = str(e.value)
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in msg
    assert "[56, 32]" in msg and "[64, 32]" in msg
    assert_nothing_left(dst)


def test_unmapped_tensor(tmp_path):
    root, _ = _fresh(tmp_path)

    def edit(t):
        t["decoder.layers.0.self_attention.q_layernorm.weight"] = torch.ones(8, dtype=torch.bfloat16)

    _rewrite_megatron(root, "backbone", edit)
    dst = tmp_path / "model"
    with pytest.raises(MegatronError, match=r"decoder\.layers\.0\.self_attention\.q_layernorm\.weight"):
        convert(root, dst)
    assert_nothing_left(dst)


def test_unsupported_architecture(tmp_path):
    root, _ = _fresh(tmp_path)
    _rewrite_megatron(root, "backbone", lambda t: None, args={"swiglu": False, "normalization": "LayerNorm",
                                                              "apply_layernorm_1p": True})
    dst = tmp_path / "model"
    with pytest.raises(MegatronError) as e:
        convert(root, dst)
    assert "swiglu" in str(e.value) and "normalization" in str(e.value)
    assert "apply_layernorm_1p" in str(e.value)
    assert_nothing_left(dst)


def test_object_outside_allow_list_in_common_pt(tmp_path):
    root, _ = _fresh(tmp_path)
    marker = tmp_path / "ran"
    _rewrite_megatron(root, "backbone", lambda t: None,
                      args={"logger_hook": RunsCodeOnLoad(marker)})
    dst = tmp_path / "model"
    with pytest.raises(UnsafeCheckpointError) as e:
        convert(root, dst)
    msg = str(e.value)
    assert "common.pt" in msg and "--trust-checkpoint" in msg and "_touch_marker" in msg
    assert not marker.exists(), "the pickled code ran"
    assert_nothing_left(dst)
    # Trusting the checkpoint loads it (and so runs its code): the user's explicit choice.
    convert(root, dst, trust=True)
    assert marker.exists() and (dst / "model.json").is_file()


def test_object_outside_allow_list_in_dcp_metadata(tmp_path):
    root, _ = _fresh(tmp_path)
    marker = tmp_path / "ran"
    meta = sorted((root / "checkpoints" / "backbone").glob("iter_*/.metadata"))[0]
    with open(meta, "rb") as f:
        md = pickle.load(f)
    md.planner_data = {"hook": RunsCodeOnLoad(marker)}
    with open(meta, "wb") as f:
        pickle.dump(md, f)
    dst = tmp_path / "model"
    with pytest.raises(UnsafeCheckpointError, match="--trust-checkpoint") as e:
        convert(root, dst)
    assert ".metadata" in str(e.value)
    assert not marker.exists()
    assert_nothing_left(dst)


def test_object_outside_allow_list_in_decoder_checkpoint(tmp_path):
    root, raw = _fresh(tmp_path)
    marker = tmp_path / "ran"
    write_lightning_checkpoint(root / "checkpoints" / "dac_rvq_2490000.ckpt", raw["generator"],
                               extra={"callbacks": {"Hook": RunsCodeOnLoad(marker)}})
    dst = tmp_path / "model"
    with pytest.raises(UnsafeCheckpointError, match="--trust-checkpoint"):
        convert(root, dst)
    assert not marker.exists()
    assert_nothing_left(dst)


def test_missing_codebook(tmp_path):
    root, raw = _fresh(tmp_path)
    gen = dict(raw["generator"])
    del gen["quantizer.vq_layer_2._codebook.embed"]
    write_lightning_checkpoint(root / "checkpoints" / "dac_rvq_2490000.ckpt", gen)
    dst = tmp_path / "model"
    with pytest.raises(ConvertError, match=r"vq_layer_2\._codebook\.embed"):
        convert(root, dst)
    assert_nothing_left(dst)


def test_unmapped_decoder_tensor(tmp_path):
    root, raw = _fresh(tmp_path)
    gen = dict(raw["generator"], **{"post_filter.weight": torch.ones(3)})
    write_lightning_checkpoint(root / "checkpoints" / "dac_rvq_2490000.ckpt", gen)
    dst = tmp_path / "model"
    with pytest.raises(ConvertError, match=r"generator\.post_filter\.weight"):
        convert(root, dst)
    assert_nothing_left(dst)


def test_optimizer_state_is_never_read(tmp_path):
    """Scramble every byte of optimizer / RNG / _extra_state entries: conversion still works."""
    from khala_cli.weights.safe_load import safe_dcp_metadata

    root, _ = _fresh(tmp_path)
    dst_ok = tmp_path / "clean"
    convert(root, dst_ok)
    for stage in ("backbone", "superresolution"):
        it = sorted((root / "checkpoints" / stage).glob("iter_*"))[0]
        md = safe_dcp_metadata(it / ".metadata")
        scrambled = 0
        for index, info in md.storage_data.items():
            if index.fqn.startswith(("optimizer", "rng_state")) or "_extra_state" in index.fqn:
                with open(it / info.relative_path, "r+b") as f:
                    f.seek(info.offset)
                    f.write(b"\xff" * info.length)
                scrambled += 1
        assert scrambled > 10
    dst = tmp_path / "model"
    convert(root, dst)
    assert same_tensors(dst, dst_ok)


def test_iteration_choice(tmp_path):
    root, _ = _fresh(tmp_path)
    bb = root / "checkpoints" / "backbone"
    # A later iteration with different weights becomes the latest.
    vocab = text_vocab(root / "models" / "Tokenizer" / "tokenizer.json") + 2 * CODEC.codebook_size
    args = megatron_args(vocab)
    write_megatron_checkpoint(bb, args, megatron_model_tensors(args, vocab + 5, seed=77), iteration=1500)
    latest = convert(root, tmp_path / "a")
    assert latest.iterations["backbone"] == 1500
    older = convert(root, tmp_path / "b", iteration="backbone=1000")
    assert older.iterations == {"backbone": 1000, "superres": 2000}
    assert not same_tensors(latest.model_dir, older.model_dir, ["backbone"])
    assert same_tensors(latest.model_dir, older.model_dir, ["superres", "codec"])
    with pytest.raises(MegatronError, match="iter_0001500"):  # lists what is available
        convert(root, tmp_path / "c", iteration=999)
    assert_nothing_left(tmp_path / "c")


def test_parse_iteration():
    assert parse_iteration(None) == {}
    assert parse_iteration("12") == {"backbone": 12, "superres": 12}
    assert parse_iteration("superresolution=3") == {"superres": 3}
    with pytest.raises(ConvertError):
        parse_iteration("decoder=3")


def test_existing_destination_untouched(converted, download):
    root, _ = download
    dst, _, _ = converted
    before = sorted(p.name for p in dst.iterdir())
    with pytest.raises(ConvertError, match="already exists"):
        convert(root, dst)
    assert sorted(p.name for p in dst.iterdir()) == before
    assert modeldir.verify(dst) == []


def test_not_a_download(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match="backbone"):
        convert(tmp_path / "empty", tmp_path / "x")


def test_tokenizer_option_and_default_destination(tmp_path):
    root, _ = _fresh(tmp_path)
    moved = tmp_path / "elsewhere" / "tokenizer.json"
    moved.parent.mkdir()
    shutil.move(root / "models" / "Tokenizer" / "tokenizer.json", moved)
    with pytest.raises(ConvertError, match="--tokenizer"):
        convert(root)
    report = convert(root, tokenizer=moved.parent)
    assert report.model_dir == default_destination(root) == tmp_path / "dl-khala"
    assert (report.model_dir / "tokenizer.json").read_bytes() == moved.read_bytes()


def test_tokenizer_too_large_for_the_vocabulary(tmp_path):
    root, _ = _fresh(tmp_path)
    write_tokenizer(root / "models" / "Tokenizer" / "tokenizer.json", reserved=40)
    dst = tmp_path / "model"
    with pytest.raises(CONVERT_ERRORS, match="vocab_size"):
        convert(root, dst)
    assert_nothing_left(dst)


# ---- the command line ---------------------------------------------------------------------


def _cli():
    from khala_cli.cli import _register, cli

    _register()
    return cli


def test_cli_convert(download, tmp_path):
    root, _ = download
    result = CliRunner().invoke(_cli(), ["convert", str(root), str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "m") in result.output
    assert modeldir.verify(tmp_path / "m") == []


def test_cli_convert_error_exit_code(tmp_path):
    root, _ = _fresh(tmp_path)
    _rewrite_megatron(root, "backbone", lambda t: t.pop("output_layer.weight"))
    result = CliRunner().invoke(_cli(), ["convert", str(root), str(tmp_path / "m")])
    assert result.exit_code == 3
    assert "output_layer.weight" in result.output
    assert_nothing_left(tmp_path / "m")


@pytest.mark.slow
def test_module_entry_point(download, tmp_path):
    root, _ = download
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "khala_cli.weights.convert", str(root),
                           str(tmp_path / "m"), "--quiet"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert modeldir.verify(tmp_path / "m") == []


# VmHWM (this process's own high-water RSS), not ru_maxrss: on Linux a child's ru_maxrss
# starts at its parent's peak, which would measure pytest.
_MEASURE = """
import json, sys
import psutil, torch  # noqa: F401  (the baseline holds torch and megatron-core imported)
from khala_cli.weights.convert import convert
from khala_cli.weights.megatron import import_dist_checkpointing
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
import_dist_checkpointing()
base = psutil.Process().memory_info().rss
before = hwm()
convert(sys.argv[1], sys.argv[2])
print(json.dumps({"base": base, "peak": hwm(), "hwm_before": before}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_peak_memory_stays_under_twice_the_largest_model(tmp_path):
    """A ~80 MB-per-transformer checkpoint with ~4x that in optimizer state: converting it
    grows the process by less than twice the largest converted model."""
    import json

    arch = dict(hidden_size=512, num_layers=8, num_attention_heads=8, num_query_groups=4,
                kv_channels=64, ffn_hidden_size=1408)
    root = tmp_path / "dl"
    write_raw_download(root, vocab_padding=16000, backbone_args=arch, superres_args=arch)
    dst = tmp_path / "model"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(root), str(dst)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    largest = max((dst / f"{s}.safetensors").stat().st_size for s in ("backbone", "superres"))
    optimizer = sum(p.stat().st_size for p in (root / "checkpoints").rglob("*.distcp"))
    assert optimizer > 6 * largest  # the checkpoints are mostly optimizer state
    assert m["peak"] - m["base"] < 2 * largest, (m, largest)


def test_disk_full_while_writing(download, tmp_path, monkeypatch):
    root, _ = download
    from khala_cli.engine import modeldir as md

    real = md.write_component

    def full(directory, name, *a, **kw):
        if name == "superres":
            raise OSError(28, "No space left on device", str(Path(directory) / "superres.safetensors.tmp"))
        return real(directory, name, *a, **kw)

    monkeypatch.setattr(md, "write_component", full)
    dst = tmp_path / "model"
    with pytest.raises(ConvertError, match="No space left"):
        convert(root, dst)
    assert_nothing_left(dst)


def test_without_megatron_core(download, tmp_path, monkeypatch):
    root, _ = download
    monkeypatch.setitem(sys.modules, "megatron.core", None)
    dst = tmp_path / "model"
    with pytest.raises(MegatronError, match=r"khala-cli\[convert\]"):
        convert(root, dst)
    assert_nothing_left(dst)
