"""`khala convert` on the Khala-mac download: the same weights as the Megatron download,
already as safetensors. One random model is written in both layouts (the Khala-mac one with
Khala-mac's own names and file contents); both conversions must give the same model
directory, and renders from either must be identical."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from khala_mac_fixtures import (
    FILES,
    HookedState,
    khala_mac_tensors,
    write_khala_mac_checkout,
    write_khala_mac_download,
)
from megatron_fixtures import write_raw_download
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from khala_cli.engine import modeldir
from khala_cli.weights import convert as convert_module
from khala_cli.weights import doctor, khala_mac
from khala_cli.weights.convert import ConvertError, convert
from khala_cli.weights.khala_mac import KhalaMacError
from khala_cli.weights.megatron import MegatronError
from khala_cli.weights.resolve import ModelError, resolve_model
from khala_cli.weights.safe_load import CheckpointReadError, UnsafeCheckpointError

STAGES = ("backbone", "superres", "codec")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(megatron model dir, khala-mac model dir, the khala-mac folder, raw tensors)."""
    root = tmp_path_factory.mktemp("both")
    raw = write_raw_download(root / "official")
    mac = write_khala_mac_checkout(root / "Khala-mac", raw)
    a = convert(root / "official", root / "from-megatron").model_dir
    b = convert(mac, root / "from-khala-mac").model_dir
    return a, b, mac, raw


def _copy(mac: Path, tmp_path: Path) -> Path:
    """A private copy of the six files (beside a tokenizer, as in a checkout)."""
    root = tmp_path / "Khala-mac"
    shutil.copytree(mac.parent / "models", root / "models")
    shutil.copytree(mac, root / "_cuda_artifacts")
    return root / "_cuda_artifacts"


def assert_nothing_left(dst: Path) -> None:
    assert not dst.exists(), f"{dst} was left behind"
    left = [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}")]
    assert left == [], f"temporary directories left: {left}"


def _tensors(path: Path) -> dict[str, tuple]:
    """name -> (dtype, shape, raw bytes) of every tensor in a safetensors file."""
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k).contiguous()
            out[k] = (t.dtype, tuple(t.shape), t.view(torch.uint8).numpy().tobytes())
    return out


# ---- the acceptance test: equality -----------------------------------------------------


@pytest.mark.parametrize("stage", STAGES)
def test_both_downloads_give_equal_tensors(pair, stage):
    a, b, _, _ = pair
    ta, tb = _tensors(a / f"{stage}.safetensors"), _tensors(b / f"{stage}.safetensors")
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k][:2] == tb[k][:2], k  # dtype and shape
        assert ta[k][2] == tb[k][2], f"{k}: bits differ"
    assert (a / f"{stage}.json").read_text() == (b / f"{stage}.json").read_text()


def test_both_downloads_give_the_same_fingerprint(pair):
    a, b, mac, _ = pair
    ia, ib = modeldir.read_info(a), modeldir.read_info(b)
    assert ia.files == ib.files and ia.fingerprint == ib.fingerprint
    assert modeldir.verify(b) == []
    assert "Khala-mac" in ib.source and str(mac) in ib.source
    assert modeldir.read_config(b, "backbone").norm_eps == 1e-6  # from the args, not a default


def test_vocab_from_embedding_rows_not_vocab_size(pair):
    _, b, mac, raw = pair
    args = json.loads((mac / "backbone_megatron_args.json").read_text())
    rows = raw["backbone"]["rows"]
    assert args["vocab_size"] < rows  # the fixture pads the vocabulary
    assert modeldir.read_config(b, "backbone").vocab_size == rows


def test_renders_from_either_are_identical(pair):
    from khala_cli.engine.pipeline import Pipeline, Request
    from khala_cli.outputs import wav_bytes
    from khala_cli.prompt import PromptSpec, prompt_ids

    renders = []
    for model in pair[:2]:
        pipe = Pipeline.from_dir(model, device="cpu")
        bb, sr = prompt_ids(pipe.tokenizer, PromptSpec(tags=("Pop",), lyrics="la la", duration=1))
        takes = pipe.render([Request(backbone_ids=bb, superres_ids=sr, seeds=[3, 4],
                                     max_new_tokens=24)])[0]
        rate = modeldir.read_config(model, "codec").sample_rate
        renders.append([(np.asarray(t.codes), wav_bytes(t.audio, rate)) for t in takes])
    (a0, a1), (b0, b1) = renders
    assert a0[0].shape[1] > 0 and len(a0[1]) > 44
    for (codes_a, wav_a), (codes_b, wav_b) in ((a0, b0), (a1, b1)):
        assert np.array_equal(codes_a, codes_b)
        assert wav_a == wav_b
    assert not np.array_equal(a0[0], a1[0])  # the seeds differ, so a mix-up would show


def test_no_megatron_core_needed(pair, tmp_path, monkeypatch):
    _, b, mac, _ = pair
    monkeypatch.setitem(sys.modules, "megatron", None)
    monkeypatch.setitem(sys.modules, "megatron.core", None)
    report = convert(mac, tmp_path / "m")
    assert report.info.fingerprint == modeldir.read_info(b).fingerprint


def test_checkout_root_and_cli(pair, tmp_path):
    """`khala convert` on the Khala-mac checkout itself finds _cuda_artifacts/ and the
    checkout's tokenizer."""
    from khala_cli.cli import _register, cli

    _, b, mac, _ = pair
    _register()
    result = CliRunner().invoke(cli, ["convert", str(mac.parent), str(tmp_path / "m"), "-q"])
    assert result.exit_code == 0, result.output
    assert "Khala-mac download" in result.output
    assert modeldir.read_info(tmp_path / "m").fingerprint == modeldir.read_info(b).fingerprint


# ---- recognising the layout: render --convert, doctor -----------------------------------


def test_render_names_the_command_then_converts(pair, tmp_path):
    _, b, mac, _ = pair
    src = _copy(mac, tmp_path)
    with pytest.raises(ModelError) as e:
        resolve_model(str(src), tmp_path)
    dst = tmp_path / "Khala-mac" / "_cuda_artifacts-khala"
    assert "Khala-mac download" in str(e.value) and f"khala convert {src} {dst}" in str(e.value)
    assert not dst.exists()
    heard = []
    path, info = resolve_model(str(src), tmp_path, convert=True, announce=heard.append)
    assert path == dst and info.fingerprint == modeldir.read_info(b).fingerprint
    assert heard and "converting the download" in heard[0]


def test_doctor_recognises_the_download(pair, tmp_path):
    _, _, mac, _ = pair
    [finding] = doctor.check_model(mac, {})
    assert finding.level == doctor.ERROR and "Khala-mac download" in finding.message
    assert f"khala convert {mac} {mac.parent / '_cuda_artifacts-khala'}" in finding.fix


def test_disk_estimate_counts_the_safetensors(pair, tmp_path, monkeypatch):
    _, _, mac, _ = pair
    weights = sum((mac / f).stat().st_size for f in FILES if f.endswith(".safetensors"))
    real = shutil.disk_usage
    monkeypatch.setattr(convert_module.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=weights - 1))
    dst = tmp_path / "m"
    with pytest.raises(ConvertError, match="GB free, the model directory needs about"):
        convert(mac, dst)
    assert_nothing_left(dst)


# ---- bad input: a clear message naming the file, nothing half-written ---------------------


@pytest.mark.parametrize("name", FILES)
def test_one_file_missing(pair, tmp_path, name):
    src = _copy(pair[2], tmp_path)
    (src / name).unlink()
    dst = tmp_path / "m"
    with pytest.raises(KhalaMacError) as e:
        convert(src, dst)
    assert f"{name} is missing" in str(e.value) and str(src) in str(e.value)
    assert_nothing_left(dst)


def _edit_weights(src: Path, edit, stage: str = "backbone") -> Path:
    path = src / f"khala_{stage}.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    return path


def _fails(src: Path, tmp_path: Path, error=KhalaMacError) -> str:
    dst = tmp_path / "m"
    with pytest.raises(error) as e:
        convert(src, dst)
    assert_nothing_left(dst)
    return str(e.value)


def test_tensor_missing(pair, tmp_path):
    src = _copy(pair[2], tmp_path)
    path = _edit_weights(src, lambda t: t.pop("layers.1.mlp.down_proj.bias"))
    msg = _fails(src, tmp_path)
    assert str(path) in msg and "missing tensor layers.1.mlp.down_proj.bias" in msg


def test_tensor_extra(pair, tmp_path):
    src = _copy(pair[2], tmp_path)

    def edit(t):
        t["layers.0.attn.q_norm.weight"] = torch.ones(8, dtype=torch.bfloat16)
        t["layers.2.input_norm.weight"] = torch.ones(32, dtype=torch.bfloat16)

    path = _edit_weights(src, edit, "superres")
    msg = _fails(src, tmp_path)
    assert str(path) in msg
    assert "unexpected tensor layers.0.attn.q_norm.weight" in msg
    assert "unexpected tensor layers.2.input_norm.weight" in msg and "num_layers is 2" in msg


def test_tensor_of_wrong_shape(pair, tmp_path):
    src = _copy(pair[2], tmp_path)

    def edit(t):
        t["layers.0.attn.k_proj.weight"] = t["layers.0.attn.k_proj.weight"][:-8].clone()

    _edit_weights(src, edit)
    msg = _fails(src, tmp_path)
    assert "layers.0.attn.k_proj.weight has shape [8, 32], expected [16, 32]" in msg
    assert "backbone_megatron_args.json" in msg


@pytest.mark.parametrize("fused", ["khala-mac-like", "megatron-names"])
def test_fused_qkv(pair, tmp_path, fused):
    src = _copy(pair[2], tmp_path)
    raw = pair[3]["backbone"]
    if fused == "megatron-names":  # a gathered file that was never converted
        save_file(raw["tensors"], str(src / "khala_backbone.safetensors"))
    else:
        def edit(t):
            for i in range(2):
                for kind in ("weight", "bias"):
                    p = f"layers.{i}.attn."
                    t[f"{p}qkv_proj.{kind}"] = torch.cat(
                        [t.pop(f"{p}{x}_proj.{kind}") for x in "qkv"]).contiguous()

        _edit_weights(src, edit)
    msg = _fails(src, tmp_path)
    assert "khala_backbone.safetensors" in msg and "fused QKV" in msg
    assert "q_proj, attn.k_proj and attn.v_proj split" in msg
    assert ("Megatron names" in msg) == (fused == "megatron-names")


@pytest.mark.parametrize("key", ["norm_epsilon", "num_query_groups", "padded_vocab_size"])
def test_args_key_missing(pair, tmp_path, key):
    src = _copy(pair[2], tmp_path)
    path = src / "superres_megatron_args.json"
    args = json.loads(path.read_text())
    del args[key]
    path.write_text(json.dumps(args))
    msg = _fails(src, tmp_path)
    assert str(path) in msg and f"{key} is missing" in msg and "no defaults" in msg


def test_args_value_of_wrong_type_and_both_lengths_missing(pair, tmp_path):
    src = _copy(pair[2], tmp_path)
    path = src / "backbone_megatron_args.json"
    args = json.loads(path.read_text())
    args["swiglu"] = "True"
    del args["seq_length"], args["max_position_embeddings"]
    path.write_text(json.dumps(args))
    msg = _fails(src, tmp_path)
    assert "swiglu = 'True', expected true or false" in msg
    assert "seq_length or max_position_embeddings is missing" in msg


def test_unsupported_architecture_in_args(pair, tmp_path):
    src = _copy(pair[2], tmp_path)
    path = src / "backbone_megatron_args.json"
    args = json.loads(path.read_text())
    args.update(normalization="LayerNorm", add_bias_linear=False)
    path.write_text(json.dumps(args))
    msg = _fails(src, tmp_path, MegatronError)
    assert str(path) in msg and "normalization" in msg and "add_bias_linear" in msg


def test_args_files_swapped(pair, tmp_path):
    src = _copy(pair[2], tmp_path)
    bb, sr = src / "backbone_megatron_args.json", src / "superres_megatron_args.json"
    text = bb.read_text()
    bb.write_text(sr.read_text())
    sr.write_text(text)
    msg = _fails(src, tmp_path)
    assert "padded_vocab_size" in msg and "swapped" in msg


def test_args_as_khala_mac_writes_them(pair, tmp_path):
    """Values JSON cannot hold are repr strings; an enum-valued arg may be one too."""
    src = _copy(pair[2], tmp_path)
    path = src / "backbone_megatron_args.json"
    args = json.loads(path.read_text())
    assert args["params_dtype"] == "torch.bfloat16" and args["model_type"].startswith("<ModelType.")
    args["position_embedding_type"] = "<PositionEmbeddingType.rope: 'rope'>"
    path.write_text(json.dumps(args))
    assert khala_mac.read_args(path)["position_embedding_type"] == "rope"
    args["position_embedding_type"] = "<PositionEmbeddingType.learned_absolute: 'learned_absolute'>"
    path.write_text(json.dumps(args))
    msg = _fails(src, tmp_path, MegatronError)
    assert "position_embedding_type" in msg and "learned_absolute" in msg


def test_args_not_json(pair, tmp_path):
    src = _copy(pair[2], tmp_path)
    (src / "backbone_megatron_args.json").write_text('{"hidden_size": 32,\n  oops}')
    msg = _fails(src, tmp_path)
    assert "backbone_megatron_args.json: not valid JSON (line 2" in msg


def test_truncated_safetensors(pair, tmp_path):
    src = _copy(pair[2], tmp_path)
    path = src / "khala_superres.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    msg = _fails(src, tmp_path, CheckpointReadError)
    assert str(path) in msg and "download it again" in msg


def test_decoder_needs_a_class_outside_the_allow_list(pair, tmp_path):
    src = _copy(pair[2], tmp_path)
    marker = tmp_path / "ran"
    torch.save(HookedState(marker, pair[3]["generator"]), src / "decoder_weights.pt")
    msg = _fails(src, tmp_path, UnsafeCheckpointError)
    assert "decoder_weights.pt" in msg and "_hooked_state" in msg and "--trust-checkpoint" in msg
    assert not marker.exists(), "the pickled code ran"
    # Trusting the file loads it (and so runs its code): the user's explicit choice.
    report = convert(src, tmp_path / "m", trust=True)
    assert marker.exists() and modeldir.verify(report.model_dir) == []


def test_decoder_not_a_state_dict(pair, tmp_path):
    src = _copy(pair[2], tmp_path)
    torch.save({"state_dict": dict(pair[3]["generator"]), "epoch": 3}, src / "decoder_weights.pt")
    msg = _fails(src, tmp_path)
    assert "decoder_weights.pt" in msg and "'state_dict'" in msg and "not a tensor" in msg


def test_decoder_tensor_missing(pair, tmp_path):
    src = _copy(pair[2], tmp_path)
    gen = dict(pair[3]["generator"])
    del gen["quantizer.vq_layer_1._codebook.embed"]
    torch.save(gen, src / "decoder_weights.pt")
    msg = _fails(src, tmp_path, ConvertError)
    assert "decoder_weights.pt" in msg and "quantizer.vq_layer_1._codebook.embed" in msg
    assert "generator." not in msg  # named as the file names it


def test_decoder_config_disagrees_with_the_tensors(pair, tmp_path):
    src = _copy(pair[2], tmp_path)
    path = src / "decoder_config.yaml"
    text = path.read_text().replace("  rates: [2, 2]", "  rates: [8, 8, 8, 4]")
    text = text.replace("  d_latent: 8\n\ndecoder", "  d_latent: 128\n\ndecoder")
    path.write_text(text)
    msg = _fails(src, tmp_path)
    assert str(path) in msg
    assert "decoder.rates is [8, 8, 8, 4], but decoder_weights.pt holds [2, 2]" in msg
    # quantizer.dim is ${encoder.d_latent}: read through the interpolation
    assert "quantizer.dim is 128, but decoder_weights.pt holds 8" in msg


def test_mixed_folder(pair, tmp_path):
    root = tmp_path / "both"
    raw = write_raw_download(root)
    write_khala_mac_download(root, raw)
    msg = _fails(root, tmp_path, ConvertError)
    assert "holds both downloads" in msg and str(root / "checkpoints") in msg
    assert "khala_backbone.safetensors" in msg
    with pytest.raises(ModelError, match="holds both downloads"):
        resolve_model(str(root), tmp_path, convert=True)
    assert not (tmp_path / "both-khala").exists()
    [finding] = doctor.check_model(root, {})
    assert finding.level == doctor.ERROR and "holds both downloads" in finding.message


def test_no_tokenizer_in_the_download(pair, tmp_path):
    _, b, mac, raw = pair
    src = tmp_path / "alone"
    shutil.copytree(mac, src)
    msg = _fails(src, tmp_path, ConvertError)
    assert "the Khala-mac download holds no tokenizer" in msg and "--tokenizer" in msg
    report = convert(src, tmp_path / "m", tokenizer=raw["tokenizer"].parent)
    assert report.info.fingerprint == modeldir.read_info(b).fingerprint


def test_iteration_is_refused(pair, tmp_path):
    with pytest.raises(ConvertError, match="leave --iteration out"):
        convert(pair[2], tmp_path / "m", iteration=1000)
    assert_nothing_left(tmp_path / "m")


def test_khala_mac_names_cover_every_tensor(pair):
    """Guard for the fixture: their names for all of our tensors, one to one."""
    _, b, mac, raw = pair
    theirs = khala_mac_tensors(raw["backbone"]["tensors"], raw["backbone"]["args"])
    ours = load_file(str(b / "backbone.safetensors"))
    assert len(theirs) == len(ours)
    assert set(load_file(str(mac / "khala_backbone.safetensors"))) == set(theirs)


@pytest.mark.slow
def test_khala_render_convert_cli(pair, tmp_path):
    _, b, mac, _ = pair
    src = _copy(mac, tmp_path)
    manifest = tmp_path / "jobs.yaml"
    manifest.write_text(
        f"model: {src}\n"
        "output_dir: out\n"
        "defaults:\n  duration: 1\n  max_minutes: 0.05\n"
        "jobs:\n  - id: tiny\n    tags: [Pop]\n    lyrics: la la\n    seeds: [1]\n"
    )
    cmd = [sys.executable, "-m", "khala_cli", "render", str(manifest), "--devices", "cpu",
           "--convert"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    dst = src.parent / "_cuda_artifacts-khala"
    assert modeldir.read_info(dst).fingerprint == modeldir.read_info(b).fingerprint
    side = json.loads((tmp_path / "out" / "tiny" / "tiny-s1.json").read_text())
    assert side["model"]["fingerprint"] == modeldir.read_info(b).fingerprint
