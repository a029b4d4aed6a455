"""Model directories (format version 1): write them, check them, load them.

    model.json                      ModelInfo: name, demo flag, file hashes, fingerprint
    backbone.json / .safetensors    TransformerConfig + tensors
    superres.json / .safetensors    TransformerConfig + tensors
    codec.json / .safetensors       CodecConfig + tensors
    tokenizer.json                  a `tokenizers` tokenizer (Llama-3.1 special-token names)

Only safetensors and JSON are read: nothing is ever unpickled. Every tensor's name and shape
is checked against the component's config before it is used, and a mismatch names the
tensor and the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from khala_cli.engine.codec import Codec
from khala_cli.engine.config import CodecConfig, ModelInfo, TransformerConfig
from khala_cli.engine.tokens import TokenLayout
from khala_cli.engine.transformer import Transformer

FORMAT = "khala-model"
FORMAT_VERSION = 1
MODEL_JSON = "model.json"
TOKENIZER_JSON = "tokenizer.json"
TRANSFORMERS = ("backbone", "superres")
COMPONENTS = (*TRANSFORMERS, "codec")
REQUIRED_FILES = tuple(
    f"{c}.{ext}" for c in COMPONENTS for ext in ("json", "safetensors")
) + (TOKENIZER_JSON,)


class ModelDirError(Exception):
    """A model directory is missing, incomplete, or its tensors do not match its configs."""


# ---- expected tensors -------------------------------------------------------------------


def transformer_shapes(cfg: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a transformer with its shape (names per docs/DESIGN.md)."""
    h, q, kv, ffn = (
        cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
        cfg.ffn_hidden_size,
    )
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (cfg.vocab_size, h)}
    for n in range(cfg.num_layers):
        p = f"layers.{n}."
        for name, out_dim, in_dim in (
            ("attn.wq", q, h), ("attn.wk", kv, h), ("attn.wv", kv, h), ("attn.wo", h, q),
            ("mlp.w_gate", ffn, h), ("mlp.w_up", ffn, h), ("mlp.w_down", h, ffn),
        ):
            shapes[f"{p}{name}.weight"] = (out_dim, in_dim)
            shapes[f"{p}{name}.bias"] = (out_dim,)
        shapes[f"{p}attn_norm.weight"] = (h,)
        shapes[f"{p}mlp_norm.weight"] = (h,)
    shapes["norm.weight"] = (h,)
    shapes["output.weight"] = (cfg.vocab_size, h)
    return shapes


def codec_shapes(cfg: CodecConfig) -> dict[str, tuple[int, ...]]:
    """`codebooks` and the DAC decoder's weight-norm state dict under `decoder.`."""
    with torch.device("meta"):
        codec = Codec(cfg)
    return {k: tuple(v.shape) for k, v in codec.state_dict().items()}


def expected_shapes(name: str, cfg) -> dict[str, tuple[int, ...]]:
    if name in TRANSFORMERS:
        return transformer_shapes(cfg)
    if name == "codec":
        return codec_shapes(cfg)
    raise ValueError(f"unknown model component {name!r} (expected one of {COMPONENTS})")


def shape_diff(
    found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]
) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mis-shaped) tensor names, each sorted."""
    f, e = set(found), set(expected)
    misshaped = sorted(k for k in f & e if tuple(found[k]) != tuple(expected[k]))
    return sorted(e - f), sorted(f - e), misshaped


def check_shapes(
    found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], file: str, config_file: str
) -> None:
    """Raise ModelDirError listing every missing, unexpected or mis-shaped tensor."""
    missing, unexpected, misshaped = shape_diff(found, expected)
    problems = [f"missing tensor {k!r} (expected shape {list(expected[k])})" for k in missing]
    problems += [f"unexpected tensor {k!r} (shape {list(found[k])})" for k in unexpected]
    problems += [
        f"tensor {k!r} has shape {list(found[k])}, expected {list(expected[k])} per {config_file}"
        for k in misshaped
    ]
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise ModelDirError(f"{file}: tensors do not match {config_file}:\n  " + "\n  ".join(shown))


# ---- hashing ----------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(files: Mapping[str, str]) -> str:
    """sha256 of the sorted "name:sha256\\n" lines of a model's files."""
    text = "".join(f"{name}:{files[name]}\n" for name in sorted(files))
    return hashlib.sha256(text.encode()).hexdigest()


# ---- writing ----------------------------------------------------------------------------


def _config_class(name: str):
    if name in TRANSFORMERS:
        return TransformerConfig
    if name == "codec":
        return CodecConfig
    raise ValueError(f"unknown model component {name!r} (expected one of {COMPONENTS})")


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_component(
    directory: str | Path, name: str, config, state_dict: Mapping[str, torch.Tensor], dtype=None
) -> str:
    """Write `<name>.safetensors` and `<name>.json` into `directory`; return the tensors'
    file sha256. Names and shapes are checked against `config` first; floating tensors are
    cast to `dtype` when given."""
    cls = _config_class(name)
    if not isinstance(config, cls):
        raise TypeError(f"{name} needs a {cls.__name__}, got {type(config).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    file = directory / f"{name}.safetensors"
    check_shapes(
        {k: tuple(v.shape) for k, v in state_dict.items()},
        expected_shapes(name, config), str(file), f"{name}.json",
    )
    tensors = {}
    for k, v in state_dict.items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    tmp = file.with_name(file.name + ".tmp")
    # One metadata key only: safetensors writes the metadata map in hash order, and the files
    # must be byte-identical for identical tensors (fingerprints, deterministic demo).
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, file)
    _write_json(directory / f"{name}.json", config.to_dict())
    return sha256_file(file)


def _copy_tokenizer(src: str | Path, dst_dir: Path) -> None:
    src = Path(src)
    if src.is_dir():
        src = src / TOKENIZER_JSON
    if not src.is_file():
        raise ModelDirError(f"tokenizer not found: {src}")
    shutil.copyfile(src, dst_dir / TOKENIZER_JSON)


def finish_model_dir(
    tmp_dir: str | Path,
    final_dir: str | Path,
    *,
    name: str,
    demo: bool,
    source: str,
    num_quantizers: int,
    codebook_size: int,
    tokenizer_src: str | Path,
    replace: bool = False,
) -> ModelInfo:
    """Complete a directory of written components: copy the tokenizer, hash every file,
    write model.json, check the vocabularies fit the token layout, then rename `tmp_dir` to
    `final_dir` in one step. An existing `final_dir` is an error unless `replace`."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    _copy_tokenizer(tokenizer_src, tmp_dir)
    missing = [f for f in REQUIRED_FILES if not (tmp_dir / f).is_file()]
    if missing:
        raise ModelDirError(f"{tmp_dir}: cannot finish the model directory, missing {missing}")
    _check_vocab(tmp_dir, num_quantizers, codebook_size)
    files = {
        p.name: sha256_file(p)
        for p in sorted(tmp_dir.iterdir())
        if p.is_file() and p.name != MODEL_JSON and not p.name.endswith(".tmp")
    }
    info = ModelInfo(
        name=name, format=FORMAT, format_version=FORMAT_VERSION, demo=demo,
        num_quantizers=num_quantizers, codebook_size=codebook_size,
        files=files, fingerprint=fingerprint(files), source=source,
    )
    _write_json(tmp_dir / MODEL_JSON, info.to_dict())
    with open(tmp_dir / MODEL_JSON, "rb") as f:
        os.fsync(f.fileno())
    _apply_umask(tmp_dir)
    _move_into_place(tmp_dir, final_dir, replace)
    return info


def _check_vocab(directory: Path, num_quantizers: int, codebook_size: int) -> None:
    lay = _layout_from(directory, num_quantizers, codebook_size)
    for which, need in (("backbone", lay.backbone_vocab), ("superres", lay.superres_vocab)):
        cfg = TransformerConfig.from_json(directory / f"{which}.json")
        if cfg.vocab_size < need:
            raise ModelDirError(
                f"{directory / (which + '.json')}: vocab_size {cfg.vocab_size} is smaller than the "
                f"{need} ids the token layout needs ({lay.audio_offset} text ids + audio codebooks)"
            )
    codec = CodecConfig.from_json(directory / "codec.json")
    if (codec.num_codebooks, codec.codebook_size) != (num_quantizers, codebook_size):
        raise ModelDirError(
            f"{directory / 'codec.json'}: {codec.num_codebooks} x {codec.codebook_size} codebooks, "
            f"but the model has {num_quantizers} x {codebook_size}"
        )


def _apply_umask(directory: Path) -> None:
    """Temporary directories and files are private; a model directory is not."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for p in directory.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~umask)


def _move_into_place(tmp_dir: Path, final_dir: Path, replace: bool) -> None:
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    if final_dir.exists() and any(final_dir.iterdir()):
        if not replace:
            raise ModelDirError(f"{final_dir} already exists")
        old = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.old-", dir=final_dir.parent))
        os.rename(final_dir, old / final_dir.name)
        os.rename(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        if final_dir.exists():
            final_dir.rmdir()
        os.rename(tmp_dir, final_dir)
    except OSError as exc:  # another process put a model there first
        raise ModelDirError(f"{final_dir} already exists ({exc.strerror})") from None


def save_model_dir(
    final_dir: str | Path,
    *,
    name: str,
    backbone: tuple[TransformerConfig, Mapping[str, torch.Tensor]],
    superres: tuple[TransformerConfig, Mapping[str, torch.Tensor]],
    codec: tuple[CodecConfig, Mapping[str, torch.Tensor]],
    tokenizer_src: str | Path,
    demo: bool = False,
    source: str = "",
    transformer_dtype: torch.dtype | None = torch.bfloat16,
    replace: bool = False,
) -> ModelInfo:
    """Write a complete model directory atomically (through a temporary sibling directory).
    Transformer tensors are stored in `transformer_dtype`; codec tensors in float32."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
    try:
        write_component(tmp, "backbone", *backbone, dtype=transformer_dtype)
        write_component(tmp, "superres", *superres, dtype=transformer_dtype)
        write_component(tmp, "codec", *codec, dtype=torch.float32)
        return finish_model_dir(
            tmp, final_dir, name=name, demo=demo, source=source,
            num_quantizers=codec[0].num_codebooks, codebook_size=codec[0].codebook_size,
            tokenizer_src=tokenizer_src, replace=replace,
        )
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---- reading ----------------------------------------------------------------------------


def read_info(model_dir: str | Path) -> ModelInfo:
    path = Path(model_dir) / MODEL_JSON
    if not path.is_file():
        raise ModelDirError(f"{model_dir}: not a khala model directory (no {MODEL_JSON})")
    try:
        info = ModelInfo.from_json(path)
    except (ValueError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{path}: {exc}") from None
    if info.format != FORMAT or info.format_version != FORMAT_VERSION:
        raise ModelDirError(
            f"{path}: format {info.format!r} version {info.format_version}; this khala reads "
            f"{FORMAT!r} version {FORMAT_VERSION}"
        )
    return info


def read_config(model_dir: str | Path, name: str):
    path = Path(model_dir) / f"{name}.json"
    if not path.is_file():
        raise ModelDirError(f"{path}: missing")
    try:
        return _config_class(name).from_json(path)
    except (ValueError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{path}: {exc}") from None


def check_file(model_dir: str | Path, name: str, config) -> Path:
    """Check the names and shapes in `<name>.safetensors` against `config` (reads only the
    file's header); return the file's path."""
    file = Path(model_dir) / f"{name}.safetensors"
    if not file.is_file():
        raise ModelDirError(f"{file}: missing")
    try:
        with safe_open(str(file), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # a truncated or foreign file
        raise ModelDirError(f"{file}: not a readable safetensors file ({exc})") from None
    check_shapes(found, expected_shapes(name, config), str(file), f"{name}.json")
    return file


def read_tensors(model_dir: str | Path, name: str, config, device="cpu") -> dict[str, torch.Tensor]:
    """The checked tensors of one component (names and shapes match `config`)."""
    file = check_file(model_dir, name, config)
    return load_file(str(file), device=str(device))


def load_transformer(model_dir: str | Path, which: str, device="cpu", dtype=torch.float32):
    """The backbone or super-res Transformer, weights checked, cast to `dtype`, in eval mode."""
    if which not in TRANSFORMERS:
        raise ValueError(f"which must be one of {TRANSFORMERS}, got {which!r}")
    cfg = read_config(model_dir, which)
    tensors = read_tensors(model_dir, which, cfg, device)
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(tensors, strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval()


def load_codec(model_dir: str | Path, device="cpu"):
    """The codec in float32 with weight norm folded into plain weights, in eval mode."""
    cfg = read_config(model_dir, "codec")
    tensors = read_tensors(model_dir, "codec", cfg, "cpu")
    codec = Codec(cfg)
    codec.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    codec.fold_weight_norm()
    codec.requires_grad_(False)
    return codec.to(device).eval()


def load_tokenizer(model_dir: str | Path):
    path = Path(model_dir) / TOKENIZER_JSON
    if not path.is_file():
        raise ModelDirError(f"{path}: missing")
    return Tokenizer.from_file(str(path))


def _layout_from(directory: Path, num_quantizers: int, codebook_size: int) -> TokenLayout:
    try:
        return TokenLayout.from_tokenizer(load_tokenizer(directory), num_quantizers, codebook_size)
    except ValueError as exc:
        raise ModelDirError(f"{directory / TOKENIZER_JSON}: {exc}") from None


def layout(model_dir: str | Path) -> TokenLayout:
    info = read_info(model_dir)
    return _layout_from(Path(model_dir), info.num_quantizers, info.codebook_size)


def verify(model_dir: str | Path) -> list[str]:
    """Problems with a model directory's files (empty when every hash checks out)."""
    model_dir = Path(model_dir)
    try:
        info = read_info(model_dir)
    except ModelDirError as exc:
        return [str(exc)]
    problems = []
    for f in REQUIRED_FILES:
        if f not in info.files:
            problems.append(f"{model_dir / MODEL_JSON}: does not list {f}")
    for f, digest in sorted(info.files.items()):
        path = model_dir / f
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{path}: sha256 differs from {MODEL_JSON} (file changed or corrupt)")
    if fingerprint(info.files) != info.fingerprint:
        problems.append(f"{model_dir / MODEL_JSON}: fingerprint does not match its file list")
    return problems
