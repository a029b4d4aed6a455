"""Read the model tensors of a Megatron `torch_dist` checkpoint on a CPU, one group at a time.

The checkpoint is read with megatron-core's `dist_checkpointing` (`load_tensors_metadata`,
`load`) inside a one-rank gloo process group. Only the model tensors are ever requested:
optimizer state, RNG state and Transformer Engine `_extra_state` blobs are skipped by name
and never read. `common.pt` (the training args) is loaded with `weights_only=True` and
khala's allow-list (see `safe_load`), and the DCP `.metadata` pickle is checked with a
restricted unpickler before megatron-core reads it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from khala_cli.engine.config import TransformerConfig
from khala_cli.weights.safe_load import CheckpointReadError, safe_dcp_metadata, safe_torch_load

# torch and megatron-core are imported inside the functions that use them: this module is
# imported by the parent (cli/models -> weights.convert), which never loads torch, and
# megatron-core is optional (khala-cli[convert]); its absence becomes a MegatronError.

TRACKER = "latest_checkpointed_iteration.txt"
DEFAULT_MAX_SEQ_LEN = TransformerConfig.__dataclass_fields__["max_seq_len"].default
COMMON = "common.pt"
DCP_METADATA = ".metadata"
CONFIG_JSON = "metadata.json"

# Entries of a training checkpoint that are not model weights: never read.
_SKIP_PREFIXES = ("optimizer", "rng_state", "rerun_state_machine")


class MegatronError(Exception):
    """The Megatron checkpoint cannot be converted; the message says what and where."""


def is_skipped(key: str) -> bool:
    """Optimizer/RNG/rerun state and TE `_extra_state` blobs: not model weights."""
    return key.startswith(_SKIP_PREFIXES) or "_extra_state" in key


@dataclass(frozen=True)
class TensorInfo:
    key: str
    shape: tuple[int, ...]
    dtype: Any  # torch.dtype
    nbytes: int


def find_iteration_dir(root: Path, iteration: int | None = None) -> tuple[Path, int | str]:
    """`iter_XXXXXXX/` of the requested or the latest iteration (from the tracker file)."""
    if not root.is_dir():
        raise MegatronError(f"{root}: checkpoint directory not found")
    available = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("iter_"))
    if iteration is None:
        tracker = root / TRACKER
        if not tracker.is_file():
            hint = f" (found {', '.join(available)}: pass --iteration N)" if available else ""
            raise MegatronError(f"{root}: no {TRACKER}: not a Megatron checkpoint directory{hint}")
        text = tracker.read_text().strip()
        if text == "release":
            path = root / "release"
            it: int | str = "release"
        else:
            try:
                it = int(text)
            except ValueError:
                raise MegatronError(f"{tracker}: expected an iteration number, found {text!r}") from None
            path = root / f"iter_{it:07d}"
    else:
        it = int(iteration)
        path = root / f"iter_{it:07d}"
    if not path.is_dir():
        have = f"; available: {', '.join(available)}" if available else ""
        raise MegatronError(f"{path}: iteration directory not found{have}")
    return path, it


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """A one-rank gloo process group for megatron-core / DCP, torn down afterwards
    (an existing one-rank group is reused as it is)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() != 1:
            raise MegatronError("conversion runs in one process; a multi-rank process group is active")
        yield
        return
    with tempfile.TemporaryDirectory(prefix="khala-pg-") as tmp:
        dist.init_process_group(
            "gloo", init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=0, world_size=1
        )
        try:
            yield
        finally:
            dist.destroy_process_group()


def import_dist_checkpointing():
    """megatron-core's dist_checkpointing, imported quietly (it warns about TE/Apex on CPU)."""
    # On a machine without CUDA, importing megatron-core makes torch log "No CUDA runtime".
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core import dist_checkpointing
            from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy
    except ImportError as exc:
        raise MegatronError(
            "converting Megatron checkpoints needs megatron-core: "
            f"pip install 'khala-cli[convert]' ({exc})"
        ) from None
    for name in ("megatron", "megatron.core"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return dist_checkpointing, TorchCommonLoadStrategy


class MegatronCheckpoint:
    """One iteration of a Megatron torch_dist checkpoint: args, model tensor index, reads.

    Use inside `single_process_group()`.
    """

    def __init__(self, root: str | Path, iteration: int | None = None, *, trust: bool = False):
        self.root = Path(root)
        self.path, self.iteration = find_iteration_dir(self.root, iteration)
        self.trust = trust
        for required in (CONFIG_JSON, DCP_METADATA, COMMON):
            if not (self.path / required).is_file():
                raise MegatronError(
                    f"{self.path}: {required} is missing: not a complete torch_dist checkpoint"
                )
        self._dc, common_base = import_dist_checkpointing()
        self._common = _make_common_strategy(common_base, self.path, trust)
        # Check the pickled DCP index before megatron-core unpickles it.
        self._dcp_meta = safe_dcp_metadata(self.path / DCP_METADATA, trust=trust)
        common = self._common.load_common(self.path)
        if not isinstance(common, dict) or "args" not in common:
            raise MegatronError(f"{self.path / COMMON}: holds no training args")
        self.args = common["args"]
        self.checkpoint_version = common.get("checkpoint_version")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sharded = self._dc.load_tensors_metadata(str(self.path))
        except Exception as exc:  # noqa: BLE001 - megatron raises many kinds
            raise MegatronError(f"{self.path}: cannot read the tensor index ({exc})") from None
        self.tensors: dict[str, TensorInfo] = {}
        self.skipped: list[str] = []
        self._sharded = {}
        for key, sh in sharded.items():
            if is_skipped(key):
                self.skipped.append(key)
                continue
            shape = tuple(int(s) for s in sh.global_shape)
            n = 1
            for s in shape:
                n *= s
            self.tensors[key] = TensorInfo(key, shape, sh.dtype, n * sh.dtype.itemsize)
            self._sharded[key] = sh
        # Byte entries (TE _extra_state, RNG, rerun state) are not in the tensor index.
        self.skipped += [
            k for k, md in self._dcp_meta.state_dict_metadata.items()
            if k not in sharded and k not in self.tensors
        ]

    def check_files(self, keys: list[str]) -> None:
        """Fail before reading if a shard file holding one of `keys` is missing or short."""
        sizes: dict[str, int | None] = {}
        problems: dict[str, list[str]] = {}
        for index, info in (self._dcp_meta.storage_data or {}).items():
            fqn = getattr(index, "fqn", None)
            if fqn not in keys:
                continue
            rel = info.relative_path
            if rel not in sizes:
                p = self.path / rel
                sizes[rel] = p.stat().st_size if p.is_file() else None
            size = sizes[rel]
            end = int(info.offset) + int(info.length)
            if size is None or size < end:
                problems.setdefault(rel, []).append(fqn)
        if problems:
            lines = []
            for rel, names in sorted(problems.items()):
                size = sizes[rel]
                state = "is missing" if size is None else f"is truncated ({size} bytes)"
                shown = ", ".join(sorted(set(names))[:4])
                more = f" and {len(set(names)) - 4} more" if len(set(names)) > 4 else ""
                lines.append(f"{self.path / rel} {state}: it should hold {shown}{more}")
            raise CheckpointReadError(
                "checkpoint shard files are incomplete (download them again):\n  " + "\n  ".join(lines)
            )

    def load(self, keys: list[str]) -> dict[str, Any]:
        """The full tensors of `keys` (model tensors only), on CPU in their stored dtype."""
        for k in keys:
            if k not in self._sharded:
                raise MegatronError(f"{self.path}: no model tensor {k!r}")
        self.check_files(keys)
        request = {k: self._sharded[k].without_data() for k in keys}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = self._dc.load(
                    request, str(self.path), common_strategy=self._common,
                    validate_access_integrity=False,
                )
        except Exception as exc:  # noqa: BLE001 - megatron/DCP raise many kinds
            raise CheckpointReadError(
                f"{self.path}: reading {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} "
                f"failed ({type(exc).__name__}: {_short(exc)}); a shard may be damaged: "
                f"download the checkpoint again"
            ) from None
        return {k: out[k] for k in keys}


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _make_common_strategy(base: type, path: Path, trust: bool):
    """A megatron-core common-load strategy that reads `common.pt` once, safely, and then
    hands megatron an empty dict (the per-group loads need only the tensors)."""

    class SafeCommonLoadStrategy(base):
        def __init__(self) -> None:
            super().__init__()
            self._loaded = False

        def load_common(self, checkpoint_dir):
            if self._loaded:
                return {}
            self._loaded = True
            return safe_torch_load(Path(checkpoint_dir) / COMMON, trust=trust)

    return SafeCommonLoadStrategy()


# ---- names ------------------------------------------------------------------------------

_PER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_STACKED = re.compile(r"^decoder\.layers\.([A-Za-z_].*)$")

GLOBAL_NAMES = {
    "embedding.word_embeddings.weight": "embed.weight",
    "decoder.final_layernorm.weight": "norm.weight",
    "output_layer.weight": "output.weight",
}
# Layer tensor (TE spec name, or local-spec alias) -> our name(s); "qkv"/"fc1" are split.
LAYER_NAMES: dict[str, tuple[str, ...]] = {
    "self_attention.linear_qkv.layer_norm_weight": ("attn_norm.weight",),
    "input_layernorm.weight": ("attn_norm.weight",),
    "self_attention.linear_qkv.weight": ("attn.wq.weight", "attn.wk.weight", "attn.wv.weight"),
    "self_attention.linear_qkv.bias": ("attn.wq.bias", "attn.wk.bias", "attn.wv.bias"),
    "self_attention.linear_proj.weight": ("attn.wo.weight",),
    "self_attention.linear_proj.bias": ("attn.wo.bias",),
    "mlp.linear_fc1.layer_norm_weight": ("mlp_norm.weight",),
    "pre_mlp_layernorm.weight": ("mlp_norm.weight",),
    "mlp.linear_fc1.weight_w": ("mlp.w_gate.weight",),
    "mlp.linear_fc1.bias_w": ("mlp.w_gate.bias",),
    "mlp.linear_fc1.weight_v": ("mlp.w_up.weight",),
    "mlp.linear_fc1.bias_v": ("mlp.w_up.bias",),
    # Megatron versions that keep the SwiGLU pair fused: [gate; up] along dim 0.
    "mlp.linear_fc1.weight": ("mlp.w_gate.weight", "mlp.w_up.weight"),
    "mlp.linear_fc1.bias": ("mlp.w_gate.bias", "mlp.w_up.bias"),
    "mlp.linear_fc2.weight": ("mlp.w_down.weight",),
    "mlp.linear_fc2.bias": ("mlp.w_down.bias",),
}


@dataclass(frozen=True)
class Arch:
    """The transformer shape as Megatron's training args describe it."""

    hidden: int
    layers: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    norm_eps: float
    rope_base: float
    seq_len: int

    @property
    def qkv_rows(self) -> int:
        return (self.heads + 2 * self.groups) * self.head_dim

    def layer_shape(self, tail: str) -> tuple[int, ...]:
        h, f = self.hidden, self.ffn
        shapes = {
            "self_attention.linear_qkv.layer_norm_weight": (h,),
            "input_layernorm.weight": (h,),
            "self_attention.linear_qkv.weight": (self.qkv_rows, h),
            "self_attention.linear_qkv.bias": (self.qkv_rows,),
            "self_attention.linear_proj.weight": (h, self.heads * self.head_dim),
            "self_attention.linear_proj.bias": (h,),
            "mlp.linear_fc1.layer_norm_weight": (h,),
            "pre_mlp_layernorm.weight": (h,),
            "mlp.linear_fc1.weight_w": (f, h),
            "mlp.linear_fc1.bias_w": (f,),
            "mlp.linear_fc1.weight_v": (f, h),
            "mlp.linear_fc1.bias_v": (f,),
            "mlp.linear_fc1.weight": (2 * f, h),
            "mlp.linear_fc1.bias": (2 * f,),
            "mlp.linear_fc2.weight": (h, f),
            "mlp.linear_fc2.bias": (h,),
        }
        return shapes[tail]

    def config(self, vocab: int) -> TransformerConfig:
        """Our config for this shape; `vocab`: the embedding's rows (the padded vocabulary)."""
        return TransformerConfig(
            vocab_size=vocab, hidden_size=self.hidden, num_layers=self.layers,
            num_heads=self.heads, num_kv_heads=self.groups, head_dim=self.head_dim,
            ffn_hidden_size=self.ffn, norm_eps=self.norm_eps, rope_base=self.rope_base,
            max_seq_len=max(self.seq_len, DEFAULT_MAX_SEQ_LEN), double_fc1_bias=True,
        )


def _arg(args: Any, name: str, default: Any = None) -> Any:
    return getattr(args, name, default)


def _enum_name(value: Any) -> str:
    """'rope' for a str, an Enum or an inert placeholder of one."""
    for attr in ("name", "value"):
        v = getattr(value, attr, None)
        if isinstance(v, str):
            return v
    return str(value)


def arch_from_args(args: Any, source: str) -> Arch:
    """Read and check the architecture from a Megatron args Namespace."""
    problems: list[str] = []

    def need(name: str) -> int:
        v = _arg(args, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            problems.append(f"args.{name} = {v!r} (expected a positive integer)")
            return 1
        return v

    hidden, layers, heads = need("hidden_size"), need("num_layers"), need("num_attention_heads")
    groups = heads
    if _arg(args, "group_query_attention", False):
        groups = need("num_query_groups")
    head_dim = _arg(args, "kv_channels") or (hidden // heads if heads else 0)
    ffn = _arg(args, "ffn_hidden_size") or 4 * hidden
    if heads % groups:
        problems.append(f"num_attention_heads {heads} is not a multiple of num_query_groups {groups}")
    for name, want, default in (
        ("normalization", "rmsnorm", "LayerNorm"),
        ("position_embedding_type", "rope", "learned_absolute"),
    ):
        got = _enum_name(_arg(args, name, default)).lower()
        if got != want and not (want == "rope" and got == "rotary"):
            problems.append(f"args.{name} = {got!r}; khala runs {want!r} models only")
    for name, want, absent in (  # (arg, what khala runs, Megatron's default when absent)
        ("swiglu", True, False),
        ("add_bias_linear", True, True),
        ("untie_embeddings_and_output_weights", True, False),
        ("rotary_interleaved", False, False),
        ("qk_layernorm", False, False),
        ("apply_layernorm_1p", False, False),  # norm weights stored as (gamma - 1)
        ("use_rope_scaling", False, False),  # Llama-3.1 style frequency scaling
    ):
        got = _arg(args, name, absent)
        got = absent if got is None else bool(got)
        if got != want:
            problems.append(f"args.{name} = {got}; khala runs models with {name} = {want}")
    rotary_percent = float(_arg(args, "rotary_percent", 1.0) or 1.0)
    if rotary_percent != 1.0:
        problems.append(f"args.rotary_percent = {rotary_percent}; khala runs rotary_percent 1.0")
    if problems:
        raise MegatronError(f"{source}: unsupported architecture:\n  " + "\n  ".join(problems))
    seq = max(int(_arg(args, "seq_length", 0) or 0), int(_arg(args, "max_position_embeddings", 0) or 0))
    return Arch(
        hidden=hidden, layers=layers, heads=heads, groups=groups, head_dim=int(head_dim),
        ffn=int(ffn), norm_eps=float(_arg(args, "norm_epsilon", 1e-5)),
        rope_base=float(_arg(args, "rotary_base", 10000)), seq_len=seq,
    )


@dataclass(frozen=True)
class Source:
    """Where one of our tensors comes from."""

    key: str  # Megatron tensor key
    layer: int | None  # layer index (per-layer key), or None
    stacked: bool  # key has a leading layer axis
    tail: str  # name inside a layer ("" for global tensors)


def plan_names(tensors: dict[str, TensorInfo], arch: Arch, source: str) -> tuple[dict[str, Source], int]:
    """Map every model tensor key to our names and check its shape before anything is read.

    Returns ({megatron key: Source}, vocab rows). Raises MegatronError naming every unmapped,
    misshapen, duplicated or missing tensor.
    """
    problems: list[str] = []
    plan: dict[str, Source] = {}
    provides: dict[str, str] = {}  # our name -> megatron key
    emb = tensors.get("embedding.word_embeddings.weight")
    vocab = emb.shape[0] if emb is not None and len(emb.shape) == 2 else 0
    for key, info in sorted(tensors.items()):
        src, want, problem = _source(key, info, arch, vocab)
        if problem:
            problems.append(problem)
            continue
        if info.shape != want:
            problems.append(f"{key} has shape {list(info.shape)}, expected {list(want)} (from common.pt args)")
        plan[key] = src
        for ours in _provided(src, arch):
            if ours in provides:
                problems.append(f"{key} and {provides[ours]} both provide {ours}")
            provides[ours] = key
    if vocab == 0:
        problems.append("embedding.word_embeddings.weight is missing (or not 2-D)")
    problems += _missing(provides, arch)
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise MegatronError(f"{source}: cannot map the checkpoint:\n  " + "\n  ".join(shown))
    return plan, vocab


def _source(key: str, info: TensorInfo, arch: Arch, vocab: int
            ) -> tuple[Source | None, tuple[int, ...], str | None]:
    """Where a Megatron key goes and the shape it must have, or why it cannot be mapped."""
    if key in GLOBAL_NAMES:
        want = (arch.hidden,) if key.endswith("layernorm.weight") else (vocab, arch.hidden)
        return Source(key, None, False, ""), want, None
    unknown = f"{key} (shape {list(info.shape)}) is not a tensor khala knows how to map"
    m = _PER_LAYER.match(key)
    if m:
        layer, tail, stacked = int(m.group(1)), m.group(2), False
    else:
        m = _STACKED.match(key)
        if not m:
            return None, (), unknown
        layer, tail, stacked = None, m.group(1), True
    if tail not in LAYER_NAMES:
        return None, (), unknown
    if layer is not None and layer >= arch.layers:
        return None, (), f"{key}: layer {layer} but args.num_layers = {arch.layers}"
    want = arch.layer_shape(tail)
    return Source(key, layer, stacked, tail), (arch.layers, *want) if stacked else want, None


def _provided(src: Source, arch: Arch) -> list[str]:
    """Our tensor names that one Megatron key provides."""
    if src.tail == "":
        return [GLOBAL_NAMES[src.key]]
    layers = range(arch.layers) if src.stacked else (src.layer,)
    return [f"layers.{i}.{ours}" for i in layers for ours in LAYER_NAMES[src.tail]]


def _missing(provides: dict[str, str], arch: Arch) -> list[str]:
    """The problem line listing our tensors that nothing in the checkpoint provides."""
    expected = set(GLOBAL_NAMES.values()) | {
        f"layers.{i}.{ours}" for i in range(arch.layers) for names in LAYER_NAMES.values() for ours in names
    }
    missing = sorted(expected - set(provides), key=_natural)
    if not missing:
        return []
    shown = [f"{m} (from {_megatron_name(m)})" for m in missing[:8]]
    more = f"\n    ... and {len(missing) - 8} more" if len(missing) > 8 else ""
    return ["missing tensors, nothing in the checkpoint provides:\n    " + "\n    ".join(shown) + more]


def _megatron_name(ours: str) -> str:
    """The (TE spec, per-layer) Megatron key that normally provides one of our tensors."""
    for key, name in GLOBAL_NAMES.items():
        if name == ours:
            return key
    layer, _, tail = ours[len("layers."):].partition(".")
    for mtail, names in LAYER_NAMES.items():
        if tail in names and mtail not in _ALIASES:
            return f"decoder.layers.{layer}.{mtail}"
    return "?"


_ALIASES = {"input_layernorm.weight", "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight",
            "mlp.linear_fc1.bias"}


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def convert_tensor(src: Source, tensor, arch: Arch, dtype) -> dict[str, Any]:
    """Our tensors from one loaded Megatron tensor (split QKV / fused fc1; unstack layers)."""
    if src.layer is None and not src.stacked:
        return {GLOBAL_NAMES[src.key]: tensor.to(dtype).contiguous()}
    out: dict[str, Any] = {}
    layers = range(arch.layers) if src.stacked else (src.layer,)
    for i in layers:
        t = tensor[i] if src.stacked else tensor
        for ours, piece in zip(LAYER_NAMES[src.tail], _split(src.tail, t, arch), strict=True):
            out[f"layers.{i}.{ours}"] = piece.to(dtype).contiguous()
    return out


def _split(tail: str, t, arch: Arch) -> list:
    if tail.startswith("self_attention.linear_qkv.") and tail != "self_attention.linear_qkv.layer_norm_weight":
        # Rows are grouped per KV group: [q x heads_per_group, k, v] x groups.
        per_group = arch.heads // arch.groups
        g = t.reshape(arch.groups, per_group + 2, arch.head_dim, *t.shape[1:])
        q = g[:, :per_group].reshape(arch.heads * arch.head_dim, *t.shape[1:])
        k = g[:, per_group].reshape(arch.groups * arch.head_dim, *t.shape[1:])
        v = g[:, per_group + 1].reshape(arch.groups * arch.head_dim, *t.shape[1:])
        return [q, k, v]
    if tail in ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias"):
        gate, up = t.chunk(2, dim=0)
        return [gate, up]
    return [t]
