"""`khala convert`: the Khala download (Megatron + Lightning checkpoints) -> a model directory.

    SRC/checkpoints/backbone/             Megatron torch_dist  -> backbone.safetensors (bf16)
    SRC/checkpoints/superresolution/      Megatron torch_dist  -> superres.safetensors (bf16)
    SRC/checkpoints/dac_rvq_*.ckpt        Lightning            -> codec.safetensors (fp32)
    SRC/models/Tokenizer/tokenizer.json                        -> tokenizer.json

(SRC may also be the `checkpoints/` directory itself.) Tensors are read one group at a time
(a layer, or one stacked tensor) and cast to bf16 as they arrive, so the peak memory is one
converted transformer plus one group; optimizer state is never read. The directory is
written under a temporary name beside DST and renamed into place only when complete.

Run as `python -m khala_cli.weights.convert SRC [DST] [--iteration N] [--trust-checkpoint]`
(what `khala render --convert` runs in a child process).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Bars

from khala_cli.engine.config import CodecConfig, ModelInfo, TransformerConfig
from khala_cli.weights.megatron import (
    MegatronCheckpoint,
    MegatronError,
    arch_from_args,
    convert_tensor,
    plan_names,
    single_process_group,
)
from khala_cli.weights.resolve import default_destination
from khala_cli.weights.safe_load import CheckpointReadError, UnsafeCheckpointError, safe_torch_load

# torch and engine.modeldir (which imports torch) are imported inside the functions that
# convert: cli/models imports this module in the parent, which never loads torch.

# (stage, done, total, unit) -> None; stages: backbone, superres, codec, writing
Progress = Callable[[str, int, int, str], None]

TRANSFORMER_DIRS = {
    "backbone": ("backbone",),
    "superres": ("superresolution", "superres", "super_resolution"),
}
DEFAULT_MAX_SEQ_LEN = TransformerConfig.__dataclass_fields__["max_seq_len"].default


class ConvertError(Exception):
    """Conversion cannot go on; the message names the file or tensor and what to do."""


@dataclass
class Sources:
    root: Path
    backbone: Path
    superres: Path
    codec: Path
    tokenizer: Path


@dataclass
class ConvertReport:
    info: ModelInfo
    model_dir: Path
    seconds: float
    iterations: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)  # stage -> entries not read


def find_sources(src: str | Path, tokenizer: str | Path | None = None) -> Sources:
    """Locate the three checkpoints and the tokenizer in a download."""
    root = Path(src).expanduser().resolve()
    if not root.is_dir():
        raise ConvertError(f"{root}: no such directory")
    ckpt = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    found: dict[str, Path] = {}
    for stage, names in TRANSFORMER_DIRS.items():
        for n in names:
            if (ckpt / n).is_dir():
                found[stage] = ckpt / n
                break
        else:
            raise ConvertError(
                f"{ckpt}: no {names[0]}/ checkpoint directory: is this the Khala download "
                f"(it holds checkpoints/backbone/, checkpoints/superresolution/ and "
                f"checkpoints/dac_rvq_*.ckpt)?"
            )
    ckpts = sorted(ckpt.glob("dac_rvq_*.ckpt")) or sorted(ckpt.glob("*.ckpt"))
    if not ckpts:
        raise ConvertError(f"{ckpt}: no decoder checkpoint (dac_rvq_*.ckpt)")
    if len(ckpts) > 1:
        raise ConvertError(
            f"{ckpt}: several decoder checkpoints ({', '.join(p.name for p in ckpts)}): "
            f"keep the one to convert"
        )
    return Sources(root=root, backbone=found["backbone"], superres=found["superres"],
                   codec=ckpts[0], tokenizer=find_tokenizer(root, ckpt, tokenizer))


def find_tokenizer(root: Path, ckpt: Path, given: str | Path | None) -> Path:
    if given is not None:
        p = Path(given).expanduser().resolve()
        p = p / "tokenizer.json" if p.is_dir() else p
        if not p.is_file():
            raise ConvertError(f"--tokenizer {given}: no tokenizer.json there")
        return p
    candidates = [
        root / "models" / "Tokenizer" / "tokenizer.json",
        root / "tokenizer" / "tokenizer.json",
        root / "Tokenizer" / "tokenizer.json",
        root / "tokenizer.json",
        ckpt / "tokenizer.json",
        root.parent / "models" / "Tokenizer" / "tokenizer.json",
    ]
    for p in candidates:
        if p.is_file():
            return p
    raise ConvertError(
        f"{root}: no tokenizer.json (looked in models/Tokenizer/, tokenizer/ and the top "
        f"level): pass --tokenizer PATH (the models/Tokenizer/ folder of the Khala repository)"
    )


# ---- transformers -----------------------------------------------------------------------


def convert_transformer(path: Path, stage: str, *, iteration: int | None, trust: bool,
                        progress: Progress | None = None) -> tuple[TransformerConfig, dict, dict]:
    """(config, our tensors in bf16, facts) from one Megatron checkpoint directory."""
    import torch

    ck = MegatronCheckpoint(path, iteration, trust=trust)
    source = str(ck.path)
    arch = arch_from_args(ck.args, f"{ck.path / 'common.pt'} (args)")
    plan, vocab = plan_names(ck.tensors, arch, source)
    config = TransformerConfig(
        vocab_size=vocab, hidden_size=arch.hidden, num_layers=arch.layers,
        num_heads=arch.heads, num_kv_heads=arch.groups, head_dim=arch.head_dim,
        ffn_hidden_size=arch.ffn, norm_eps=arch.norm_eps, rope_base=arch.rope_base,
        max_seq_len=max(arch.seq_len, DEFAULT_MAX_SEQ_LEN), double_fc1_bias=True,
    )
    ck.check_files(list(plan))  # a short or missing shard fails before any work
    groups = _groups(plan)
    total = sum(ck.tensors[k].nbytes for k in plan)
    done = 0
    out: dict[str, Any] = {}
    if progress:
        progress(stage, 0, total, "B")
    for keys in groups:
        loaded = ck.load(keys)
        for k in keys:
            t = loaded.pop(k)
            out.update(convert_tensor(plan[k], t, arch, torch.bfloat16))
            del t
            done += ck.tensors[k].nbytes
        if progress:
            progress(stage, done, total, "B")
    facts = {"iteration": ck.iteration, "skipped": len(ck.skipped), "path": source}
    return config, out, facts


def _groups(plan: dict) -> list[list[str]]:
    """Read order: embedding, each layer's tensors together, stacked tensors one by one,
    then the final norm and output layer."""
    first = [k for k in plan if k.startswith("embedding.")]
    per_layer: dict[int, list[str]] = {}
    stacked, last = [], []
    for k, src in plan.items():
        if k in first:
            continue
        if src.layer is not None:
            per_layer.setdefault(src.layer, []).append(k)
        elif src.stacked:
            stacked.append(k)
        else:
            last.append(k)
    groups = [[k] for k in first]
    groups += [sorted(per_layer[i]) for i in sorted(per_layer)]
    groups += [[k] for k in sorted(stacked)]
    groups += [[k] for k in sorted(last)]
    return groups


# ---- codec ------------------------------------------------------------------------------

_VQ = re.compile(r"^quantizer\.vq_layer_(\d+)\._codebook\.(embed|embed_avg|cluster_size|inited)$")
_VQ_ALIAS = re.compile(r"^quantizer\.embed_(\d+)$")


def convert_codec(path: Path, *, trust: bool, progress: Progress | None = None
                  ) -> tuple[CodecConfig, dict, dict]:
    """(CodecConfig, {codebooks, decoder.*} in fp32, facts) from the Lightning checkpoint."""
    import torch

    from khala_cli.engine.modeldir import codec_shapes, shape_diff

    if progress:
        progress("codec", 0, 3, "steps")
    ckpt = safe_torch_load(path, trust=trust, mmap=True)
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ConvertError(f"{path}: not a Lightning checkpoint (no state_dict)")
    gen = {k[len("generator."):]: v for k, v in state.items() if k.startswith("generator.")}
    if not gen:
        raise ConvertError(f"{path}: no generator.* entries in state_dict: not the DAC RVQ checkpoint")
    if progress:
        progress("codec", 1, 3, "steps")
    decoder: dict[str, Any] = {}
    books: dict[int, Any] = {}
    unmapped: list[str] = []
    skipped = 0
    for k, v in gen.items():
        if k.startswith("decoder."):
            decoder[k] = v
        elif k.startswith("encoder."):
            skipped += 1
        elif m := _VQ.match(k):
            if m.group(2) == "embed":
                books[int(m.group(1))] = v
            else:
                skipped += 1
        elif _VQ_ALIAS.match(k):
            skipped += 1  # the same tensor as vq_layer_i._codebook.embed
        else:
            unmapped.append(f"generator.{k} (shape {list(getattr(v, 'shape', []))})")
    if unmapped:
        raise ConvertError(f"{path}: tensors khala does not know how to map:\n  " + "\n  ".join(unmapped[:20]))
    n = len(books)
    if n == 0 or sorted(books) != list(range(n)):
        missing = sorted(set(range(max(books, default=-1) + 1)) - set(books))
        raise ConvertError(
            f"{path}: codebooks missing: "
            + (", ".join(f"generator.quantizer.vq_layer_{i}._codebook.embed" for i in missing)
               if missing else "no generator.quantizer.vq_layer_*._codebook.embed")
        )
    shapes = {tuple(b.shape) for b in books.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ConvertError(f"{path}: codebooks have differing or non-2-D shapes {sorted(shapes)}")
    codebook_size, latent = next(iter(shapes))
    config = _codec_config(path, decoder, n, codebook_size, latent)
    out = {"codebooks": torch.stack([books[i].float() for i in range(n)]).contiguous()}
    for k, v in decoder.items():
        out[k] = v.float().clone()
    expected = codec_shapes(config)
    missing, unmapped, misshaped = shape_diff({k: tuple(v.shape) for k, v in out.items()}, expected)
    problems = [f"missing tensor generator.{k} (expected shape {list(expected[k])})"
                for k in missing]
    problems += [f"unmapped tensor generator.{k} (shape {list(out[k].shape)})" for k in unmapped]
    problems += [f"generator.{k} has shape {list(out[k].shape)}, expected {list(expected[k])}"
                 for k in misshaped if k != "codebooks"]
    if problems:
        raise ConvertError(f"{path}: the decoder does not match a DAC decoder of "
                           f"{_describe(config)}:\n  " + "\n  ".join(problems[:20]))
    del ckpt, state, gen
    if progress:
        progress("codec", 3, 3, "steps")
    return config, out, {"path": str(path), "skipped": skipped}


def _codec_config(path: Path, dec: dict, n: int, codebook_size: int, latent: int) -> CodecConfig:
    """The decoder's shape, read off its tensors (dac Decoder layout: conv, blocks, snake, conv)."""
    first = dec.get("decoder.model.0.weight_v")
    if first is None or first.dim() != 3:
        raise ConvertError(f"{path}: missing tensor generator.decoder.model.0.weight_v")
    channels0 = int(first.shape[0])
    if int(first.shape[1]) != latent:
        raise ConvertError(
            f"{path}: generator.decoder.model.0.weight_v takes {first.shape[1]} latent channels "
            f"but the codebooks have dimension {latent}"
        )
    rates = []
    i = 1
    while f"decoder.model.{i}.block.1.weight_v" in dec:
        kernel = int(dec[f"decoder.model.{i}.block.1.weight_v"].shape[-1])
        rates.append(kernel // 2)
        i += 1
    if not rates:
        raise ConvertError(f"{path}: no decoder blocks (generator.decoder.model.1.block.*)")
    last = dec.get(f"decoder.model.{i + 1}.weight_v")
    if last is None:
        raise ConvertError(f"{path}: missing tensor generator.decoder.model.{i + 1}.weight_v (final conv)")
    if channels0 % (2 ** len(rates)):
        raise ConvertError(f"{path}: first conv has {channels0} channels, not divisible by 2^{len(rates)}")
    return CodecConfig(
        num_codebooks=n, codebook_size=int(codebook_size), latent_dim=int(latent),
        n_filters=channels0 // 2 ** len(rates), rates=tuple(rates), channels=int(last.shape[0]),
    )


def _describe(c: CodecConfig) -> str:
    return f"latent {c.latent_dim}, {c.n_filters} filters, rates {list(c.rates)}, {c.channels} channels"


# ---- the whole conversion ---------------------------------------------------------------


def estimate_output_bytes(sources: Sources) -> int:
    """Rough size of the model directory: bf16 transformers (~ 1/8 of a checkpoint holding fp32
    Adam moments and master weights) + the decoder; only used to check the free disk space."""
    total = 0
    for d in (sources.backbone, sources.superres):
        total += sum(p.stat().st_size for p in d.rglob("*.distcp")) // 7
    return total + sources.codec.stat().st_size // 4


def parse_iteration(value: int | str | dict | None) -> dict[str, int]:
    """`--iteration`: N (both checkpoints) or `backbone=N,superres=M` (either or both)."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return {k: int(v) for k, v in value.items()}
    if isinstance(value, int):
        return {"backbone": value, "superres": value}
    text = str(value).strip()
    if text.isdigit():
        return {"backbone": int(text), "superres": int(text)}
    out: dict[str, int] = {}
    for part in text.split(","):
        stage, sep, num = part.partition("=")
        stage = {"superresolution": "superres"}.get(stage.strip(), stage.strip())
        if not sep or stage not in TRANSFORMER_DIRS or not num.strip().isdigit():
            raise ConvertError(
                f"--iteration {value}: expected a number, or backbone=N,superres=M"
            )
        out[stage] = int(num)
    return out


def convert(src: str | Path, dst: str | Path | None = None, *,
            iteration: int | str | dict | None = None,
            trust: bool = False, tokenizer: str | Path | None = None, name: str | None = None,
            progress: Progress | None = None) -> ConvertReport:
    """Convert the download at `src` into a model directory at `dst` (default: `<src>-khala`).

    Raises ConvertError (or MegatronError / UnsafeCheckpointError / CheckpointReadError, all
    with a message for people) and then leaves nothing behind at `dst`."""
    import torch

    from khala_cli.engine import modeldir

    t0 = time.monotonic()
    its = parse_iteration(iteration)
    sources = find_sources(src, tokenizer)
    final = Path(dst).expanduser().resolve() if dst else default_destination(sources.root)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise ConvertError(f"{final} already exists: remove it or choose another destination")
    final.parent.mkdir(parents=True, exist_ok=True)
    need = estimate_output_bytes(sources)
    free = shutil.disk_usage(final.parent).free
    if free < need:
        raise ConvertError(
            f"{final.parent}: {free / 1e9:.1f} GB free, the model directory needs about "
            f"{need / 1e9:.1f} GB: free some space or choose another destination"
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    iterations: dict[str, Any] = {}
    skipped: dict[str, int] = {}
    written = 0
    try:
        with single_process_group():
            for stage, path in (("backbone", sources.backbone), ("superres", sources.superres)):
                config, tensors, facts = convert_transformer(
                    path, stage, iteration=its.get(stage), trust=trust, progress=progress,
                )
                iterations[stage] = facts["iteration"]
                skipped[stage] = facts["skipped"]
                modeldir.write_component(tmp, stage, config, tensors, dtype=torch.bfloat16)
                written += 1
                if progress:
                    progress("writing", written, 4, f"{stage}.safetensors")
                del tensors
        codec_cfg, codec_tensors, facts = convert_codec(sources.codec, trust=trust, progress=progress)
        skipped["codec"] = facts["skipped"]
        modeldir.write_component(tmp, "codec", codec_cfg, codec_tensors, dtype=torch.float32)
        del codec_tensors
        if progress:
            progress("writing", 3, 4, "codec.safetensors")
        source = (
            f"{sources.root} (backbone iter {iterations['backbone']}, superres iter "
            f"{iterations['superres']}, decoder {sources.codec.name})"
        )
        info = modeldir.finish_model_dir(
            tmp, final, name=name or final.name, demo=False, source=source,
            num_quantizers=codec_cfg.num_codebooks, codebook_size=codec_cfg.codebook_size,
            tokenizer_src=sources.tokenizer,
        )
        if progress:
            progress("writing", 4, 4, "model.json, tokenizer.json")
    except modeldir.ModelDirError as exc:
        raise ConvertError(str(exc)) from None
    except OSError as exc:  # a full disk, a permission: say which file
        raise ConvertError(f"conversion failed: {exc}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ConvertReport(info=info, model_dir=final, seconds=time.monotonic() - t0,
                         iterations=iterations, skipped=skipped)


CONVERT_ERRORS = (ConvertError, MegatronError, UnsafeCheckpointError, CheckpointReadError)


# ---- progress bars ----------------------------------------------------------------------


class RichProgress:
    """One rich progress bar per stage: backbone, super-res (bytes read), decoder, writing."""

    STAGES = {"backbone": "backbone", "superres": "super-res", "codec": "decoder",
              "writing": "writing"}

    def __init__(self, console=None):
        self._progress = Bars(
            TextColumn("{task.description:<10}"), BarColumn(),
            TextColumn("{task.fields[amount]:>22}"), TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(), console=console, transient=False,
        )
        self._tasks = {
            stage: self._progress.add_task(label, total=1, start=False, visible=False,
                                           amount="", note="")
            for stage, label in self.STAGES.items()
        }

    def __enter__(self) -> RichProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def __call__(self, stage: str, done: int, total: int, unit: str) -> None:
        task = self._tasks.get(stage)
        if task is None:
            return
        if not self._progress.tasks[task].started:
            self._progress.start_task(task)
            self._progress.update(task, visible=True)
        if unit == "B":
            amount, note = f"{done / 2**20:,.1f}/{total / 2**20:,.1f} MiB", ""
        else:
            amount, note = f"{done}/{total}", "" if unit == "steps" else unit
        self._progress.update(task, completed=done, total=max(total, 1), amount=amount, note=note)
        if done >= total:
            self._progress.stop_task(task)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m khala_cli.weights.convert",
                                description="Convert the Khala download into a khala model directory.")
    p.add_argument("src")
    p.add_argument("dst", nargs="?")
    p.add_argument("--iteration", help="N, or backbone=N,superres=M (default: the latest)")
    p.add_argument("--tokenizer")
    p.add_argument("--name")
    p.add_argument("--trust-checkpoint", action="store_true")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    try:
        if a.quiet:
            report = convert(a.src, a.dst, iteration=a.iteration, trust=a.trust_checkpoint,
                             tokenizer=a.tokenizer, name=a.name)
        else:
            with RichProgress() as bars:
                report = convert(a.src, a.dst, iteration=a.iteration, trust=a.trust_checkpoint,
                                 tokenizer=a.tokenizer, name=a.name, progress=bars)
    except CONVERT_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print(f"converted into {report.model_dir} (fingerprint {report.info.fingerprint[:12]}) "
          f"in {report.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    sys.exit(main())
