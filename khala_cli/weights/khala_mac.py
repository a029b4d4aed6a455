"""Read the Khala-mac download: the Khala weights already converted by the Khala-mac fork.

Six files in one folder (resolve.KHALA_MAC_FILES):

    khala_backbone.safetensors, khala_superres.safetensors   the transformers, Khala-mac names,
                                                             QKV already split per KV group
    backbone_megatron_args.json, superres_megatron_args.json the Megatron training args
    decoder_weights.pt                                       the DAC generator's state dict
    decoder_config.yaml                                      the reference's DAC yaml

Nothing here needs megatron-core. Tensors are renamed, never split or reshaped again: their
layout already is ours. decoder_weights.pt is loaded with weights_only and khala's allow-list
(`safe_load`); the yaml is read with PyYAML and only checked against the tensors, which decide
the codec's shape as they do for the Lightning checkpoint.
"""

from __future__ import annotations

import json
import re
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from khala_cli.engine.config import CodecConfig, TransformerConfig
from khala_cli.weights.megatron import Arch, arch_from_args
from khala_cli.weights.resolve import KHALA_MAC_FILES
from khala_cli.weights.safe_load import CheckpointReadError, safe_torch_load

# torch, safetensors' torch loader and engine.modeldir are imported inside the functions that
# read tensors: cli/models imports this module (through convert) in the parent.

WEIGHTS = {"backbone": "khala_backbone.safetensors", "superres": "khala_superres.safetensors"}
ARGS = {"backbone": "backbone_megatron_args.json", "superres": "superres_megatron_args.json"}
DECODER_WEIGHTS = "decoder_weights.pt"
DECODER_CONFIG = "decoder_config.yaml"

# (stage, done, total, unit) -> None, as convert.Progress
Progress = Callable[[str, int, int, str], None]


class KhalaMacError(Exception):
    """The Khala-mac files cannot be converted; the message names the file and what is wrong."""


def find_files(folder: Path) -> dict[str, Path]:
    """The six files by name; all must be there."""
    missing = [n for n in KHALA_MAC_FILES if not (folder / n).is_file()]
    if missing:
        raise KhalaMacError(
            f"{folder}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing: the "
            f"Khala-mac download has six files ({', '.join(KHALA_MAC_FILES)}); download the "
            f"missing ones again"
        )
    return {n: folder / n for n in KHALA_MAC_FILES}


# ---- names ------------------------------------------------------------------------------

GLOBAL_NAMES = {"embed.weight": "embed.weight", "lm_head.weight": "output.weight",
                "norm.weight": "norm.weight"}
_PROJECTIONS = {"attn.q_proj": "attn.wq", "attn.k_proj": "attn.wk", "attn.v_proj": "attn.wv",
                "attn.o_proj": "attn.wo", "mlp.gate_proj": "mlp.w_gate",
                "mlp.up_proj": "mlp.w_up", "mlp.down_proj": "mlp.w_down"}
LAYER_NAMES = {"input_norm.weight": "attn_norm.weight",
               "post_attn_norm.weight": "mlp_norm.weight",
               **{f"{theirs}.{kind}": f"{ours}.{kind}" for theirs, ours in _PROJECTIONS.items()
                  for kind in ("weight", "bias")}}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_OURS_GLOBAL = {v: k for k, v in GLOBAL_NAMES.items()}
_OURS_LAYER = {v: k for k, v in LAYER_NAMES.items()}


def _map(name: str, whole: dict[str, str], in_layer: dict[str, str]) -> str | None:
    if name in whole:
        return whole[name]
    m = _LAYER.match(name)
    if m and m.group(2) in in_layer:
        return f"layers.{m.group(1)}.{in_layer[m.group(2)]}"
    return None


def our_name(theirs: str) -> str | None:
    """Our name for a Khala-mac tensor name (None: not one their converter writes)."""
    return _map(theirs, GLOBAL_NAMES, LAYER_NAMES)


def their_name(ours: str) -> str:
    found = _map(ours, _OURS_GLOBAL, _OURS_LAYER)
    if found is None:
        raise KeyError(ours)
    return found


# ---- args -------------------------------------------------------------------------------

# Every arg the conversion reads, with its JSON type. Absent is an error, never a default:
# Megatron's defaults and Khala-mac's differ (norm_epsilon 1e-5 against 1e-6).
_INT, _NUM, _BOOL, _STR = "an integer", "a number", "true or false", "a string"
REQUIRED_ARGS = {
    "hidden_size": _INT, "num_layers": _INT, "num_attention_heads": _INT,
    "group_query_attention": _BOOL, "num_query_groups": _INT, "kv_channels": _INT,
    "ffn_hidden_size": _INT, "swiglu": _BOOL, "norm_epsilon": _NUM, "rotary_base": _NUM,
    "rotary_percent": _NUM, "vocab_size": _INT, "padded_vocab_size": _INT,
    "add_bias_linear": _BOOL, "untie_embeddings_and_output_weights": _BOOL,
    "normalization": _STR, "position_embedding_type": _STR,
}
SEQ_ARGS = ("seq_length", "max_position_embeddings")  # at least one of them
# An enum written as its repr: "<AttnBackend.auto: 5>" or "PositionEmbeddingType.rope".
_ENUM_REPR = re.compile(r"^<?[A-Za-z_][\w.]*\.(\w+)(?::.*)?>?$")


def _has_type(value: Any, kind: str) -> bool:
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _STR:
        return isinstance(value, str)
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (kind == _NUM and isinstance(value, float))


def read_args(path: Path) -> dict[str, Any]:
    """The args JSON, with every key the conversion reads present and of its type."""
    try:
        args = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise KhalaMacError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointReadError(f"{path}: cannot be read ({exc})") from None
    if not isinstance(args, dict):
        raise KhalaMacError(f"{path}: expected a JSON object of Megatron args, found a "
                            f"{type(args).__name__}")
    problems = [f"{k} is missing" for k in REQUIRED_ARGS if k not in args]
    problems += [f"{k} = {args[k]!r}, expected {kind}" for k, kind in REQUIRED_ARGS.items()
                 if k in args and not _has_type(args[k], kind)]
    if not any(_has_type(args.get(k), _INT) for k in SEQ_ARGS):
        problems.append(f"{' or '.join(SEQ_ARGS)} is missing (an integer)")
    if problems:
        raise KhalaMacError(f"{path}: the Megatron args khala needs are not all there "
                            f"(khala uses no defaults for them):\n  " + "\n  ".join(problems))
    for k in ("normalization", "position_embedding_type"):
        m = _ENUM_REPR.match(args[k])
        if m and "." in args[k]:
            args[k] = m.group(1)
    return args


def arch_of(path: Path) -> tuple[Arch, dict[str, Any]]:
    """The transformer shape from an args JSON (the same rules as for common.pt's args)."""
    args = read_args(path)
    return arch_from_args(types.SimpleNamespace(**args), str(path)), args


# ---- transformers -----------------------------------------------------------------------


def _header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """(shapes, bytes) of every tensor, from the safetensors header alone."""
    from safetensors import safe_open

    sizes = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}
    shapes, nbytes = {}, {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                piece = f.get_slice(k)
                shapes[k] = tuple(int(s) for s in piece.get_shape())
                n = 1
                for s in shapes[k]:
                    n *= s
                dtype = piece.get_dtype()
                if dtype not in sizes:
                    raise KhalaMacError(f"{path}: tensor {k} is {dtype}, not a floating type")
                nbytes[k] = n * sizes[dtype]
    except KhalaMacError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own kinds
        raise _unreadable(path, exc) from None
    return shapes, nbytes


def _unreadable(path: Path, exc: BaseException) -> CheckpointReadError:
    text = " ".join(str(exc).split())[:300]
    return CheckpointReadError(f"{path}: cannot be read ({type(exc).__name__}: {text}); the "
                               f"file may be truncated or damaged: download it again")


def _vocab(shapes: dict, args: dict, weights: Path, args_path: Path) -> int:
    """The padded vocabulary: the rows of embed.weight (vocab_size is the unpadded one)."""
    emb = shapes.get("embed.weight")
    if emb is None or len(emb) != 2:
        raise KhalaMacError(f"{weights}: missing tensor embed.weight (or not 2-D)")
    rows = emb[0]
    if args["padded_vocab_size"] != rows:
        raise KhalaMacError(
            f"{weights}: embed.weight has {rows} rows but {args_path.name} says "
            f"padded_vocab_size {args['padded_vocab_size']}: the two files do not belong "
            f"together (backbone and super-res args swapped?)"
        )
    if args["vocab_size"] > rows:
        raise KhalaMacError(f"{args_path}: vocab_size {args['vocab_size']} is larger than the "
                            f"{rows} rows of embed.weight in {weights.name}")
    return rows


def _refuse_fused(shapes: dict, weights: Path) -> None:
    """A fused QKV means the file is not Khala-mac's output: say so before anything else."""
    fused = sorted(k for k in shapes if "qkv" in k and "norm" not in k)
    if fused:
        raise KhalaMacError(
            f"{weights}: {', '.join(fused[:3])}{' ...' if len(fused) > 3 else ''} "
            f"{'is a fused QKV tensor' if len(fused) == 1 else 'are fused QKV tensors'}; the "
            f"Khala-mac layout keeps attn.q_proj, attn.k_proj and attn.v_proj split. This file "
            f"was not written by Khala-mac's converter"
            + (" (it holds Megatron names: convert the Megatron download instead)"
               if any(k.startswith("decoder.layers.") for k in fused) else "")
        )


def _check_names(shapes: dict, config: TransformerConfig, weights: Path, args_path: Path) -> None:
    """Every tensor Khala-mac's converter writes, no other, each of the shape the args give."""
    from khala_cli.engine.modeldir import shape_diff, transformer_shapes

    expected = {their_name(k): v for k, v in transformer_shapes(config).items()}
    missing, extra, misshaped = shape_diff(shapes, expected)
    problems = [f"missing tensor {k} (expected shape {list(expected[k])})" for k in missing]
    problems += [f"unexpected tensor {k} (shape {list(shapes[k])}): "
                 + ("not a name Khala-mac's converter writes" if our_name(k) is None
                    else f"args.num_layers is {config.num_layers}") for k in extra]
    problems += [f"{k} has shape {list(shapes[k])}, expected {list(expected[k])} "
                 f"(from {args_path.name})" for k in misshaped]
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise KhalaMacError(f"{weights}: the tensors do not match {args_path.name}:\n  "
                            + "\n  ".join(shown))


@dataclass(frozen=True)
class TransformerPlan:
    """One transformer file, checked from its header and args before any tensor is read."""

    stage: str
    weights: Path
    config: TransformerConfig
    nbytes: dict[str, int]  # Khala-mac tensor name -> stored bytes


def plan_transformer(stage: str, weights: Path, args_path: Path) -> TransformerPlan:
    """Check names, shapes and the args; the vocabulary is embed.weight's rows."""
    arch, args = arch_of(args_path)
    shapes, nbytes = _header(weights)
    _refuse_fused(shapes, weights)
    config = arch.config(_vocab(shapes, args, weights, args_path))
    _check_names(shapes, config, weights, args_path)
    return TransformerPlan(stage, weights, config, nbytes)


def read_transformer(plan: TransformerPlan, progress: Progress | None = None) -> dict[str, Any]:
    """Our tensors in bf16, read one at a time: renamed, never split or reshaped."""
    import torch
    from safetensors import safe_open

    total, done = sum(plan.nbytes.values()), 0
    out: dict[str, Any] = {}
    if progress:
        progress(plan.stage, 0, total, "B")
    try:
        with safe_open(str(plan.weights), framework="pt") as f:
            for k in sorted(plan.nbytes):
                out[our_name(k)] = f.get_tensor(k).to(torch.bfloat16).contiguous()
                done += plan.nbytes[k]
                if progress:
                    progress(plan.stage, done, total, "B")
    except Exception as exc:  # noqa: BLE001 - a damaged data section
        raise _unreadable(plan.weights, exc) from None
    return out


# ---- decoder ----------------------------------------------------------------------------


def read_decoder_state(path: Path, *, trust: bool) -> dict[str, Any]:
    """decoder_weights.pt: a flat {name: tensor} dict (the generator's, prefix stripped)."""
    import torch

    state = safe_torch_load(path, trust=trust, mmap=True)
    if not isinstance(state, dict):
        raise KhalaMacError(f"{path}: holds a {type(state).__name__}, not the DAC generator's "
                            f"state dict")
    odd = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise KhalaMacError(
            f"{path}: {odd[0]!r} holds a {type(state[odd[0]]).__name__}, not a tensor: expected "
            f"the DAC generator's state dict (decoder.model.*, quantizer.*), as Khala-mac "
            f"writes it"
        )
    return state


_INTERPOLATION = re.compile(r"^\$\{([A-Za-z_][\w.]*)\}$")
_ABSENT = object()


def _lookup(doc: dict, key: str, path: Path, seen: tuple[str, ...] = ()) -> Any:
    """doc["a"]["b"] for "a.b", following a `${x.y}` reference to another key of the file."""
    value: Any = doc
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _ABSENT
        value = value[part]
    if isinstance(value, str) and "${" in value:
        m = _INTERPOLATION.match(value.strip())
        if not m or m.group(1) in seen:
            raise KhalaMacError(f"{path}: {key}: {value!r} is an interpolation khala cannot "
                                f"resolve (only ${{key.path}} to another key of the file)")
        return _lookup(doc, m.group(1), path, (*seen, key))
    return value


def check_decoder_config(path: Path, codec: CodecConfig) -> None:
    """decoder_config.yaml describes the decoder that decoder_weights.pt holds."""
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise KhalaMacError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(doc, dict):
        raise KhalaMacError(f"{path}: expected a mapping with decoder: and quantizer:")
    want = {
        "decoder.d_latent": codec.latent_dim, "decoder.n_filters": codec.n_filters,
        "decoder.rates": list(codec.rates), "decoder.out_channel": codec.channels,
        "quantizer.dim": codec.latent_dim, "quantizer.codebook_size": codec.codebook_size,
        "quantizer.num_quantizers": codec.num_codebooks,
    }
    problems = []
    for key, value in want.items():
        got = _lookup(doc, key, path)
        if got is _ABSENT:
            problems.append(f"{key} is missing")
        elif got != value:
            problems.append(f"{key} is {got!r}, but {DECODER_WEIGHTS} holds {value!r}")
    if problems:
        raise KhalaMacError(f"{path} does not describe the decoder in {DECODER_WEIGHTS}:\n  "
                            + "\n  ".join(problems))
