"""Write the Khala-mac download (six files) from the tensors of a Megatron download.

The names and file contents follow Khala-mac's own tools, not khala's converter:
`tools/convert_megatron_to_hf.py` (tensor names; the fused QKV split per KV group as
[q x heads_per_group, k, v]; fc1's bias kept once), `tools/gather_cuda_artifacts.py` (the
args JSON: `vars(args)`, a value JSON cannot hold written as its repr),
`tools/gather_decoder.py` (decoder_weights.pt: `torch.save` of the generator's state dict,
`generator.` stripped) and `models/Decoder/dac_rvq_1024_64_golden.yaml` (decoder_config.yaml,
with its `${encoder.d_latent}` interpolation).
"""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from pathlib import Path

import torch
from megatron_fixtures import CODEC, unstack
from safetensors.torch import save_file

from khala_cli.engine.config import CodecConfig

FILES = ("khala_backbone.safetensors", "khala_superres.safetensors", "decoder_weights.pt",
         "backbone_megatron_args.json", "superres_megatron_args.json", "decoder_config.yaml")
LABELS = {"backbone": "backbone", "superresolution": "superres"}  # download dir -> their label

# Megatron (TE layer spec) -> Khala-mac names; linear_qkv is split below.
WHOLE = {"embedding.word_embeddings.weight": "embed.weight",
         "output_layer.weight": "lm_head.weight",
         "decoder.final_layernorm.weight": "norm.weight"}
PER_LAYER = {
    "self_attention.linear_qkv.layer_norm_weight": "input_norm.weight",
    "self_attention.linear_proj.weight": "attn.o_proj.weight",
    "self_attention.linear_proj.bias": "attn.o_proj.bias",
    "mlp.linear_fc1.layer_norm_weight": "post_attn_norm.weight",
    "mlp.linear_fc1.weight_w": "mlp.gate_proj.weight",
    "mlp.linear_fc1.bias_w": "mlp.gate_proj.bias",
    "mlp.linear_fc1.weight_v": "mlp.up_proj.weight",
    "mlp.linear_fc1.bias_v": "mlp.up_proj.bias",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "mlp.linear_fc2.bias": "mlp.down_proj.bias",
}


def split_qkv(t: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's fused QKV rows, per KV group [q x heads_per_group, k, v], taken apart."""
    groups, d = args.num_query_groups, args.kv_channels
    per = args.num_attention_heads // groups
    rest = tuple(t.shape[1:])
    g = t.reshape(groups, per + 2, d, *rest)
    q = g[:, :per].reshape(groups * per * d, *rest)
    k = g[:, per].reshape(groups * d, *rest)
    v = g[:, per + 1].reshape(groups * d, *rest)
    return q, k, v


def khala_mac_tensors(tensors: dict[str, torch.Tensor], args) -> dict[str, torch.Tensor]:
    """One transformer's Megatron tensors under Khala-mac's names, in their stored dtype."""
    out = {}
    for key, t in unstack(tensors, args.num_layers).items():
        if key in WHOLE:
            out[WHOLE[key]] = t
            continue
        layer, tail = key[len("decoder.layers."):].split(".", 1)
        p = f"layers.{layer}."
        if tail in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
            kind = tail.rsplit(".", 1)[1]
            for proj, piece in zip("qkv", split_qkv(t, args), strict=True):
                out[f"{p}attn.{proj}_proj.{kind}"] = piece
        else:
            out[p + PER_LAYER[tail]] = t
    return {k: v.contiguous() for k, v in out.items()}


def args_json(args) -> dict:
    """The args as Khala-mac dumps them: JSON values kept, anything else as its repr."""
    out = {}
    for k, v in vars(args).items():
        try:
            json.dumps(v)
            out[k] = v
        except (TypeError, ValueError):
            out[k] = repr(v)
    return out


def decoder_yaml(cfg: CodecConfig = CODEC) -> str:
    """decoder_config.yaml in the reference's layout (quantizer.dim interpolated)."""
    return (
        "# model config\n"
        "encoder:\n"
        f"  input_channel: {cfg.channels}\n"
        f"  n_filters: {cfg.n_filters}\n"
        f"  strides: {list(reversed(cfg.rates))}\n"
        f"  d_latent: {cfg.latent_dim}\n\n"
        "decoder:\n"
        f"  d_latent: {cfg.latent_dim}\n"
        f"  n_filters: {cfg.n_filters}\n"
        f"  rates: {list(cfg.rates)}\n"
        f"  out_channel: {cfg.channels}\n\n"
        "quantizer:\n"
        "  dim: ${encoder.d_latent}\n"
        f"  codebook_size: {cfg.codebook_size}\n"
        f"  num_quantizers: {cfg.num_codebooks}\n"
        "  decay: 0.99\n"
        "  q_dropout: False\n"
    )


def write_khala_mac_download(folder: Path, raw: dict, codec: CodecConfig = CODEC) -> Path:
    """The six files in `folder`, from what `write_raw_download` returned (same tensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    for dirname, label in LABELS.items():
        args, tensors = raw[dirname]["args"], raw[dirname]["tensors"]
        save_file(khala_mac_tensors(tensors, args), str(folder / f"khala_{label}.safetensors"))
        (folder / f"{label}_megatron_args.json").write_text(
            json.dumps(args_json(args), indent=2, default=str))
    torch.save(dict(raw["generator"]), folder / "decoder_weights.pt")
    (folder / "decoder_config.yaml").write_text(decoder_yaml(codec))
    return folder


def write_khala_mac_checkout(root: Path, raw: dict) -> Path:
    """A Khala-mac checkout: the six files in `_cuda_artifacts/` (where its README downloads
    them) and its tokenizer in `models/Tokenizer/`. Returns the `_cuda_artifacts` folder."""
    tok = root / "models" / "Tokenizer" / "tokenizer.json"
    tok.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(raw["tokenizer"], tok)
    return write_khala_mac_download(root / "_cuda_artifacts", raw)


# ---- a decoder_weights.pt that runs code when fully unpickled ---------------------------


def _hooked_state(marker: str, items: list) -> OrderedDict:
    Path(marker).write_text("unpickled")
    return OrderedDict(items)


class HookedState(OrderedDict):
    """A state dict whose unpickling calls `_hooked_state` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path, state: dict):
        super().__init__(state)
        self.marker = str(marker)

    def __reduce__(self):
        return (_hooked_state, (self.marker, list(self.items())))
