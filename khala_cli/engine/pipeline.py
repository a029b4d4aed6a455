"""The whole Khala inference path over ids and arrays: backbone -> super-res -> codec.

`Pipeline.from_dir` reads a model directory (configs, tokenizer, tensor names and shapes;
weights load on first use). `render(requests, batches=...)` runs every stage over all
requests before the next stage starts (a wave), so in `one_shot` residency each stage's
weights are loaded once per call and released when the next stage loads; `keep_loaded`
keeps them resident. The requests of one batch (different songs) decode their backbone rows
together; every take is the same bits as it would be alone. A request may keep a parent
take's first frames (`Request.kept`): its backbone rows start from them and super-res holds
them in every layer, so with the parent's own seed it renders the parent again.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from khala_cli import model_numbers as mn
from khala_cli.engine import modeldir
from khala_cli.engine.backbone import BackboneRow, Song, generate_batch, prefix_ids
from khala_cli.engine.config import CodecConfig, ModelInfo
from khala_cli.engine.superres import check_kept, upsample
from khala_cli.engine.tokens import TokenLayout

Progress = Callable[[str, int, int, dict], None]  # (phase, done, total, extra)

RESIDENCIES = ("keep_loaded", "one_shot")
STAGES = ("backbone", "superres", "codec")
_LOADING_PHASE = {"backbone": "loading_backbone", "superres": "loading_superres",
                  "codec": "loading_decoder"}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class Request(mn.Controls):
    """One prompt, several seeds -> one batched render, under the Controls fields
    (duration, top-k, temperature, token cap: a row's tokens from step 0, kept ones
    included)."""

    backbone_ids: list[int]
    superres_ids: list[int]
    seeds: list[int]
    # seed -> saved backbone row (a whole row: kept frames included)
    resume: dict[int, BackboneRow] = field(default_factory=dict)
    # int64 [num_quantizers, K] (0..codebook-1): a parent's codes of its first K frames
    # (K >= 1), held in every layer; every seed continues from them
    kept: np.ndarray | None = None
    allow_end: bool = True  # False (extend): end-of-song is never sampled; rows run to their cap

    def expected_tokens(self) -> int:
        """Backbone tokens the progress bar expects: the reference's estimate, capped."""
        return mn.expected_tokens(self.duration, self.max_new_tokens)


@dataclass
class Take:
    """One seed's result. Timings are the wall seconds of the batched stage calls that
    produced it (shared by the takes of one batch); total_s is their sum, and load_s the
    weight loading done during this render. batch_size: the takes of its backbone batch
    (itself included), batch_songs: the requests (songs) among them."""

    seed: int
    codes: np.ndarray  # int64 [num_quantizers, frames]
    audio: np.ndarray  # float32 [samples, channels]
    backbone_tokens: int  # q0/q1 tokens kept (2 x frames)
    timings: dict[str, float] = field(default_factory=dict)
    ended: str = "end_of_song"  # or "token_cap": max_new_tokens cut the song
    logprob_mean: float | None = None  # the backbone's mean log-probability of its tokens
    resumed: bool = False  # its backbone row came from Request.resume (backbone_s is 0)
    batch_size: int = 1
    batch_songs: int = 1
    kept_frames: int = 0  # its first frames are Request.kept's (a parent's)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r} (use one of {sorted(_DTYPES)})") from None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Pipeline:
    layout: TokenLayout
    info: ModelInfo
    codec_config: CodecConfig
    device: torch.device
    dtype: torch.dtype

    def __init__(self, model_dir: str | Path, device="cpu", dtype=None,
                 residency: str = "keep_loaded", backbone_options: dict | None = None) -> None:
        if residency not in RESIDENCIES:
            raise ValueError(f"residency must be one of {RESIDENCIES}, got {residency!r}")
        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.dtype = default_dtype(self.device) if dtype is None else _as_dtype(dtype)
        self.residency = residency
        self.backbone_options = dict(backbone_options or {})
        self.info = modeldir.read_info(self.model_dir)
        self.tokenizer = modeldir.load_tokenizer(self.model_dir)
        self.layout = modeldir.layout(self.model_dir)
        self.configs = {name: modeldir.read_config(self.model_dir, name) for name in STAGES}
        self.codec_config = self.configs["codec"]
        self._check()
        self._models: dict[str, object] = {}
        self._load_s = 0.0  # loading time since the last render started

    @classmethod
    def from_dir(cls, model_dir: str | Path, device="cpu", dtype=None,
                 residency: str = "keep_loaded", **kwargs) -> Pipeline:
        """Read and check a model directory. Configs, tokenizer and every tensor's name and
        shape are checked now (file headers only); the weights load on first use."""
        return cls(model_dir, device=device, dtype=dtype, residency=residency, **kwargs)

    def _check(self) -> None:
        lay = self.layout
        for which, need in (("backbone", lay.backbone_vocab), ("superres", lay.superres_vocab)):
            if self.configs[which].vocab_size < need:
                raise modeldir.ModelDirError(
                    f"{self.model_dir / (which + '.json')}: vocab_size "
                    f"{self.configs[which].vocab_size} < {need} ids of the token layout"
                )
        cc = self.codec_config
        if (cc.num_codebooks, cc.codebook_size) != (lay.num_quantizers, lay.codebook_size):
            raise modeldir.ModelDirError(
                f"{self.model_dir / 'codec.json'}: {cc.num_codebooks} x {cc.codebook_size} "
                f"codebooks, model.json says {lay.num_quantizers} x {lay.codebook_size}"
            )
        for name in STAGES:
            modeldir.check_file(self.model_dir, name, self.configs[name])

    # ---- residency ------------------------------------------------------------------------

    def loaded(self) -> list[str]:
        return [s for s in STAGES if s in self._models]

    def _get(self, stage: str, progress: Progress | None):
        model = self._models.get(stage)
        if model is not None:
            return model
        if self.residency == "one_shot":
            for other in STAGES:
                if other != stage:
                    self.release(other)
        phase = _LOADING_PHASE[stage]
        if progress:
            progress(phase, 0, 1, {})
        t = time.perf_counter()
        if stage == "codec":
            model = modeldir.load_codec(self.model_dir, self.device)
        else:
            model = modeldir.load_transformer(self.model_dir, stage, self.device, self.dtype)
        _sync(self.device)
        self._load_s += time.perf_counter() - t
        self._models[stage] = model
        if progress:
            progress(phase, 1, 1, {})
        return model

    def load(self, stages: Sequence[str] = STAGES, progress: Progress | None = None) -> None:
        """Load stages now (in `one_shot` only the last one named stays resident)."""
        for s in stages:
            self._get(s, progress)

    def release(self, stage: str) -> None:
        """Free one stage's weights ("backbone" | "superres" | "codec")."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if self._models.pop(stage, None) is None:
            return
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- stages ---------------------------------------------------------------------------

    def backbone(self, req: Request, progress: Progress | None = None) -> list[BackboneRow]:
        """Per seed: its BackboneRow, codes int64 [2, frames] q0/q1 (0..codebook_size-1).
        Seeds in req.resume take their saved row; the model decodes (and loads) only for
        the others."""
        return self.backbone_batch([req], progress)[0]

    def backbone_batch(self, reqs: Sequence[Request],
                       progress: Progress | None = None) -> list[list[BackboneRow]]:
        """Per request, per seed: its BackboneRow. The rows of all requests (different songs,
        settings and caps) not in their resume decode together in one batch; each is the
        row its request would get alone."""
        for r in reqs:
            if r.kept is not None:
                check_kept(self.layout, r.kept)
        todo = [[s for s in r.seeds if s not in r.resume] for r in reqs]
        fresh = iter(self._decode_rows(reqs, todo, progress) if any(todo) else [])
        out = []
        for req, seeds in zip(reqs, todo, strict=True):
            rows = iter(next(fresh) if seeds else [])
            out.append([req.resume[s] if s in req.resume else next(rows) for s in req.seeds])
        return out

    def _decode_rows(self, reqs: Sequence[Request], seeds: list[list[int]],
                     progress: Progress | None) -> list[list[BackboneRow]]:
        """Per request with seeds to decode, its rows (requests without are left out)."""
        model = self._get("backbone", progress)
        live = [(r, s) for r, s in zip(reqs, seeds, strict=True) if s]
        total = max(r.expected_tokens() for r, _ in live)
        cb = None
        if progress:
            def cb(done: int, tokens_per_s: float) -> None:
                progress("backbone", min(int(done), total), total,
                         {"tokens_per_s": float(tokens_per_s)})
            progress("backbone", 0, total, {"tokens_per_s": 0.0})
        songs = [Song(list(r.backbone_ids), list(s), r.top_k_bb, r.temperature, r.max_new_tokens,
                      prefix=self._prefix(r), allow_end=r.allow_end)
                 for r, s in live]
        out = generate_batch(model, self.layout, songs, progress=cb, **self.backbone_options)
        _sync(self.device)
        return out

    def _prefix(self, req: Request) -> tuple[int, ...]:
        """The backbone prefix of a request's kept frames (their q0/q1 ids)."""
        return () if req.kept is None else prefix_ids(self.layout, np.asarray(req.kept)[:2])

    def superres(self, req: Request, q01: Sequence[np.ndarray],
                 progress: Progress | None = None) -> list[np.ndarray]:
        """Per seed: int64 [num_quantizers, frames] codes (rows 0, 1 are the given q0, q1)."""
        if len(q01) != len(req.seeds):
            raise ValueError(f"{len(q01)} q0/q1 arrays for {len(req.seeds)} seeds")
        if not req.seeds:
            return []
        model = self._get("superres", progress)
        total = self.layout.num_quantizers - 2
        cb = None
        if progress:
            def cb(done: int, total_: int) -> None:
                progress("superres", int(done), int(total_), {})
            progress("superres", 0, total, {})
        kept = None if req.kept is None else [req.kept] * len(req.seeds)
        out = upsample(model, self.layout, list(req.superres_ids), list(q01), list(req.seeds),
                       top_k=req.top_k_sr, progress=cb, kept=kept)
        _sync(self.device)
        return out

    def decode(self, codes: Sequence[np.ndarray], progress: Progress | None = None) -> list[np.ndarray]:
        """Per item: float32 [frames * hop, channels] waveform at codec_config.sample_rate."""
        if not codes:
            return []
        codec = self._get("codec", progress)
        cb = None
        if progress:
            def cb(done: int, total: int) -> None:
                progress("decoding", int(done), int(total), {})
        return codec.decode_windowed(list(codes), progress=cb)

    def render(self, requests: Sequence[Request], progress: Progress | None = None, *,
               batches: Sequence[Sequence[int]] | None = None,
               on_backbone: Callable[[int, list[BackboneRow]], None] | None = None,
               on_error: Callable[[int, BaseException], None] | None = None,
               ) -> list[list[Take]]:
        """All three stages for every request, stage by stage; per request, one Take per seed.

        batches: the requests (indices) whose backbone rows decode together, each request in
        one batch; default each request a batch of its own. A take is the same bits in any
        batch. Progress extras carry "batch" (its index) and "requests" (its requests)
        during the backbone, "batch" and "request" during super-res, and "requests" (those
        still live) while decoding.
        on_backbone(i, rows): called once request i's backbone rows exist (to save them).
        on_error(i, exc): without it, any error ends the call; with it, a request whose
        stage raised is reported there (which may re-raise) and gets no takes, and the
        other requests go on (a batch that fails, other than out of memory, is decoded
        again one request at a time, so a request fails only for its own sake)."""
        self._load_s = 0.0
        groups = _check_batches(len(requests), batches)
        run = _StageRun(self, len(requests), on_error)
        batch_of = {i: k for k, members in enumerate(groups) for i in members}

        def tagged(extra: dict) -> Progress | None:
            if progress is None:
                return None
            return lambda phase, done, total, x: progress(phase, done, total, {**x, **extra})

        def backbone_stage(k: int, members: list[int]) -> list[list[BackboneRow]]:
            return self.backbone_batch([requests[i] for i in members],
                                       tagged({"batch": k, "requests": list(members)}))

        rows = run.batched(groups, backbone_stage, "backbone_s", on_backbone)
        codes = run.each(requests, lambda i, req: self.superres(
            req, [r.codes for r in rows[i]], tagged({"batch": batch_of[i], "request": i})),
            "superres_s")
        live = [i for i in range(len(requests)) if i not in run.failed]
        t = time.perf_counter()
        try:
            audio = iter(self.decode([c for i in live for c in codes[i]],
                                     tagged({"requests": live})))
        except Exception as exc:
            run.fail(live, exc)
        decode_s = run.stage_time(t)
        sizes = {k: (sum(len(requests[i].seeds) for i in m), len(m)) for k, m in enumerate(groups)}
        return [[] if i in run.failed else
                [self._take(req, seed, row, c, next(audio), run.times[i], decode_s, run.load_s,
                            sizes[batch_of[i]])
                 for seed, row, c in zip(req.seeds, rows[i], codes[i], strict=True)]
                for i, req in enumerate(requests)]

    @staticmethod
    def _take(req: Request, seed: int, row: BackboneRow, codes: np.ndarray, audio: np.ndarray,
              times: dict[str, float], decode_s: float, load_s: float,
              batch: tuple[int, int]) -> Take:
        resumed = seed in req.resume
        tm = {**times, "decode_s": decode_s}
        if resumed:
            tm["backbone_s"] = 0.0
        tm["total_s"] = tm["backbone_s"] + tm["superres_s"] + decode_s
        tm["load_s"] = load_s
        return Take(seed=int(seed), codes=codes, audio=audio,
                    backbone_tokens=2 * int(row.codes.shape[1]), timings=tm, ended=row.ended,
                    logprob_mean=row.logprob_mean, resumed=resumed, batch_size=batch[0],
                    batch_songs=batch[1],
                    kept_frames=0 if req.kept is None else int(np.shape(req.kept)[1]))


def _check_batches(n: int, batches: Sequence[Sequence[int]] | None) -> list[list[int]]:
    if batches is None:
        return [[i] for i in range(n)]
    groups = [[int(i) for i in b] for b in batches if len(b)]
    if sorted(i for b in groups for i in b) != list(range(n)):
        raise ValueError(f"batches {groups} must hold each of the {n} requests exactly once")
    return groups


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError))


class _StageRun:
    """One `Pipeline.render` call's bookkeeping: stage times per request (weight loading kept
    apart), and the requests whose stage failed."""

    def __init__(self, pipe: Pipeline, n: int,
                 on_error: Callable[[int, BaseException], None] | None) -> None:
        self.pipe, self.on_error = pipe, on_error
        self.failed: set[int] = set()
        self.times: list[dict[str, float]] = [{} for _ in range(n)]
        self.load_s = 0.0

    def stage_time(self, t0: float) -> float:
        loading, self.pipe._load_s = self.pipe._load_s, 0.0  # weight loading is not stage time
        self.load_s += loading
        return time.perf_counter() - t0 - loading

    def fail(self, requests: list[int], exc: Exception) -> None:
        """Without on_error any failure ends the call; with it, the requests get no takes."""
        if self.on_error is None:
            raise exc
        for i in requests:
            self.failed.add(i)
            self.on_error(i, exc)

    def each(self, requests: Sequence[Request], stage: Callable[[int, Request], object],
             key: str) -> list:
        """stage(i, request) for every request still live, timed under `key`."""
        out: list = [None] * len(requests)
        for i, req in enumerate(requests):
            if i in self.failed:
                continue
            t = time.perf_counter()
            try:
                out[i] = stage(i, req)
            except Exception as exc:
                self.fail([i], exc)
            self.times[i][key] = self.stage_time(t)
        return out

    def batched(self, groups: list[list[int]], stage: Callable[[int, list[int]], list],
                key: str, done: Callable[[int, object], None] | None = None) -> list:
        """stage(k, members) per batch -> one result per member, timed under `key` (the
        batch's time for each member), then done(i, result) per member. A failed batch of
        several requests, other than out of memory, runs again one request at a time (the
        invariant makes that safe), so a request fails only for its own sake."""
        out: list = [None] * len(self.times)
        for k, members in enumerate(groups):
            t = time.perf_counter()
            try:
                results = stage(k, members)
            except Exception as exc:
                if self.on_error is None or len(members) == 1 or _out_of_memory(exc):
                    self.fail(members, exc)
                    results = None
                else:
                    before = self.stage_time(t)
                    for i in members:
                        t = time.perf_counter()
                        self._finish(out, i, lambda i=i, k=k: stage(k, [i])[0], done)
                        self.times[i][key] = before + self.stage_time(t)
                    continue
            elapsed = self.stage_time(t)
            for j, i in enumerate(members):
                self.times[i][key] = elapsed
                if results is not None:
                    self._finish(out, i, lambda j=j, r=results: r[j], done)
        return out

    def _finish(self, out: list, i: int, result: Callable[[], object],
                done: Callable[[int, object], None] | None) -> None:
        try:
            out[i] = result()
            if done is not None:
                done(i, out[i])
        except Exception as exc:
            self.fail([i], exc)
