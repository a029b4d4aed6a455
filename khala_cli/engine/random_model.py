"""A model directory of random weights from a fixed seed, of any transformer and codec shape.

It has the real on-disk format and the real token layout (Llama-3.1 special-token names, 64
quantizers x 1024 codes, hop 2048, 44.1 kHz stereo). Random weights are untrained: such a
model renders noise, never music. Its backbone never ends a song early (see
_suppress_end_of_song), so every song runs to its token cap. The demo model
(weights/demo.py) is the tiny one; `khala bench --e2e` builds one of the real shape. Every
build from the same arguments writes the same bytes (same fingerprint).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from khala_cli.engine.config import CodecConfig, TransformerConfig
from khala_cli.engine.modeldir import (
    ModelDirError,
    codec_shapes,
    save_model_dir,
    transformer_shapes,
)
from khala_cli.engine.tokens import TokenLayout

SEED = 0
NUM_QUANTIZERS = 64
CODEBOOK_SIZE = 1024

# Llama-3.1's 256 special tokens in id order, right after the base vocabulary.
LLAMA31_SPECIALS = [
    "begin_of_text", "end_of_text", "reserved_special_token_0", "reserved_special_token_1",
    "finetune_right_pad_id", "reserved_special_token_2", "start_header_id", "end_header_id",
    "eom_id", "eot_id", "python_tag",
] + [f"reserved_special_token_{i}" for i in range(3, 248)]

# Strength of the end-of-song suppression (see _suppress_end_of_song).
END_OF_SONG_WEIGHT = 64.0
# Gain of the codec's last conv: keeps the untrained decoder's noise quiet (peak well below 1).
CODEC_OUTPUT_GAIN = 0.0015


def _byte_alphabet() -> list[str]:
    """The byte-level BPE alphabet ordered by byte value (GPT-2's byte -> printable char)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def build_tokenizer():
    """Byte-level BPE with no merges (id = byte value) + the 256 Llama-3.1 specials at
    256..511, so the audio ids start at 512."""
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(f"<|{n}|>", special=True, normalized=False) for n in LLAMA31_SPECIALS]
    )
    assert tok.get_vocab_size(with_added_tokens=True) == 256 + len(LLAMA31_SPECIALS)
    return tok


TINY_SIZES = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "head_dim": 8, "ffn_hidden_size": 64}


def _transformer_config(vocab_size: int, sizes: dict | None = None):
    return TransformerConfig(vocab_size=vocab_size, **(sizes or TINY_SIZES))


def tiny_codec_config() -> CodecConfig:
    """The real codec's layout (quantizers, hop, rate, windows) with a tiny decoder."""
    return CodecConfig(
        num_codebooks=NUM_QUANTIZERS, codebook_size=CODEBOOK_SIZE, latent_dim=16, n_filters=2,
        rates=(8, 8, 8, 4), channels=2, sample_rate=44100, window_frames=1920, overlap_frames=480,
    )


def _transformer_weights(cfg, gen, end_of_song_id: int | None) -> dict:
    sd = {}
    for name, shape in sorted(transformer_shapes(cfg).items()):
        if name.endswith("norm.weight"):
            sd[name] = torch.ones(shape)
        elif name.endswith(".bias"):
            sd[name] = torch.randn(shape, generator=gen) * 0.02
        else:
            sd[name] = torch.randn(shape, generator=gen) * 0.02
    if end_of_song_id is not None:
        _suppress_end_of_song(sd, cfg, end_of_song_id)
    return sd


def _suppress_end_of_song(sd: dict, cfg, end_of_song_id: int) -> None:
    """Make the untrained backbone never end a song early.

    Residual channel 0 carries a constant: every embedding row has 1.0 there and no layer
    writes into it (row 0 of every attention-out and MLP-down weight and bias is zero), so
    after the final RMSNorm channel 0 is always clearly positive. The output row of
    <|end_of_text|> reads only channel 0, with a large negative weight: its logit is always
    strongly negative (about -64 x 5.6 with these weights), so the song ends only at the
    max-token cap, never at random.
    """
    sd["embed.weight"][:, 0] = 1.0
    for n in range(cfg.num_layers):
        for w in ("attn.wo", "mlp.w_down"):
            sd[f"layers.{n}.{w}.weight"][0, :] = 0.0
            sd[f"layers.{n}.{w}.bias"][0] = 0.0
    row = sd["output.weight"][end_of_song_id]
    row.zero_()
    row[0] = -END_OF_SONG_WEIGHT


def _codec_weights(cfg, gen) -> dict:
    shapes = codec_shapes(cfg)
    last_conv = max(
        (k for k in shapes if k.endswith("weight_v")), key=lambda k: int(k.split(".")[2])
    )
    sd = {}
    for name, shape in sorted(shapes.items()):
        if name == "codebooks":  # the sum of 64 codebook vectors has unit variance
            sd[name] = torch.randn(shape, generator=gen) / shape[0] ** 0.5
        elif name.endswith("alpha"):
            sd[name] = torch.ones(shape)
        elif name.endswith("bias"):
            sd[name] = torch.zeros(shape)
        elif name.endswith("weight_v"):
            sd[name] = torch.randn(shape, generator=gen)
        elif name.endswith("weight_g"):
            # Unit-norm filters (variance-preserving), except the quiet output conv.
            gain = CODEC_OUTPUT_GAIN if name == last_conv.replace("weight_v", "weight_g") else 1.0
            sd[name] = torch.full(shape, gain)
        else:
            raise AssertionError(f"unexpected codec tensor {name}")
    return sd


def build_random_model(path: str | Path, *, name: str, source: str, demo: bool,
                       sizes: dict | None = None, vocab: tuple[int, int] | None = None,
                       codec=None, superres_sizes: dict | None = None) -> Path:
    """A model directory of random weights from SEED whose backbone never ends a song:
    transformer `sizes` (TransformerConfig fields; default TINY_SIZES; `superres_sizes` for
    the super-res model, default the same), `vocab` (backbone, super-res rows; default the
    layout's), `codec` (CodecConfig; default tiny_codec_config()).

    Atomic: save_model_dir writes a temporary sibling directory renamed into place. If `path`
    already holds a model (another process won a race), it is left as it is."""
    path = Path(path)
    if (path / "model.json").exists():
        return path
    tok = build_tokenizer()
    lay = TokenLayout.from_tokenizer(tok, NUM_QUANTIZERS, CODEBOOK_SIZE)
    gen = torch.Generator().manual_seed(SEED)
    bb_vocab, sr_vocab = vocab or (lay.backbone_vocab, lay.superres_vocab)
    bb_cfg = _transformer_config(bb_vocab, sizes)
    sr_cfg = _transformer_config(sr_vocab, superres_sizes or sizes)
    codec_cfg = codec or tiny_codec_config()
    bb = _transformer_weights(bb_cfg, gen, lay.end_of_song_id)
    sr = _transformer_weights(sr_cfg, gen, None)
    codec_w = _codec_weights(codec_cfg, gen)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.tok-", dir=path.parent))
    try:
        tok.save(str(scratch / "tokenizer.json"), pretty=True)
        save_model_dir(
            path, name=name, backbone=(bb_cfg, bb), superres=(sr_cfg, sr),
            codec=(codec_cfg, codec_w), tokenizer_src=scratch / "tokenizer.json", demo=demo,
            source=source, transformer_dtype=torch.bfloat16,
        )
    except ModelDirError:
        if not (path / "model.json").exists():
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path
