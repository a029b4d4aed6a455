"""Parent <-> worker messages: one JSON object per line over the worker's stdin/stdout.

Parent -> worker:
    {"type": "work", "wave": int, "batches": [[{"id": int, "render": render dict}, ...], ...]}
        a batch may hold several songs (the engine decodes their rows together); a wave
        holds several batches only in one_shot residency (each stage runs over the whole
        wave before the models swap)
    {"type": "stop"}                           finish nothing more; exit

Worker -> parent:
    {"type": "hello", "pid": int, "device": str}           started (before torch is imported)
    {"type": "ready", "device": str, "residency": str}     pipeline loaded
    {"type": "want"}                                       idle: send work
    {"type": "progress", "wave", "job_id", "seeds", "jobs", "phase", "done", "total",
     "tokens_per_s"}                                       the takes worked on: seeds[i] of
                                                           jobs[i] (job_id: the first's)
    {"type": "result", "wave", "id", "status": "rendered"|"failed", "error", "files",
     "seconds", "resumed": bool, "analysis": {"flags", "score"} (rendered)}
    {"type": "wave_done", "wave": int}
    {"type": "oom", "wave", "ids": [...], "error"}         out of memory; the worker exits
    {"type": "fatal", "error"}                             cannot work at all; the worker exits

`id` is the render's index in the run (two jobs with the same settings share a render key).
Anything else a worker prints goes to its log (stderr); stdout carries only these lines.
"""

from __future__ import annotations

import json
from typing import Any

TO_WORKER = {"work", "stop"}
FROM_WORKER = {"hello", "ready", "want", "progress", "result", "wave_done", "oom", "fatal"}


class ProtocolError(ValueError):
    pass


def encode(msg: dict[str, Any]) -> bytes:
    if not isinstance(msg.get("type"), str):
        raise ProtocolError(f"message without a type: {msg!r}")
    return (json.dumps(msg, separators=(",", ":"), allow_nan=False) + "\n").encode()


def decode(line: bytes | str, allowed: set[str] | None = None) -> dict[str, Any]:
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    try:
        msg = json.loads(line)
    except ValueError as exc:
        raise ProtocolError(f"not a JSON line: {line[:200]!r}") from exc
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError(f"not a message: {line[:200]!r}")
    if allowed is not None and msg["type"] not in allowed:
        raise ProtocolError(f"unexpected message type {msg['type']!r}")
    return msg


class LineBuffer:
    """Splits a byte stream read in chunks into complete lines."""

    def __init__(self, limit: int = 16 * 1024 * 1024):
        self.buf = b""
        self.limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        if len(self.buf) > self.limit:
            raise ProtocolError("a worker line exceeds the size limit")
        return [ln for ln in lines if ln.strip()]
