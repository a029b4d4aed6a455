"""`khala convert`: either download of the Khala weights -> a model directory.

The official download (Megatron + Lightning checkpoints; needs megatron-core):

    SRC/checkpoints/backbone/             Megatron torch_dist  -> backbone.safetensors (bf16)
    SRC/checkpoints/superresolution/      Megatron torch_dist  -> superres.safetensors (bf16)
    SRC/checkpoints/dac_rvq_*.ckpt        Lightning            -> codec.safetensors (fp32)
    SRC/models/Tokenizer/tokenizer.json                        -> tokenizer.json

(SRC may also be the `checkpoints/` directory itself.) The Khala-mac download (the same
weights as safetensors, read by `khala_mac`; no megatron-core):

    SRC/khala_backbone.safetensors + backbone_megatron_args.json  -> backbone.safetensors
    SRC/khala_superres.safetensors + superres_megatron_args.json  -> superres.safetensors
    SRC/decoder_weights.pt (checked against decoder_config.yaml)  -> codec.safetensors
    no tokenizer: looked for beside it (a Khala checkout's models/Tokenizer/), or --tokenizer

Both give the same model directory, bit for bit, from the same weights. Tensors are read one
group at a time (a layer, a stacked tensor, or one tensor) and cast to bf16 as they arrive,
so the peak memory is one converted transformer plus one group; optimizer state is never
read. The directory is written under a temporary name beside DST and renamed into place
only when complete.

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
from khala_cli.weights import khala_mac
from khala_cli.weights.khala_mac import KhalaMacError
from khala_cli.weights.megatron import (
    MegatronCheckpoint,
    MegatronError,
    arch_from_args,
    convert_tensor,
    plan_names,
    single_process_group,
)
from khala_cli.weights.resolve import (
    KHALA_MAC,
    KHALA_MAC_FILES,
    MEGATRON,
    MIXED,
    TRANSFORMER_DIRS,
    default_destination,
    find_download,
    mixed_message,
)
from khala_cli.weights.safe_load import CheckpointReadError, UnsafeCheckpointError, safe_torch_load

# torch and engine.modeldir (which imports torch) are imported inside the functions that
# convert: cli/models imports this module in the parent, which never loads torch.

# (stage, done, total, unit) -> None; stages: backbone, superres, codec, writing
Progress = Callable[[str, int, int, str], None]


class ConvertError(Exception):
    """Conversion cannot go on; the message names the file or tensor and what to do."""


@dataclass
class Sources:
    """Where a download's parts are. Megatron: checkpoint directories and the Lightning file;
    Khala-mac: the safetensors files and decoder_weights.pt, with `args` and `codec_config`."""

    root: Path
    backbone: Path
    superres: Path
    codec: Path
    tokenizer: Path
    layout: str = MEGATRON
    args: dict[str, Path] = field(default_factory=dict)  # stage -> *_megatron_args.json
    codec_config: Path | None = None  # decoder_config.yaml


@dataclass
class ConvertReport:
    info: ModelInfo
    model_dir: Path
    seconds: float
    layout: str = MEGATRON
    iterations: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)  # stage -> entries not read


def find_sources(src: str | Path, tokenizer: str | Path | None = None) -> Sources:
    """Locate the parts of a download (either layout) and the tokenizer."""
    root = Path(src).expanduser().resolve()
    if not root.is_dir():
        raise ConvertError(f"{root}: no such directory")
    found = find_download(root)
    if found is not None and found.layout == MIXED:
        raise ConvertError(mixed_message(root, found))
    if found is not None and found.layout == KHALA_MAC:
        return _khala_mac_sources(root, found.khala_mac, tokenizer)
    ckpt = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    dirs: dict[str, Path] = {}
    for stage, names in TRANSFORMER_DIRS.items():
        for n in names:
            if (ckpt / n).is_dir():
                dirs[stage] = ckpt / n
                break
        else:
            raise ConvertError(
                f"{ckpt}: no {names[0]}/ checkpoint directory: is this a Khala download? The "
                f"official one holds checkpoints/backbone/, checkpoints/superresolution/ and "
                f"checkpoints/dac_rvq_*.ckpt; the Khala-mac one {', '.join(KHALA_MAC_FILES)}"
            )
    ckpts = sorted(ckpt.glob("dac_rvq_*.ckpt")) or sorted(ckpt.glob("*.ckpt"))
    if not ckpts:
        raise ConvertError(f"{ckpt}: no decoder checkpoint (dac_rvq_*.ckpt)")
    if len(ckpts) > 1:
        raise ConvertError(
            f"{ckpt}: several decoder checkpoints ({', '.join(p.name for p in ckpts)}): "
            f"keep the one to convert"
        )
    return Sources(root=root, backbone=dirs["backbone"], superres=dirs["superres"],
                   codec=ckpts[0], tokenizer=find_tokenizer(root, ckpt, tokenizer))


def _khala_mac_sources(root: Path, folder: Path, tokenizer: str | Path | None) -> Sources:
    files = khala_mac.find_files(folder)
    tok = find_tokenizer(root, folder, tokenizer, note=(
        "the Khala-mac download holds no tokenizer (Khala-mac reads models/Tokenizer/ from "
        "its own checkout)"))
    return Sources(
        root=root, layout=KHALA_MAC, tokenizer=tok,
        backbone=files[khala_mac.WEIGHTS["backbone"]], superres=files[khala_mac.WEIGHTS["superres"]],
        codec=files[khala_mac.DECODER_WEIGHTS], codec_config=files[khala_mac.DECODER_CONFIG],
        args={stage: files[name] for stage, name in khala_mac.ARGS.items()},
    )


def find_tokenizer(root: Path, ckpt: Path, given: str | Path | None, note: str = "") -> Path:
    """--tokenizer, else the first tokenizer.json in the places a download or a checkout
    keeps it; `note` says why the download itself may hold none."""
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
    looked = ", ".join(dict.fromkeys(str(p.parent) for p in candidates))
    raise ConvertError(
        f"{root}: no tokenizer.json{f': {note}' if note else ''}. Looked in {looked}. Pass "
        f"--tokenizer PATH (the models/Tokenizer/ folder of the Khala repository)"
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
    config = arch.config(vocab)
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


def lightning_generator(path: Path, *, trust: bool) -> dict[str, Any]:
    """The `generator.*` entries of the Lightning DAC checkpoint, prefix stripped."""
    ckpt = safe_torch_load(path, trust=trust, mmap=True)
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ConvertError(f"{path}: not a Lightning checkpoint (no state_dict)")
    gen = {k[len("generator."):]: v for k, v in state.items() if k.startswith("generator.")}
    if not gen:
        raise ConvertError(f"{path}: no generator.* entries in state_dict: not the DAC RVQ checkpoint")
    return gen


def convert_codec(path: Path, *, trust: bool, progress: Progress | None = None
                  ) -> tuple[CodecConfig, dict, dict]:
    """(CodecConfig, {codebooks, decoder.*} in fp32, facts) from the Lightning checkpoint."""
    if progress:
        progress("codec", 0, 3, "steps")
    gen = lightning_generator(path, trust=trust)
    if progress:
        progress("codec", 1, 3, "steps")
    out = codec_from_generator(gen, path, prefix="generator.")
    if progress:
        progress("codec", 3, 3, "steps")
    return out


def codec_from_generator(gen: dict[str, Any], path: Path, *, prefix: str = ""
                         ) -> tuple[CodecConfig, dict, dict]:
    """(CodecConfig, {codebooks, decoder.*} in fp32, facts) from the DAC generator's flat state
    dict; `prefix` is how the file names its entries (messages name them as the file does)."""
    import torch

    from khala_cli.engine.modeldir import codec_shapes, shape_diff

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
            unmapped.append(f"{prefix}{k} (shape {list(getattr(v, 'shape', []))})")
    if unmapped:
        raise ConvertError(f"{path}: tensors khala does not know how to map:\n  " + "\n  ".join(unmapped[:20]))
    n = len(books)
    if n == 0 or sorted(books) != list(range(n)):
        missing = sorted(set(range(max(books, default=-1) + 1)) - set(books))
        raise ConvertError(
            f"{path}: codebooks missing: "
            + (", ".join(f"{prefix}quantizer.vq_layer_{i}._codebook.embed" for i in missing)
               if missing else f"no {prefix}quantizer.vq_layer_*._codebook.embed")
        )
    shapes = {tuple(b.shape) for b in books.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ConvertError(f"{path}: codebooks have differing or non-2-D shapes {sorted(shapes)}")
    codebook_size, latent = next(iter(shapes))
    config = _codec_config(path, decoder, n, codebook_size, latent, prefix)
    out = {"codebooks": torch.stack([books[i].float() for i in range(n)]).contiguous()}
    for k, v in decoder.items():
        out[k] = v.float().clone()
    expected = codec_shapes(config)
    missing, unmapped, misshaped = shape_diff({k: tuple(v.shape) for k, v in out.items()}, expected)
    problems = [f"missing tensor {prefix}{k} (expected shape {list(expected[k])})"
                for k in missing]
    problems += [f"unmapped tensor {prefix}{k} (shape {list(out[k].shape)})" for k in unmapped]
    problems += [f"{prefix}{k} has shape {list(out[k].shape)}, expected {list(expected[k])}"
                 for k in misshaped if k != "codebooks"]
    if problems:
        raise ConvertError(f"{path}: the decoder does not match a DAC decoder of "
                           f"{_describe(config)}:\n  " + "\n  ".join(problems[:20]))
    return config, out, {"path": str(path), "skipped": skipped}


def _codec_config(path: Path, dec: dict, n: int, codebook_size: int, latent: int,
                  prefix: str) -> CodecConfig:
    """The decoder's shape, read off its tensors (dac Decoder layout: conv, blocks, snake, conv)."""
    first = dec.get("decoder.model.0.weight_v")
    if first is None or first.dim() != 3:
        raise ConvertError(f"{path}: missing tensor {prefix}decoder.model.0.weight_v")
    channels0 = int(first.shape[0])
    if int(first.shape[1]) != latent:
        raise ConvertError(
            f"{path}: {prefix}decoder.model.0.weight_v takes {first.shape[1]} latent channels "
            f"but the codebooks have dimension {latent}"
        )
    rates = []
    i = 1
    while f"decoder.model.{i}.block.1.weight_v" in dec:
        kernel = int(dec[f"decoder.model.{i}.block.1.weight_v"].shape[-1])
        rates.append(kernel // 2)
        i += 1
    if not rates:
        raise ConvertError(f"{path}: no decoder blocks ({prefix}decoder.model.1.block.*)")
    last = dec.get(f"decoder.model.{i + 1}.weight_v")
    if last is None:
        raise ConvertError(f"{path}: missing tensor {prefix}decoder.model.{i + 1}.weight_v (final conv)")
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
    """Rough size of the model directory, only used to check the free disk space. Megatron:
    bf16 transformers (~ 1/8 of a checkpoint holding fp32 Adam moments and master weights) +
    the decoder (~ 1/4 of the Lightning file). Khala-mac: the safetensors as they are (bf16
    already) + decoder_weights.pt (the decoder and the encoder khala leaves out)."""
    if sources.layout == KHALA_MAC:
        return sum(p.stat().st_size for p in (sources.backbone, sources.superres, sources.codec))
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
    """Convert the download at `src` (either layout) into a model directory at `dst`
    (default: `<src>-khala`).

    Raises ConvertError (or MegatronError / KhalaMacError / UnsafeCheckpointError /
    CheckpointReadError, all with a message for people) and then leaves nothing behind at
    `dst`."""
    from khala_cli.engine import modeldir

    t0 = time.monotonic()
    its = parse_iteration(iteration)
    sources = find_sources(src, tokenizer)
    if its and sources.layout == KHALA_MAC:
        raise ConvertError(f"--iteration {iteration}: the Khala-mac download at {sources.root} "
                           f"holds one converted iteration only: leave --iteration out")
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
    try:
        if sources.layout == KHALA_MAC:
            written = _write_khala_mac(sources, tmp, trust=trust, progress=progress)
        else:
            written = _write_megatron(sources, tmp, its, trust=trust, progress=progress)
        codec_cfg = written.codec
        info = modeldir.finish_model_dir(
            tmp, final, name=name or final.name, demo=False, source=written.source,
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
                         layout=sources.layout, iterations=written.iterations,
                         skipped=written.skipped)


@dataclass
class _Written:
    """What the layout-specific half of a conversion wrote into the temporary directory."""

    codec: CodecConfig
    source: str  # model.json's `source`
    iterations: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)


def _write_transformer(tmp: Path, stage: str, config: TransformerConfig, tensors: dict,
                       progress: Progress | None) -> None:
    import torch

    from khala_cli.engine import modeldir

    modeldir.write_component(tmp, stage, config, tensors, dtype=torch.bfloat16)
    if progress:
        progress("writing", 1 if stage == "backbone" else 2, 4, f"{stage}.safetensors")


def _write_codec(tmp: Path, config: CodecConfig, tensors: dict, progress: Progress | None) -> None:
    import torch

    from khala_cli.engine import modeldir

    modeldir.write_component(tmp, "codec", config, tensors, dtype=torch.float32)
    if progress:
        progress("writing", 3, 4, "codec.safetensors")


def _write_megatron(sources: Sources, tmp: Path, its: dict[str, int], *, trust: bool,
                    progress: Progress | None) -> _Written:
    iterations: dict[str, Any] = {}
    skipped: dict[str, int] = {}
    with single_process_group():
        for stage, path in (("backbone", sources.backbone), ("superres", sources.superres)):
            config, tensors, facts = convert_transformer(
                path, stage, iteration=its.get(stage), trust=trust, progress=progress,
            )
            iterations[stage] = facts["iteration"]
            skipped[stage] = facts["skipped"]
            _write_transformer(tmp, stage, config, tensors, progress)
            del tensors
    codec_cfg, codec_tensors, facts = convert_codec(sources.codec, trust=trust, progress=progress)
    skipped["codec"] = facts["skipped"]
    _write_codec(tmp, codec_cfg, codec_tensors, progress)
    source = (
        f"{sources.root} (backbone iter {iterations['backbone']}, superres iter "
        f"{iterations['superres']}, decoder {sources.codec.name})"
    )
    return _Written(codec_cfg, source, iterations, skipped)


def _write_khala_mac(sources: Sources, tmp: Path, *, trust: bool,
                     progress: Progress | None) -> _Written:
    # Everything that can be checked without reading the transformers' tensors comes first:
    # both headers and args files, then the (small) decoder and its yaml.
    plans = [khala_mac.plan_transformer(stage, path, sources.args[stage])
             for stage, path in (("backbone", sources.backbone), ("superres", sources.superres))]
    if progress:
        progress("codec", 0, 3, "steps")
    state = khala_mac.read_decoder_state(sources.codec, trust=trust)
    if progress:
        progress("codec", 1, 3, "steps")
    codec_cfg, codec_tensors, facts = codec_from_generator(state, sources.codec)
    del state
    khala_mac.check_decoder_config(sources.codec_config, codec_cfg)
    if progress:
        progress("codec", 3, 3, "steps")
    for plan in plans:
        tensors = khala_mac.read_transformer(plan, progress)
        _write_transformer(tmp, plan.stage, plan.config, tensors, progress)
        del tensors
    _write_codec(tmp, codec_cfg, codec_tensors, progress)
    source = (f"{sources.backbone.parent} (Khala-mac download: {sources.backbone.name}, "
              f"{sources.superres.name}, {sources.codec.name})")
    return _Written(codec_cfg, source, skipped={"codec": facts["skipped"]})


CONVERT_ERRORS = (ConvertError, MegatronError, KhalaMacError, UnsafeCheckpointError,
                  CheckpointReadError)


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
