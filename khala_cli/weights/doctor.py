"""`khala doctor`: can this machine render, and with what? One finding per line.

Torch, CUDA and the model directory's tensors are probed in a child process
(`python -m khala_cli.weights.doctor --probe`), so the doctor itself never imports torch or
initialises CUDA: a broken CUDA install or a hanging driver becomes an error line instead of
a crash. What needs other layers (the ffmpeg lookup of `outputs`, the runner's memory
defaults) is passed in by the command, so this module imports nothing above `weights`.

Every finding is ok / warning / error, with what to do about it; rendering can work when
there is no error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from khala_cli import exit_codes
from khala_cli.weights import stack
from khala_cli.weights.resolve import (
    LAYOUT_WORDS,
    MIXED,
    default_destination,
    find_download,
    mixed_message,
)

# torch and engine.modeldir (which imports torch) are imported only in the child probe, so
# the doctor's own process never loads torch and a torch that fails to import becomes a
# finding. psutil is imported under a guard: without it the doctor still reports, minus RAM.

OK, WARNING, ERROR = "ok", "warning", "error"
GIB = 1024**3
PROBE_TIMEOUT = 180.0
MIN_PYTHON = (3, 10)
DISK_WARN_TAKES = 50  # warn below room for this many 3-minute takes


@dataclass(frozen=True)
class Finding:
    level: str  # ok | warning | error
    topic: str
    message: str
    fix: str = ""


@dataclass(frozen=True)
class DevicePlan:
    """What a device can hold, as the runner would choose it by default."""

    residency: str  # keep_loaded | one_shot: the runner's default for this device
    batch_size: int  # the runner's default batch size
    need_bytes: int  # memory that default needs with one row (weights + row + headroom)
    one_shot_bytes: int  # memory one_shot needs with one row (the floor for rendering)
    why: str = ""  # the memory model's terms behind the choice


# (device total bytes, free bytes, model dir) -> DevicePlan, or None when no model is known
Planner = Callable[[int, int, Path], DevicePlan]
# device kind ("cuda" | "cpu") -> (the runner's default decode path, why)
DecodeChooser = Callable[[str], tuple[str, str]]


def exit_code(findings: list[Finding]) -> int:
    """0 when rendering can work (no error), else 3 (model/environment error)."""
    return exit_codes.MODEL if any(f.level == ERROR for f in findings) else exit_codes.OK


# ---- the child probe -----------------------------------------------------------------------


def _probe_main(model: str | None) -> dict[str, Any]:
    """Runs in the child: torch, CUDA devices, and the model directory's files and tensors."""
    out: dict[str, Any] = {}
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - report whatever breaks the import
        out["torch_error"] = f"{type(exc).__name__}: {exc}"
        return out
    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda
    out["stack"] = stack.import_all()
    devices = []
    try:
        available = torch.cuda.is_available()
        out["cuda_available"] = available
        for i in range(torch.cuda.device_count() if available else 0):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            devices.append({"index": i, "name": props.name, "total": int(total), "free": int(free),
                            "capability": f"{props.major}.{props.minor}"})
    except Exception as exc:  # noqa: BLE001
        out["cuda_error"] = f"{type(exc).__name__}: {exc}"
    out["devices"] = devices
    if model:
        out["model"] = _probe_model(Path(model))
    return out


def _probe_model(path: Path) -> dict[str, Any]:
    from khala_cli.engine import modeldir

    res: dict[str, Any] = {"problems": []}
    try:
        info = modeldir.read_info(path)
    except modeldir.ModelDirError as exc:
        res["problems"].append(str(exc))
        return res
    res["info"] = {"name": info.name, "fingerprint": info.fingerprint, "demo": info.demo,
                   "source": info.source}
    res["problems"] += modeldir.verify(path)
    sizes = {}
    for stage in modeldir.COMPONENTS:
        f = path / f"{stage}.safetensors"
        try:
            cfg = modeldir.read_config(path, stage)
            with safe_open(str(f), framework="pt") as st:
                found = {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
            modeldir.check_shapes(found, modeldir.expected_shapes(stage, cfg), str(f), f"{stage}.json")
            sizes[stage] = f.stat().st_size
        except Exception as exc:  # noqa: BLE001 - each problem becomes a line
            msg = str(exc)
            if msg not in res["problems"]:
                res["problems"].append(msg if isinstance(exc, modeldir.ModelDirError)
                                       else f"{f}: {type(exc).__name__}: {exc}")
    try:
        modeldir.layout(path)
    except Exception as exc:  # noqa: BLE001
        res["problems"].append(str(exc))
    res["sizes"] = sizes
    return res


def run_probe(model: Path | None, timeout: float = PROBE_TIMEOUT) -> dict[str, Any]:
    """Run the probe in a child process; its failures come back as `probe_error`."""
    cmd = [sys.executable, "-m", "khala_cli.weights.doctor", "--probe"]
    if model is not None:
        cmd += ["--model", str(model)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"probe_error": f"probing torch/CUDA did not finish in {timeout:.0f} s "
                               f"(a hung GPU driver?)"}
    except OSError as exc:
        return {"probe_error": f"cannot start {sys.executable}: {exc}"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    tail = (proc.stderr or proc.stdout).strip()[-1500:]
    return {"probe_error": f"the torch/CUDA probe exited with code {proc.returncode}: {tail}"}


# ---- the checks ----------------------------------------------------------------------------


def check_python() -> Finding:
    v = sys.version_info
    text = f"Python {platform.python_version()} ({sys.executable})"
    if (v.major, v.minor) < MIN_PYTHON:
        return Finding(ERROR, "python", text,
                       f"khala needs Python {'.'.join(map(str, MIN_PYTHON))} or newer")
    return Finding(OK, "python", text)


def check_torch(probe: dict[str, Any], gpus_seen: int) -> list[Finding]:
    """torch importable; CUDA usable where the machine has GPUs."""
    if "probe_error" in probe:
        return [Finding(ERROR, "torch", probe["probe_error"],
                        "run `python -c 'import torch; print(torch.cuda.is_available())'` to see the failure")]
    if "torch_error" in probe:
        return [Finding(ERROR, "torch", f"torch cannot be imported: {probe['torch_error']}",
                        stack.reinstall())]
    out = [Finding(OK, "torch", f"torch {probe['torch']}"
                   + (f" (CUDA {probe['torch_cuda']})" if probe.get("torch_cuda") else " (CPU build)"))]
    devices = probe.get("devices") or []
    if probe.get("cuda_error"):
        out.append(Finding(ERROR, "cuda", f"CUDA failed: {probe['cuda_error']}",
                           "check the NVIDIA driver (nvidia-smi) and that torch's CUDA version suits it"))
    elif devices:
        out.append(Finding(OK, "cuda", f"{len(devices)} CUDA device(s) usable by torch"))
    elif gpus_seen:
        out.append(Finding(
            ERROR, "cuda",
            f"nvidia-smi lists {gpus_seen} GPU(s) but torch sees none"
            + ("" if probe.get("torch_cuda") else " (this torch is a CPU-only build)"),
            "install a CUDA build of torch 2.11 matching the driver, or render with --devices cpu",
        ))
    else:
        out.append(Finding(WARNING, "cuda", "no CUDA device: renders run on the CPU",
                           "fine for the demo model; the real model needs an NVIDIA GPU (24 GB or more) "
                           "for practical speed"))
    return out


def check_codec_stack(probe: dict[str, Any]) -> Finding | None:
    """torch, torchaudio and descript-audio-codec installed as a matching set that imports."""
    found = stack.versions()
    problem = stack.version_problem(found)
    if problem is None:
        if "stack" not in probe:
            return None  # torch itself failed: check_torch says so
        problem = stack.import_problem(probe["stack"], found)
    if problem is not None:
        return Finding(ERROR, "codec", problem.message, problem.fix)
    return Finding(OK, "codec", ", ".join(f"{d} {v}" for d, v in found.items()) + " import together")


def check_ffmpeg(find_exe: Callable[[], str]) -> Finding:
    """Where ffmpeg comes from (KHALA_FFMPEG, PATH, imageio-ffmpeg) and that it runs."""
    try:
        exe = find_exe()
    except Exception as exc:  # noqa: BLE001 - the finder's own message says why
        return Finding(ERROR, "ffmpeg", str(exc), "install ffmpeg, or pip install imageio-ffmpeg")
    if os.environ.get("KHALA_FFMPEG"):
        source = "$KHALA_FFMPEG"
    elif shutil.which("ffmpeg") and Path(shutil.which("ffmpeg")).resolve() == Path(exe).resolve():
        source = "PATH"
    elif "imageio_ffmpeg" in exe:
        source = "imageio-ffmpeg"
    else:
        source = "found"
    try:
        proc = subprocess.run([exe, "-hide_banner", "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return Finding(ERROR, "ffmpeg", f"{exe} ({source}) does not run: {exc}",
                       "install ffmpeg, or set KHALA_FFMPEG to a working binary")
    first = (proc.stdout or proc.stderr).strip().splitlines()[:1]
    if proc.returncode != 0 or not first:
        return Finding(ERROR, "ffmpeg", f"{exe} ({source}) exited with code {proc.returncode}",
                       "install ffmpeg, or set KHALA_FFMPEG to a working binary")
    version = first[0].replace("ffmpeg version ", "").split(" Copyright")[0]
    encoders = subprocess.run([exe, "-hide_banner", "-encoders"], capture_output=True, text=True,
                              timeout=30).stdout
    if "libmp3lame" not in encoders:
        return Finding(ERROR, "ffmpeg", f"ffmpeg {version} ({source}, {exe}) has no MP3 encoder (libmp3lame)",
                       "install an ffmpeg built with libmp3lame, or pip install imageio-ffmpeg")
    return Finding(OK, "ffmpeg", f"ffmpeg {version} from {source} ({exe})")


def check_model(model: Path | None, probe: dict[str, Any]) -> list[Finding]:
    """The model directory, or the download (either layout) it still has to be converted from."""
    if model is None:
        return [Finding(OK, "model", "no --model given: the model directory was not checked",
                        "pass --model DIR (a converted model) to check its files")]
    if not model.exists():
        return [Finding(ERROR, "model", f"{model} does not exist",
                        "convert the Khala download with `khala convert SRC DST`")]
    found = None if (model / "model.json").exists() else find_download(model)
    if found and found.layout == MIXED:
        return [Finding(ERROR, "model", mixed_message(model, found),
                        "then point --model at the converted directory")]
    if found:
        return [Finding(ERROR, "model", f"{model} is {LAYOUT_WORDS[found.layout]}",
                        f"convert it once: khala convert {model} {default_destination(model)}")]
    if not (model / "model.json").is_file():
        return [Finding(ERROR, "model", f"{model}: not a khala model directory (no model.json)",
                        "point --model at a converted model (khala convert SRC DST makes one)")]
    res = probe.get("model")
    if res is None:
        return [Finding(ERROR, "model", f"{model}: not checked ({probe.get('probe_error') or probe.get('torch_error')})")]
    if res["problems"]:
        shown = res["problems"][:6]
        more = f" (and {len(res['problems']) - 6} more)" if len(res["problems"]) > 6 else ""
        return [Finding(ERROR, "model", f"{model}: {p}", "convert or copy the model again")
                for p in shown[:-1]] + [
            Finding(ERROR, "model", f"{model}: {shown[-1]}{more}", "convert or copy the model again")]
    info = res["info"]
    out = [Finding(OK, "model", f"{model}: {info['name']}, complete, fingerprints match "
                                f"({info['fingerprint'][:12]})")]
    if info.get("demo"):
        out.append(Finding(WARNING, "model", "this is the demo model: tiny and untrained, it renders noise",
                           "convert the real weights for music (see the README)"))
    return out


def check_devices(probe: dict[str, Any], model: Path | None, planner: Planner | None,
                  ram: tuple[int, int] | None) -> list[Finding]:
    """Per CUDA device: the residency and batch size it can hold; on CPU: the RAM."""
    out = []
    devices = probe.get("devices") or []
    sizes = ((probe.get("model") or {}).get("sizes")) or {}
    for d in devices:
        name = f"cuda:{d['index']}"
        mem = f"{d['name']}, {d['free'] / GIB:.1f} of {d['total'] / GIB:.1f} GiB free"
        if model is None or planner is None or not sizes:
            out.append(Finding(OK, name, mem))
            continue
        plan = planner(d["total"], d["free"], model)
        if d["free"] >= plan.need_bytes:
            what = ("keep_loaded residency (all three models resident)" if plan.residency == "keep_loaded"
                    else "one_shot residency (one stage resident at a time)")
            why = f" (peak with one row {plan.need_bytes / GIB:.1f} GiB; {plan.why})" \
                if plan.why else ""
            out.append(Finding(OK, name, f"{mem}: {what}, batch size {plan.batch_size}{why}"))
        elif d["free"] >= plan.one_shot_bytes:
            out.append(Finding(WARNING, name, f"{mem}: only one_shot residency fits in the free memory, "
                                              f"batch size 1", "other processes hold GPU memory: free it "
                                              "for faster renders"))
        else:
            out.append(Finding(ERROR, name, f"{mem}: cannot hold even one model stage "
                                            f"(needs {plan.one_shot_bytes / GIB:.1f} GiB)",
                               "free the GPU or leave it out with --devices"))
    if not devices and ram is not None:
        total, avail = ram
        need = 2 * sum(sizes.values())  # weights in fp32 on the CPU (stored as bf16)
        mem = f"CPU, {avail / GIB:.1f} of {total / GIB:.1f} GiB RAM available"
        if sizes and avail < need:
            out.append(Finding(WARNING, "cpu", f"{mem}: the model needs about {need / GIB:.1f} GiB "
                                               f"in float32", "close other programs or use a GPU"))
        else:
            out.append(Finding(OK, "cpu", f"{mem}: batch size 1, keep_loaded"))
    return out


def check_decode(probe: dict[str, Any], choose: DecodeChooser) -> Finding:
    """The decode path renders get on this machine's devices by default, and why."""
    kind = "cuda" if probe.get("devices") else "cpu"
    path, why = choose(kind)
    return Finding(OK, "decode", f"{kind}: {path} by default ({why}); khala render "
                                 f"--decode-path overrides it")


def check_disk(output_dir: Path, take: int) -> Finding:
    """Free space (and write access) where the takes will go; `take`: the bytes of one
    3-minute take (outputs.bytes_per_take, passed in: outputs sits above this layer)."""
    probe = output_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError as exc:
        return Finding(ERROR, "disk", f"{output_dir}: {exc}", "choose another --output-dir")
    if not os.access(probe, os.W_OK):
        return Finding(ERROR, "disk", f"{probe} is not writable", "choose another output directory")
    takes = usage.free // take
    text = (f"{output_dir}: {usage.free / GIB:.1f} GiB free, room for about {takes} "
            f"3-minute takes (~{take / 1e6:.0f} MB each)")
    if usage.free < take:
        return Finding(ERROR, "disk", text, "free some space or choose another output directory")
    if takes < DISK_WARN_TAKES:
        return Finding(WARNING, "disk", text, "free some space before a long run")
    return Finding(OK, "disk", text)


def diagnose(model: Path | None, output_dir: Path, *, find_ffmpeg: Callable[[], str],
             take_bytes: int, gpus_seen: int = 0, planner: Planner | None = None,
             decode: DecodeChooser | None = None,
             probe: dict[str, Any] | None = None) -> list[Finding]:
    """All findings, in the order they are printed."""
    if model is not None:
        model = model.expanduser().resolve()
    probe_model = model if model is not None and (model / "model.json").exists() else None
    if probe is None:
        probe = run_probe(probe_model)
    try:
        import psutil

        vm = psutil.virtual_memory()
        ram: tuple[int, int] | None = (int(vm.total), int(vm.available))
    except ImportError:  # pragma: no cover - a declared dependency
        ram = None
    findings = [check_python()]
    findings += check_torch(probe, gpus_seen)
    codec = check_codec_stack(probe)
    if codec is not None:
        findings.append(codec)
    findings.append(check_ffmpeg(find_ffmpeg))
    findings += check_model(model, probe)
    findings += check_devices(probe, model, planner, ram)
    if decode is not None:
        findings.append(check_decode(probe, decode))
    findings.append(check_disk(output_dir.expanduser().resolve(), take_bytes))
    return findings


def as_json(findings: list[Finding]) -> str:
    return json.dumps({"ok": exit_code(findings) == 0, "findings": [asdict(f) for f in findings]})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m khala_cli.weights.doctor")
    p.add_argument("--probe", action="store_true", help="print the torch/CUDA/model probe as JSON")
    p.add_argument("--model")
    a = p.parse_args(argv)
    if not a.probe:
        p.error("run `khala doctor` (this entry point only probes)")
    warnings.simplefilter("ignore")
    print(json.dumps(_probe_main(a.model)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
