"""Write tiny checkpoints in exactly the on-disk formats of the Khala download.

- Megatron `torch_dist`: `latest_checkpointed_iteration.txt`, `iter_XXXXXXX/` with DCP shards
  (`__0_0.distcp`, `.metadata`) written through megatron-core's own sharded-tensor save path
  (stacked layer tensors in per-layer chunks, as Megatron writes them), `common.pt` (training
  args Namespace with real Megatron enums, iteration, scheduler state...), `metadata.json`.
  Model tensors use the Transformer Engine layer-spec names, per layer or stacked with a
  leading layer axis; the shards also hold optimizer state (Adam moments, fp32 master
  copies), RNG state and TE `_extra_state` blobs, which a conversion must skip.
- Lightning DAC checkpoint: `state_dict` with `generator.encoder.*`, `generator.decoder.model.*`,
  `generator.quantizer.*` (codebooks with EMA buffers), `discriminator.*`, plus optimizer
  states, loops, callbacks and OmegaConf-style hyper-parameters.
- A tokenizer with the Llama-3.1 special-token names (byte-level, tiny).

megatron-core's `dist_checkpointing.save` wants CUDA, so the fixture runs the same steps on a
one-rank gloo group: ShardedTensor -> torch sharded tensor -> DCP with Megatron's save planner
(or, with writer="flat", a flat dict saved with torch DCP alone).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import types
import typing
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from khala_cli.engine.config import CodecConfig

ARCH = dict(hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
            kv_channels=8, ffn_hidden_size=48)
CODEC = CodecConfig(num_codebooks=4, codebook_size=16, latent_dim=8, n_filters=4,
                    rates=(2, 2), channels=2, sample_rate=8000, window_frames=48,
                    overlap_frames=12)

LLAMA_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
    "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]


# ---- tokenizer --------------------------------------------------------------------------


def write_tokenizer(path: Path, reserved: int = 16) -> Path:
    """A byte-level tokenizer (256 byte ids, no merges) + Llama-3.1 special-token names."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        LLAMA_SPECIALS + [f"<|reserved_special_token_{i}|>" for i in range(reserved)]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    (path.parent / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 131072}))
    return path


def text_vocab(tokenizer_json: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_json)).get_vocab_size(with_added_tokens=True)


# ---- Megatron ---------------------------------------------------------------------------


def megatron_args(vocab_size: int, seq_length: int = 256, **overrides) -> argparse.Namespace:
    """Training args as Megatron stores them in common.pt (the fields conversion reads, and
    some of the objects a real Namespace carries: dtypes and Megatron enums)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.enums import ModelType
        from megatron.core.transformer.enums import AttnBackend

    a = dict(ARCH)
    a.update(
        group_query_attention=True, normalization="RMSNorm", norm_epsilon=1e-6, swiglu=True,
        position_embedding_type="rope", rotary_base=500000, rotary_percent=1.0,
        rotary_interleaved=False, add_bias_linear=True, qk_layernorm=False,
        untie_embeddings_and_output_weights=True, seq_length=seq_length,
        max_position_embeddings=seq_length, vocab_size=vocab_size,
        padded_vocab_size=vocab_size, make_vocab_size_divisible_by=128,
        params_dtype=torch.bfloat16, bf16=True, fp16=False, main_grads_dtype=torch.float32,
        model_type=ModelType.encoder_or_decoder, attention_backend=AttnBackend.auto,
        transformer_impl="transformer_engine", ckpt_format="torch_dist",
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, iteration=0,
        data_path=["/data/khala/train"], lr=1e-4, seed=1234, load=None, save="/ckpt",
    )
    a.update(overrides)
    return argparse.Namespace(**a)


def megatron_model_tensors(args: argparse.Namespace, vocab_rows: int, *, seed: int = 0,
                           stacked: bool = False, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Random model tensors under Megatron's TE layer-spec names."""
    g = torch.Generator().manual_seed(seed)
    h, f = args.hidden_size, args.ffn_hidden_size
    qkv = (args.num_attention_heads + 2 * args.num_query_groups) * args.kv_channels
    proj_in = args.num_attention_heads * args.kv_channels

    def r(*shape, scale=0.2, base=0.0):
        return (base + scale * torch.randn(*shape, generator=g)).to(dtype)

    per_layer = {
        "self_attention.linear_qkv.layer_norm_weight": lambda: r(h, base=1.0, scale=0.1),
        "self_attention.linear_qkv.weight": lambda: r(qkv, h),
        "self_attention.linear_qkv.bias": lambda: r(qkv, scale=0.1),
        "self_attention.linear_proj.weight": lambda: r(h, proj_in),
        "self_attention.linear_proj.bias": lambda: r(h, scale=0.1),
        "mlp.linear_fc1.layer_norm_weight": lambda: r(h, base=1.0, scale=0.1),
        "mlp.linear_fc1.weight_w": lambda: r(f, h),
        "mlp.linear_fc1.bias_w": lambda: r(f, scale=0.1),
        "mlp.linear_fc1.weight_v": lambda: r(f, h),
        "mlp.linear_fc1.bias_v": lambda: r(f, scale=0.1),
        "mlp.linear_fc2.weight": lambda: r(h, f),
        "mlp.linear_fc2.bias": lambda: r(h, scale=0.1),
    }
    out = {"embedding.word_embeddings.weight": r(vocab_rows, h, scale=0.5)}
    for tail, make in per_layer.items():
        layers = [make() for _ in range(args.num_layers)]
        if stacked:
            out[f"decoder.layers.{tail}"] = torch.stack(layers)
        else:
            for i, t in enumerate(layers):
                out[f"decoder.layers.{i}.{tail}"] = t
    out["decoder.final_layernorm.weight"] = r(h, base=1.0, scale=0.1)
    out["output_layer.weight"] = r(vocab_rows, h, scale=0.5)
    return out


def unstack(tensors: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Per-layer view of (possibly stacked) Megatron tensors, for reference computations."""
    out = {}
    for k, v in tensors.items():
        tail = k[len("decoder.layers."):] if k.startswith("decoder.layers.") else None
        if tail is not None and not tail[0].isdigit():
            for i in range(num_layers):
                out[f"decoder.layers.{i}.{tail}"] = v[i]
        else:
            out[k] = v
    return out


def _bytes_blob(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def fuse_fc1(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The SwiGLU pair as Megatron keeps it without singleton local shards: one
    `linear_fc1.weight` / `.bias` of [gate; up] rows (stored as two chunks)."""
    out = {}
    for k, v in tensors.items():
        if k.endswith(("linear_fc1.weight_v", "linear_fc1.bias_v")):
            continue
        if k.endswith(("linear_fc1.weight_w", "linear_fc1.bias_w")):
            base = k[:-2]
            axis = 1 if not base.split("decoder.layers.")[1][0].isdigit() else 0
            out[base] = torch.cat([v, tensors[base + "_v"]], dim=axis)
        else:
            out[k] = v
    return out


def _sharded(key: str, t: torch.Tensor, num_layers: int) -> list:
    """Megatron ShardedTensors for one full tensor, chunked as Megatron saves it: a stacked
    layer tensor as one chunk per layer, a fused fc1 as a gate chunk and an up chunk."""
    from megatron.core.dist_checkpointing import ShardedTensor

    tail = key[len("decoder.layers."):] if key.startswith("decoder.layers.") else ""
    stacked = bool(tail) and not tail[0].isdigit()
    fused = key.endswith(("linear_fc1.weight", "linear_fc1.bias"))
    layers = range(num_layers) if stacked else [None]
    out = []
    for i in layers:
        part = t[i] if stacked else t
        prepend = [(0, i, num_layers)] if stacked else []
        n = len(prepend)
        if fused:
            for j, piece in enumerate(torch.chunk(part, 2, dim=0)):
                out.append(ShardedTensor.from_rank_offsets(
                    key, piece.contiguous(), *prepend, (n, j, 2), replica_id=0, prepend_axis_num=n))
        else:
            out.append(ShardedTensor.from_rank_offsets(
                key, part.contiguous(), *prepend, replica_id=0, prepend_axis_num=n))
    return out


def _write_with_megatron(it_dir: Path, entries: dict[str, object], num_layers: int) -> None:
    """megatron-core's own save path on CPU: ShardedTensors/ShardedObjects -> torch sharded
    tensors -> torch.distributed.checkpoint with Megatron's save planner (one gloo rank).
    (`dist_checkpointing.save` itself wants CUDA and worker processes.)"""
    from megatron.core.dist_checkpointing import ShardedObject
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    from khala_cli.weights.megatron import single_process_group

    sharded: dict[str, object] = {}
    for key, value in entries.items():
        if isinstance(value, ShardedObject):
            sharded[f"{value.key}@{value.global_offset}"] = value
        else:
            for j, sh in enumerate(_sharded(key, value, num_layers)):
                sharded[f"{key}#{j}"] = sh
    with single_process_group():
        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded)
        pyt = mcore_to_pyt_state_dict(flat, False)
        dcp.save(pyt, storage_writer=dcp.FileSystemWriter(str(it_dir)),
                 planner=MCoreSavePlanner(flatten_state_dict=False))


def write_megatron_checkpoint(root: Path, args: argparse.Namespace,
                              tensors: dict[str, torch.Tensor], *, iteration: int = 1000,
                              optimizer: bool = True, extra_state: bool = True,
                              common_extra: dict | None = None, writer: str = "megatron") -> Path:
    """A Megatron torch_dist checkpoint: returns the `iter_XXXXXXX` directory.

    writer="megatron": through megatron-core's sharded-tensor save path (chunked as Megatron
    chunks; TE _extra_state and RNG state as sharded objects); writer="flat": a flat dict of
    whole tensors and byte blobs saved with torch DCP alone."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.dist_checkpointing import ShardedObject
    it_dir = root / f"iter_{iteration:07d}"
    it_dir.mkdir(parents=True, exist_ok=True)
    layers = args.num_layers
    entries: dict[str, object] = dict(tensors)
    if optimizer:  # the bulk of a training checkpoint: Adam moments + fp32 master weights
        for k, v in tensors.items():
            for what in ("exp_avg", "exp_avg_sq", "fp32_param"):
                entries[f"optimizer.state.{what}.{k}"] = torch.full(v.shape, 7.0, dtype=torch.float32)
    blobs: dict[str, object] = {}
    if extra_state:  # TE _extra_state (FP8 metadata) per layer, and the RNG state
        for mod in ("self_attention.linear_qkv", "self_attention.linear_proj",
                    "self_attention.core_attention", "mlp.linear_fc1", "mlp.linear_fc2"):
            for i in range(layers):
                blobs[f"decoder.layers.{mod}._extra_state/shard_{i}_{layers}"] = ShardedObject(
                    f"decoder.layers.{mod}._extra_state", None, (layers,), (i,), replica_id=0)
        rng = [{"random_rng_state": (3, (1, 2), None), "torch_rng_state": torch.zeros(8, dtype=torch.uint8)}]
        blobs["rng_state/shard_0.0_1.1"] = ShardedObject("rng_state", rng, (1, 1), (0, 0), replica_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if writer == "megatron":
            entries.update(blobs)
            _write_with_megatron(it_dir, entries, layers)
        elif writer == "flat":
            for name, obj in blobs.items():
                entries[name] = _bytes_blob(obj.data)
            dcp.save(entries, storage_writer=dcp.FileSystemWriter(str(it_dir)), no_dist=True)
        else:
            raise ValueError(f"writer must be 'megatron' or 'flat', not {writer!r}")
    common = {
        "args": args, "checkpoint_version": 3.0, "iteration": iteration,
        "num_floating_point_operations_so_far": 1.5e18,
        "opt_param_scheduler": {"max_lr": 1e-4, "min_lr": 1e-5, "num_steps": iteration * 8,
                                "decay_style": "cosine"},
        "optimizer": {"param_state_sharding_type": "fully_sharded_model_space",
                      "optimizer": {"param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95),
                                                      "eps": 1e-8, "weight_decay": 0.1,
                                                      "params": [0, 1, 2]}]}},
        "content_metadata": {"singleton_local_shards": False, "distrib_optim_sharding_type":
                             "fully_sharded_model_space", "chained_optim_avoid_prefix": True},
    }
    common.update(common_extra or {})
    torch.save(common, it_dir / "common.pt")
    (it_dir / "metadata.json").write_text(json.dumps({
        "sharded_backend": "torch_dist", "sharded_backend_version": 1,
        "common_backend": "torch", "common_backend_version": 1,
    }))
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return it_dir


# ---- Lightning DAC ----------------------------------------------------------------------


def dac_generator_tensors(cfg: CodecConfig = CODEC, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """`generator.*` entries of the Lightning checkpoint (without the prefix)."""
    from khala_cli.engine.codec import build_decoder

    torch.manual_seed(seed)
    decoder = build_decoder(cfg)  # the dac Decoder as the reference builds it
    g = torch.Generator().manual_seed(seed + 1)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for k, v in decoder.state_dict().items():
            if k.endswith("alpha"):  # Snake alphas: not all ones, so a mix-up would show
                v = 0.5 + torch.rand(v.shape, generator=g)
            out[f"decoder.{k}"] = v.clone()
    # A little of the encoder (not needed for decoding; a conversion skips it).
    out["encoder.block.0.weight_g"] = torch.randn(4, 1, 1, generator=g)
    out["encoder.block.0.weight_v"] = torch.randn(4, cfg.channels, 7, generator=g)
    out["encoder.block.0.bias"] = torch.randn(4, generator=g)
    for i in range(cfg.num_codebooks):
        embed = torch.randn(cfg.codebook_size, cfg.latent_dim, generator=g)
        p = f"quantizer.vq_layer_{i}._codebook."
        out[p + "inited"] = torch.tensor([1.0])
        out[p + "cluster_size"] = torch.rand(cfg.codebook_size, generator=g)
        out[p + "embed"] = embed
        out[p + "embed_avg"] = embed * 0.9
        out[f"quantizer.embed_{i}"] = embed  # the same parameter, registered twice
    return out


class _FakeModule(types.ModuleType):
    pass


@contextlib.contextmanager
def fake_omegaconf():
    """Classes named like OmegaConf's, importable only while pickling (omegaconf is not a
    dependency): a checkpoint written with them holds the same globals a real one does."""
    names = ["omegaconf", "omegaconf.dictconfig", "omegaconf.base", "omegaconf.nodes"]
    saved = {n: sys.modules.get(n) for n in names}
    mods = {n: _FakeModule(n) for n in names}

    class ContainerMetadata:
        pass

    class DictConfig:
        pass

    class AnyNode:
        pass

    for cls, mod in ((ContainerMetadata, "omegaconf.base"), (DictConfig, "omegaconf.dictconfig"),
                     (AnyNode, "omegaconf.nodes")):
        cls.__module__ = mod
        cls.__qualname__ = cls.__name__
        setattr(mods[mod], cls.__name__, cls)
    sys.modules.update(mods)
    try:
        yield DictConfig, ContainerMetadata, AnyNode
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def _omegaconf_like(cfg: CodecConfig, classes):
    DictConfig, ContainerMetadata, AnyNode = classes

    def meta():
        m = ContainerMetadata()
        m.__dict__.update(ref_type=typing.Any, object_type=dict, optional=True, key=None,
                          flags={}, key_type=typing.Any, element_type=typing.Any)
        return m

    def node(value):
        n = AnyNode()
        n.__dict__.update(_val=value, _metadata=meta(), _parent=None)
        return n

    dc = DictConfig()
    dc.__dict__.update(_metadata=meta(), _parent=None, _content={
        "decoder": node({"d_latent": cfg.latent_dim, "n_filters": cfg.n_filters,
                         "rates": list(cfg.rates), "out_channel": cfg.channels}),
        "quantizer": node({"codebook_size": cfg.codebook_size,
                           "num_quantizers": cfg.num_codebooks}),
    })
    return dc


def write_lightning_checkpoint(path: Path, generator: dict[str, torch.Tensor],
                               cfg: CodecConfig = CODEC, *, extra: dict | None = None,
                               omegaconf_hparams: bool = True) -> Path:
    """A Lightning checkpoint as the reference's DAC training wrote it."""
    g = torch.Generator().manual_seed(99)
    state = OrderedDict((f"generator.{k}", v) for k, v in generator.items())
    state["discriminator.mpd.0.convs.0.weight"] = torch.randn(4, 1, 5, 1, generator=g)
    state["discriminator.mpd.0.convs.0.bias"] = torch.randn(4, generator=g)
    ckpt = {
        "epoch": 411, "global_step": 2490000, "pytorch-lightning_version": "2.1.3",
        "state_dict": state,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 412}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None, 'mode': 'min'}": {
            "best_model_score": None, "best_model_path": "/ckpt/dac_rvq_2480000.ckpt",
            "dirpath": "/ckpt", "last_model_path": ""}},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(2490000.0),
                                            "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}},
                              "param_groups": [{"lr": 1e-4, "betas": (0.8, 0.99), "eps": 1e-8,
                                                "weight_decay": 0.0, "params": [0]}]}],
        "lr_schedulers": [{"gamma": 0.999996, "base_lrs": [1e-4], "last_epoch": 2490000}],
        "hparams_name": "configs",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    if omegaconf_hparams:
        with fake_omegaconf() as classes:
            ckpt["hyper_parameters"] = {"configs": _omegaconf_like(cfg, classes)}
            ckpt.update(extra or {})
            torch.save(ckpt, path)
    else:
        ckpt["hyper_parameters"] = {}
        ckpt.update(extra or {})
        torch.save(ckpt, path)
    return path


# ---- objects that must never be unpickled by default -------------------------------------

MARKER_ENV = "KHALA_TEST_PICKLE_MARKER"


def _touch_marker(path: str) -> str:
    Path(path).write_text("unpickled")
    return path


class RunsCodeOnLoad:
    """Unpickling this calls `_touch_marker` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch_marker, (self.marker,))


# ---- a whole download -------------------------------------------------------------------


def write_raw_download(root: Path, *, tokenizer_json: Path | None = None, codec: CodecConfig = CODEC,
                       seed: int = 0, stacked: bool = False, fused_fc1: bool = False,
                       writer: str = "megatron", vocab_padding: int = 5,
                       backbone_args: dict | None = None, superres_args: dict | None = None,
                       dac_extra: dict | None = None) -> dict:
    """The download's layout: checkpoints/{backbone,superresolution}/ (Megatron),
    checkpoints/dac_rvq_2490000.ckpt (Lightning), models/Tokenizer/tokenizer.json.

    Returns the raw tensors and args written, for reference computations."""
    tok = root / "models" / "Tokenizer" / "tokenizer.json"
    if tokenizer_json is None:
        write_tokenizer(tok)
    else:
        tok.parent.mkdir(parents=True, exist_ok=True)
        tok.write_bytes(Path(tokenizer_json).read_bytes())
    n_text = text_vocab(tok)
    vocabs = {
        "backbone": n_text + 2 * codec.codebook_size,
        "superresolution": n_text + codec.num_codebooks * codec.codebook_size,
    }
    out: dict = {"tokenizer": tok, "text_vocab": n_text}
    for i, (name, vocab) in enumerate(vocabs.items()):
        rows = vocab + vocab_padding  # Megatron pads the vocabulary
        overrides = (backbone_args if name == "backbone" else superres_args) or {}
        args = megatron_args(vocab, **{"padded_vocab_size": rows, **overrides})
        tensors = megatron_model_tensors(args, rows, seed=seed + 10 * i, stacked=stacked)
        stored = fuse_fc1(tensors) if fused_fc1 else tensors
        write_megatron_checkpoint(root / "checkpoints" / name, args, stored,
                                  iteration=1000 * (i + 1), writer=writer)
        out[name] = {"args": args, "tensors": tensors, "rows": rows}
    gen = dac_generator_tensors(codec, seed=seed)
    write_lightning_checkpoint(root / "checkpoints" / "dac_rvq_2490000.ckpt", gen, codec,
                               extra=dac_extra)
    out["generator"] = gen
    return out
