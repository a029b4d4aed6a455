"""`khala bench --e2e`: complete songs through `Pipeline.render` (the path `khala render`'s
workers take) on a model of the real Khala shape with random weights.

The model: hidden 2048, 24 layers, 32 heads, 8 KV groups, head_dim 64, ffn 5632, the real
vocab sizes (130432 backbone rows, 193792 super-res rows) and the real codec (latent 128,
192 filters, rates 8-8-8-4, stereo), built once under `checkpoints/bench-e2e-<scale>/`.
`scale` < 1 shrinks the widths, the layer count and the codec for a CPU (the vocab sizes stay
real). Random weights never emit end-of-song (engine/random_model.py arranges it), so every song is
exactly `minutes` long: 2584 backbone tokens a minute.

It renders B=1 and B=8, keep_loaded and one_shot, on every decode path the device has
(eager, compile; CUDA graphs on CUDA), batch size by batch size with eager first, and reports
seconds per stage and for loading, backbone tokens/s per row and in all, the peak memory of
each stage (CUDA: allocated; CPU: the process's resident set), songs per device-minute, and
whether the backbone tokens equal eager's at the same batch size: eager's of this run, or
those an earlier run saved in `eager_dir` (so a later run of one path needs no eager run).
Then the catalogue case (`catalogue_run`): different songs, one seed each, in one cross-song
batch against one at a time: songs per minute of each, and whether the tokens are equal.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from khala_cli.engine.config import CodecConfig, decode_options
from khala_cli.engine.pipeline import Pipeline, Request
from khala_cli.engine.random_model import build_random_model, tiny_codec_config
from khala_cli.model_numbers import TOKENS_PER_MINUTE

REAL_SIZES = {"hidden_size": 2048, "num_layers": 24, "num_heads": 32, "num_kv_heads": 8,
              "head_dim": 64, "ffn_hidden_size": 5632}
REAL_VOCAB = (130432, 193792)
WARMUP_MINUTES = 0.02  # ~52 backbone tokens
STAGE_OF = {"loading_backbone": "backbone", "backbone": "backbone",
            "loading_superres": "superres", "superres": "superres",
            "loading_decoder": "decode", "decoding": "decode"}


def shape(scale: float) -> dict[str, Any]:
    """Transformer sizes and codec numbers of the real model shrunk by `scale`."""
    heads = max(2, round(32 * scale))
    kv = max(1, round(8 * scale))
    heads -= heads % kv
    return {"sizes": {"hidden_size": heads * 64, "num_layers": max(2, round(24 * scale)),
                      "num_heads": heads, "num_kv_heads": kv, "head_dim": 64,
                      "ffn_hidden_size": max(64, round(5632 * scale))},
            "codec": {"latent_dim": max(8, round(128 * scale)),
                      "n_filters": max(2, round(192 * scale))}}


def model_dir(scale: float, root: Path = Path("checkpoints")) -> Path:
    """The bench model of this scale, built on first use (random, untrained: noise)."""
    sh = shape(scale)
    base = tiny_codec_config()
    codec = CodecConfig(**{**asdict(base), **sh["codec"], "rates": (8, 8, 8, 4)})
    name = f"bench-e2e-{scale:g}"
    return build_random_model(
        root / name, name=f"{name} (random weights, untrained: renders noise)",
        source="khala_cli.engine.bench_e2e: the real Khala shape with random weights",
        demo=True, sizes=sh["sizes"], vocab=REAL_VOCAB, codec=codec)


@dataclass
class Peaks:
    """Peak memory (GB) per stage: CUDA allocations, or the CPU process's resident set."""

    device: torch.device
    stage: str = "backbone"
    peaks: dict[str, float] = field(default_factory=dict)
    _stop: bool = False

    def phase(self, phase: str) -> None:
        stage = STAGE_OF.get(phase, self.stage)
        if stage != self.stage:
            self._record()
            self.stage = stage
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)

    def _record(self, now: float | None = None) -> None:
        if now is None and self.device.type == "cuda":
            now = torch.cuda.max_memory_allocated(self.device) / 1e9
        if now is not None:
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0.0), now)

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop:
            self._record(proc.memory_info().rss / 1e9)
            time.sleep(0.05)

    def __enter__(self) -> Peaks:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            threading.Thread(target=self._sample, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._record()


def paths(device: torch.device) -> list[str]:
    return ["eager", "compile"] + (["cuda_graphs"] if device.type == "cuda" else [])


def one_run(mdir: Path, device: str, dtype: str | None, batch: int, residency: str,
            path: str, minutes: float) -> tuple[dict[str, Any], list]:
    t0 = time.perf_counter()
    pipe = Pipeline.from_dir(mdir, device=device, dtype=dtype, residency=residency,
                             backbone_options=decode_options(path))
    ids = pipe.tokenizer.encode("[verse] la la la").ids
    tokens = int(round(TOKENS_PER_MINUTE * minutes))
    req = Request(backbone_ids=ids[:64] or [1], superres_ids=ids[:64] or [1],
                  seeds=list(range(1, batch + 1)), max_new_tokens=tokens,
                  duration=max(1, min(10, round(minutes))))
    with Peaks(pipe.device) as peaks:
        (takes,) = pipe.render([req], progress=lambda ph, d, t, x: peaks.phase(ph))
    wall = time.perf_counter() - t0
    tm = takes[0].timings
    row = {"batch": batch, "residency": residency, "path": path,
           "backbone_s": round(tm["backbone_s"], 2), "superres_s": round(tm["superres_s"], 2),
           "decode_s": round(tm["decode_s"], 2), "load_s": round(tm["load_s"], 2),
           "wall_s": round(wall, 2),
           "tokens_per_s_row": round(takes[0].backbone_tokens / max(tm["backbone_s"], 1e-9), 1),
           "tokens_per_s_all": round(sum(t.backbone_tokens for t in takes)
                                     / max(tm["backbone_s"], 1e-9), 1),
           "backbone_tokens": [t.backbone_tokens for t in takes],
           "peak_mem_gb": {k: round(v, 2) for k, v in peaks.peaks.items()},
           "songs_per_minute": round(batch * 60.0 / wall, 3)}
    return row, [t.codes[:2] for t in takes]


def catalogue_run(mdir: Path, device: str, dtype: str | None, songs: int,
                  minutes: float) -> dict[str, Any]:
    """`songs` different songs (prompts of different lengths), one seed each, through
    Pipeline.render (eager, keep_loaded): all in one cross-song batch against one at a time.
    Songs per minute of each, their ratio, and whether every take's backbone tokens match."""
    pipe = Pipeline.from_dir(mdir, device=device, dtype=dtype)
    pipe.load()
    tokens = int(round(TOKENS_PER_MINUTE * minutes))
    reqs = []
    for i in range(songs):
        ids = pipe.tokenizer.encode(" ".join([f"[verse] line {i}"] * (4 + 12 * i))).ids
        reqs.append(Request(backbone_ids=ids, superres_ids=ids[:64], seeds=[i + 1],
                            max_new_tokens=tokens, duration=max(1, min(10, round(minutes)))))
    walls, codes = {}, {}
    for b, batches in ((1, None), (songs, [list(range(songs))])):
        t = time.perf_counter()
        takes = pipe.render(reqs, batches=batches)
        walls[b], codes[b] = time.perf_counter() - t, [tk[0].codes[:2] for tk in takes]
    return {"songs": songs, "minutes": minutes, "dtype": dtype or str(pipe.dtype),
            "prompt_tokens": [len(r.backbone_ids) for r in reqs],
            "songs_per_minute": {str(b): round(songs * 60.0 / w, 3) for b, w in walls.items()},
            "ratio": round(walls[1] / walls[songs], 3),
            "tokens_equal": all(np.array_equal(x, y)
                                for x, y in zip(codes[1], codes[songs], strict=True))}


def run_e2e(*, device: str = "cpu", scale: float = 1.0, minutes: float = 3.0,
            dtypes: tuple[str | None, ...] = (None,), batches: tuple[int, ...] = (1, 8),
            residencies: tuple[str, ...] = ("keep_loaded", "one_shot"),
            only_paths: tuple[str, ...] | None = None, eager_dir: Path | None = None,
            log=None, catalogue_songs: int = 8,
            catalogue_minutes: float | None = None) -> dict[str, Any]:
    """Every configuration's run, then the catalogue case (`catalogue_songs` different
    songs of `catalogue_minutes`, default `minutes`, at B=songs against B=1; 0: none)."""
    dev = torch.device(device)
    mdir = model_dir(scale)
    results = []
    eager = EagerCodes(eager_dir, f"{minutes:g}min-scale{scale:g}")
    default = "bfloat16" if dev.type == "cuda" else "float32"
    name = str(dev if dev.type != "cuda" else torch.cuda.get_device_name(dev))
    for dtype in (d or default for d in dtypes):
        for batch in batches:
            for path in [p for p in paths(dev) if not only_paths or p in only_paths]:
                # One short untimed render first: compilation, graph capture and first-use
                # costs are reported as warmup_s, not mixed into the song's stages.
                t = time.perf_counter()
                one_run(mdir, device, dtype, batch, residencies[0], path, WARMUP_MINUTES)
                warmup = round(time.perf_counter() - t, 2)
                for residency in residencies:
                    row, codes = one_run(mdir, device, dtype, batch, residency, path, minutes)
                    first = path == "eager" and not eager.has(dtype, batch)
                    row.update(dtype=dtype, minutes=minutes, device=name,
                               device_type=dev.type, warmup_s=warmup,
                               tokens_equal_eager=eager.compare(dtype, batch, path, codes),
                               eager_reference=first)
                    results.append(row)
                    if log:
                        log(row)
    catalogue = [catalogue_run(mdir, device, dtype, catalogue_songs, catalogue_minutes or minutes)
                 for dtype in (d or default for d in dtypes) if catalogue_songs > 1]
    sh = shape(scale)
    return {"device": name,
            "shape": {**sh["sizes"], "vocab": list(REAL_VOCAB), **sh["codec"],
                      "scale": scale},
            "minutes": minutes, "dtypes": sorted({r["dtype"] for r in results}),
            "results": results, "catalogue": catalogue}


@dataclass
class EagerCodes:
    """Eager's backbone codes per (dtype, batch): the reference of every other run. Kept in
    memory, and in `folder` when given (`tag` names the song length and model there)."""

    folder: Path | None
    tag: str
    codes: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)

    def _file(self, dtype: str, batch: int) -> Path | None:
        return self.folder / f"eager-{dtype}-B{batch}-{self.tag}.npy" if self.folder else None

    def has(self, dtype: str, batch: int) -> bool:
        """Whether a reference for (dtype, batch) exists, in memory or in the folder."""
        file = self._file(dtype, batch)
        return (dtype, batch) in self.codes or (file is not None and file.exists())

    def compare(self, dtype: str, batch: int, path: str, codes: list) -> bool | None:
        """Whether `codes` equal eager's; an eager run with no reference yet becomes it.
        None when no eager run of this batch size has been seen."""
        mine = np.stack(codes)
        ref = self.codes.get((dtype, batch))
        file = self._file(dtype, batch)
        if ref is None and file is not None and file.exists():
            ref = self.codes[dtype, batch] = np.load(file)
        if ref is None:
            if path != "eager":
                return None
            self.codes[dtype, batch] = ref = mine
            if file is not None:
                file.parent.mkdir(parents=True, exist_ok=True)
                tmp = file.with_name(f".{file.name}.tmp")
                with tmp.open("wb") as f:
                    np.save(f, mine)
                tmp.replace(file)
        return ref.shape == mine.shape and bool((ref == mine).all())
