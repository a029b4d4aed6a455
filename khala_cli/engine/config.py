"""Architecture configs, read from and written to a model directory as JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from khala_cli.model_numbers import MAX_SEQ_LEN

T = TypeVar("T")

# The backbone's decode step: eager PyTorch, torch.compile of the step, or the step captured
# as CUDA graphs (CUDA only). Each gives eager's tokens (tests; make gpu-check on a GPU).
DECODE_PATHS = ("eager", "compile", "cuda_graphs")


def decode_options(path: str) -> dict[str, bool]:
    """The backbone options (backbone.generate's keywords) that select a decode path."""
    if path not in DECODE_PATHS:
        raise ValueError(f"decode path {path!r}: expected one of {', '.join(DECODE_PATHS)}")
    return {"compile": path == "compile", "cuda_graphs": path == "cuda_graphs"}


def _from_dict(cls: type[T], data: dict[str, Any], source: str) -> T:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{source}: unknown config keys {unknown}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"{source}: {exc}") from None


class _JsonConfig:
    @classmethod
    def from_json(cls: type[T], path: str | Path) -> T:
        path = Path(path)
        return _from_dict(cls, json.loads(path.read_text()), str(path))

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
        return _from_dict(cls, data, source)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class TransformerConfig(_JsonConfig):
    """Shape of the backbone or super-res GPT (both use this one class)."""

    vocab_size: int  # rows of the embedding and output matrices (padded vocab)
    hidden_size: int = 2048
    num_layers: int = 24
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 64
    ffn_hidden_size: int = 5632
    norm_eps: float = 1e-6
    rope_base: float = 500000.0
    max_seq_len: int = MAX_SEQ_LEN
    # The trained model adds the fc1 bias twice: silu(Ww x + 2bw) * (Wv x + 2bv).
    double_fc1_bias: bool = True

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for rotary embeddings")


WINDOW_GROUP_BYTES = 2 * 1024**3  # activations of one decoder forward (CodecConfig.window_group)
MAX_WINDOW_GROUP = 16


@dataclass(frozen=True)
class CodecConfig(_JsonConfig):
    """DAC RVQ decoder: summed codebooks -> DAC decoder blocks -> stereo waveform."""

    num_codebooks: int = 64
    codebook_size: int = 1024
    latent_dim: int = 128
    n_filters: int = 192  # the decoder's first conv has n_filters * 2**len(rates) channels
    rates: tuple[int, ...] = (8, 8, 8, 4)
    channels: int = 2
    sample_rate: int = 44100
    window_frames: int = 1920
    overlap_frames: int = 480

    @property
    def hop_length(self) -> int:
        hop = 1
        for r in self.rates:
            hop *= r
        return hop

    def window_activation_bytes(self, frames: int, dtype_bytes: int = 4) -> int:
        """Peak activation memory of decoding one window of `frames` frames: the decoder's
        largest activation times the live copies measured at the peak (about 8 on CPU with
        the full-size decoder: Snake temporaries, residual branches)."""
        ch = self.n_filters * 2 ** len(self.rates)
        length = frames
        biggest = ch * length
        for r in self.rates:
            ch //= 2
            length *= r
            biggest = max(biggest, ch * length)
        return 8 * biggest * dtype_bytes

    def window_group(self, frames: int, dtype_bytes: int = 4) -> int:
        """How many windows of `frames` frames of one song the decoder takes in one forward:
        from this config alone (never from free memory or from other songs), so a take's
        audio depends on the take alone. About WINDOW_GROUP_BYTES of activations; the real
        codec's 1920-frame window needs more on its own, so it goes one at a time."""
        per = self.window_activation_bytes(frames, dtype_bytes)
        return int(max(1, min(MAX_WINDOW_GROUP, WINDOW_GROUP_BYTES // max(1, per))))

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length


@dataclass(frozen=True)
class ModelInfo(_JsonConfig):
    """`model.json`: what a model directory is and how to trust its files."""

    name: str
    format: str = "khala-model"
    format_version: int = 1
    demo: bool = False
    num_quantizers: int = 64
    codebook_size: int = 1024
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    fingerprint: str = ""  # sha256 over the sorted (name, sha256) pairs
    source: str = ""  # where it was converted from, for people
