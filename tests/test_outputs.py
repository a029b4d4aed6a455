"""outputs.write_take / is_done with real files: WAV and MP3 read back, tags and bitrate from
the ffmpeg binary, codes, the sidecar, atomicity and failure behaviour."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from khala_cli import outputs
from khala_cli.plan import Render

SR = 44100
INFO = {
    "tokens": {"prompt": 42, "backbone": 5168},
    "timings": {"backbone_s": 1.5, "superres_s": 0.5, "decode_s": 0.25, "total_s": 2.25},
    "device": "cpu:0",
    "model": {"name": "test-model", "fingerprint": "f" * 64, "demo": False},
}


def tone(seconds: float = 2.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    left = amp * np.sin(2 * np.pi * 440.0 * t)
    right = amp * np.sin(2 * np.pi * 660.0 * t)
    return np.stack([left, right], axis=1).astype(np.float32)


def make_render(tmp_path: Path, **kw) -> Render:
    job = kw.pop("job_id", "night-wind")
    seed = kw.pop("seed", 1)
    base = dict(job_id=job, seed=seed, key="k" * 24, out_dir=str(tmp_path / "out" / job),
                stem=f"{job}-s{seed}", title="Night Wind", artist="The Band", album="Nights",
                tags=("J-Pop", "Piano"), lyrics="hello\nworld")
    base.update(kw)
    return Render(**base)


def ffmpeg_probe(path: Path) -> tuple[dict[str, str], str]:
    """(global tags via -f ffmetadata, ffmpeg's stderr description of the input)."""
    exe = outputs.ffmpeg_exe()
    proc = subprocess.run([exe, "-hide_banner", "-i", str(path), "-f", "ffmetadata", "-"],
                          capture_output=True, text=True, check=True)
    tags = {}
    for line in proc.stdout.splitlines():
        if "=" in line and not line.startswith(";"):
            k, v = line.split("=", 1)
            tags[k] = v.replace("\\;", ";")
    return tags, proc.stderr


def test_write_take_wav_mp3_json_read_back(tmp_path):
    r = make_render(tmp_path)
    audio = tone(2.0)
    files = outputs.write_take(r, audio, SR, info=INFO)
    assert set(files) == {"wav", "mp3", "json"}
    assert files["wav"] == str(r.path(".wav")) and files["json"] == str(r.path(".json"))

    info = sf.info(files["wav"])
    assert (info.samplerate, info.channels, info.subtype, info.format) == (SR, 2, "PCM_24", "WAV")
    assert info.frames == audio.shape[0]
    back, sr = sf.read(files["wav"], dtype="float32")
    assert sr == SR
    assert np.max(np.abs(back - audio)) < 1e-5  # 24-bit: ~1.2e-7 quantisation step

    mp3_info = sf.info(files["mp3"])
    assert mp3_info.format == "MP3"
    assert (mp3_info.samplerate, mp3_info.channels) == (SR, 2)
    mp3_audio, _ = sf.read(files["mp3"], dtype="float32")
    assert abs(mp3_audio.shape[0] / SR - 2.0) < 0.1
    assert 0.3 < np.max(np.abs(mp3_audio)) < 0.7  # the tone survived encoding

    tags, desc = ffmpeg_probe(Path(files["mp3"]))
    assert tags["title"] == "Night Wind"
    assert tags["artist"] == "The Band"
    assert tags["album"] == "Nights"
    assert "seed 1" in tags["comment"]
    m = re.search(r"Audio: mp3.*?, (\d+) kb/s", desc)
    assert m and int(m.group(1)) == 320, desc
    assert "44100 Hz, stereo" in desc

    side = json.loads(Path(files["json"]).read_text())
    for key in ("render_key", "job_id", "title", "seed", "mode", "prompt_mode", "tags", "prompt",
                "lyrics", "duration_min", "top_k_bb", "top_k_sr", "temperature", "model",
                "audio", "tokens", "timings", "device", "khala_version", "created_at",
                "files"):
        assert key in side, key
    assert side["render_key"] == r.key and side["job_id"] == "night-wind" and side["seed"] == 1
    assert side["tags"] == ["J-Pop", "Piano"] and side["lyrics"] == "hello\nworld"
    assert side["model"] == {"name": "test-model", "fingerprint": "f" * 64, "demo": False}
    assert side["audio"] == {"sample_rate": SR, "channels": 2, "seconds": 2.0}
    assert side["tokens"] == {"prompt": 42, "backbone": 5168}
    assert side["timings"]["total_s"] == 2.25 and side["device"] == "cpu:0"
    assert side["files"] == {"wav": "night-wind-s1.wav", "mp3": "night-wind-s1.mp3"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", side["created_at"])
    assert "note" not in side
    assert outputs.is_done(r)
    assert outputs.temp_files(tmp_path) == []


def test_mp3_without_artist_album_has_title_only(tmp_path):
    r = make_render(tmp_path, artist="", album="", title="")
    files = outputs.write_take(r, tone(0.5), SR, info=INFO)
    tags, _ = ffmpeg_probe(Path(files["mp3"]))
    assert tags["title"] == "night-wind-s1"
    assert "artist" not in tags and "album" not in tags


def test_demo_model_is_marked_in_sidecar_and_mp3(tmp_path):
    r = make_render(tmp_path)
    info = {**INFO, "model": {"name": "demo", "fingerprint": "d" * 64, "demo": True}}
    files = outputs.write_take(r, tone(0.5), SR, info=info)
    side = json.loads(Path(files["json"]).read_text())
    assert side["model"]["demo"] is True
    assert "untrained" in side["note"] and "noise" in side["note"]
    tags, _ = ffmpeg_probe(Path(files["mp3"]))
    assert "untrained" in tags["comment"]


def test_save_codes_writes_int16_codes(tmp_path):
    r = make_render(tmp_path, save_codes=True)
    codes = np.random.default_rng(0).integers(0, 1024, size=(64, 43), dtype=np.int64)
    files = outputs.write_take(r, tone(1.0), SR, codes=codes, info=INFO)
    assert files["codes"] == str(r.path(".codes.npy"))
    back = np.load(files["codes"], allow_pickle=False)
    assert back.dtype == np.int16 and back.shape == (64, 43)
    assert np.array_equal(back.astype(np.int64), codes)
    side = json.loads(r.path(".json").read_text())
    assert side["files"]["codes"] == "night-wind-s1.codes.npy"
    assert outputs.is_done(r)
    r.path(".codes.npy").unlink()
    assert not outputs.is_done(r)  # --save-codes asked for codes: without them, not done


def test_save_codes_without_codes_fails_before_the_sidecar(tmp_path):
    r = make_render(tmp_path, save_codes=True)
    with pytest.raises(outputs.OutputError, match="no codes"):
        outputs.write_take(r, tone(0.5), SR, codes=None, info=INFO)
    assert not r.path(".json").exists() and not outputs.is_done(r)


def test_mp3_failure_fails_the_take_with_the_reason(tmp_path, monkeypatch):
    r = make_render(tmp_path)
    fake = tmp_path / "broken-ffmpeg"
    fake.write_text("#!/bin/sh\necho 'Unknown encoder libmp3lame' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("KHALA_FFMPEG", str(fake))
    with pytest.raises(outputs.OutputError) as exc:
        outputs.write_take(r, tone(0.5), SR, info=INFO)
    assert "MP3 encoding failed" in str(exc.value)
    assert "Unknown encoder libmp3lame" in str(exc.value)
    assert not r.path(".mp3").exists()  # never a WAV under the MP3's name
    assert not r.path(".json").exists()
    assert not outputs.is_done(r)
    assert outputs.temp_files(tmp_path) == []


def test_missing_ffmpeg_binary_fails_with_the_reason(tmp_path, monkeypatch):
    r = make_render(tmp_path)
    monkeypatch.setenv("KHALA_FFMPEG", str(tmp_path / "no-such-ffmpeg"))
    with pytest.raises(outputs.OutputError, match="cannot run ffmpeg"):
        outputs.write_take(r, tone(0.5), SR, info=INFO)
    assert not r.path(".json").exists() and not r.path(".mp3").exists()


def test_failure_of_one_take_leaves_another_intact(tmp_path, monkeypatch):
    good = make_render(tmp_path, seed=1)
    outputs.write_take(good, tone(0.5), SR, info=INFO)
    before = {p.name: p.read_bytes() for p in Path(good.out_dir).iterdir()}
    bad = make_render(tmp_path, seed=2)
    monkeypatch.setenv("KHALA_FFMPEG", "/bin/false")
    with pytest.raises(outputs.OutputError):
        outputs.write_take(bad, tone(0.5), SR, info=INFO)
    assert outputs.is_done(good) and not outputs.is_done(bad)
    for name, data in before.items():
        assert (Path(good.out_dir) / name).read_bytes() == data


def test_bad_audio_is_refused(tmp_path):
    r = make_render(tmp_path)
    a = tone(0.2)
    a[10, 0] = np.nan
    with pytest.raises(outputs.OutputError, match="NaN"):
        outputs.write_take(r, a, SR, info=INFO)
    with pytest.raises(outputs.OutputError, match="shape"):
        outputs.write_take(r, np.zeros((2, 3, 4), np.float32), SR, info=INFO)
    assert not Path(r.out_dir).exists() or not any(Path(r.out_dir).iterdir())


def test_out_of_range_audio_is_clipped_not_wrapped(tmp_path):
    r = make_render(tmp_path)
    a = np.full((SR // 10, 2), 1.7, np.float32)
    a[:, 1] = -3.0
    outputs.write_take(r, a, SR, info=INFO)
    back, _ = sf.read(r.path(".wav"), dtype="float32")
    assert np.allclose(back[:, 0], 1.0, atol=1e-6) and np.allclose(back[:, 1], -1.0, atol=1e-6)


def test_is_done_needs_matching_key_and_audio(tmp_path):
    r = make_render(tmp_path)
    assert not outputs.is_done(r)
    outputs.write_take(r, tone(0.3), SR, info=INFO)
    assert outputs.is_done(r)
    other = make_render(tmp_path, key="x" * 24)  # same files, other settings
    assert not outputs.is_done(other)
    r.path(".mp3").unlink()
    assert not outputs.is_done(r)
    outputs.write_take(r, tone(0.3), SR, info=INFO)
    r.path(".json").write_text("{not json")
    assert not outputs.is_done(r)


def test_a_failed_encode_leaves_the_old_take_whole(tmp_path, monkeypatch):
    r = make_render(tmp_path)
    outputs.write_take(r, tone(0.3), SR, info=INFO)
    before = {s: r.path(s).read_bytes() for s in (".wav", ".mp3", ".json")}
    # A re-render (same key, e.g. --force) whose MP3 encode fails: everything is encoded
    # before anything is written, so the old take is still whole and done.
    monkeypatch.setenv("KHALA_FFMPEG", "/bin/false")
    with pytest.raises(outputs.OutputError):
        outputs.write_take(r, tone(0.6), SR, info=INFO)
    assert {s: r.path(s).read_bytes() for s in before} == before and outputs.is_done(r)


def test_a_failed_write_after_the_wav_leaves_no_done_sidecar(tmp_path, monkeypatch):
    r = make_render(tmp_path)
    outputs.write_take(r, tone(0.3), SR, info=INFO)
    real = outputs.write_bytes

    def fail_mp3(path, data):
        if path.suffix == ".mp3":
            raise outputs.OutputError(f"cannot write {path}: No space left on device",
                                      path=path, no_space=True)
        return real(path, data)

    monkeypatch.setattr(outputs, "write_bytes", fail_mp3)
    with pytest.raises(outputs.OutputError) as exc:
        outputs.write_take(r, tone(0.6), SR, info=INFO)
    assert exc.value.no_space and exc.value.path == r.path(".mp3")
    # the new WAV is in place: the old sidecar must not claim the take is done
    assert not r.path(".json").exists() and not outputs.is_done(r)
    # and the old version is whole, aside
    aside = tmp_path / "out" / ".khala" / "superseded" / "night-wind" / "night-wind-s1" / r.key
    assert sorted(p.name for p in aside.iterdir()) == [
        "night-wind-s1.json", "night-wind-s1.mp3", "night-wind-s1.wav"]


def test_every_rerender_moves_the_old_take_aside_whole(tmp_path):
    old = make_render(tmp_path, key="a" * 24, save_codes=True)
    codes = np.ones((64, 10), dtype=np.int64)
    outputs.write_take(old, tone(0.3), SR, codes=codes, info=INFO)
    before = {s: old.path(s).read_bytes() for s in outputs.TAKE_SUFFIXES}
    new = make_render(tmp_path, key="b" * 24, save_codes=True)  # other settings
    outputs.write_take(new, tone(0.6), SR, codes=codes, info=INFO)
    assert outputs.is_done(new)
    aside = tmp_path / "out" / ".khala" / "superseded" / "night-wind" / "night-wind-s1"
    assert {s: (aside / ("a" * 24) / f"night-wind-s1{s}").read_bytes()
            for s in outputs.TAKE_SUFFIXES} == before
    for _ in range(2):  # the same key again (--force): a new folder each time, none replaced
        outputs.write_take(new, tone(0.6), SR, codes=codes, info=INFO)
    assert sorted(p.name for p in aside.iterdir()) == ["a" * 24, "b" * 24, "b" * 24 + "-2"]
    versions, size = outputs.superseded_usage(tmp_path / "out")
    assert versions == 3 and size == sum(f.stat().st_size for f in aside.rglob("*.*"))
    assert outputs.temp_files(tmp_path / "out") == []


def test_files_left_without_a_sidecar_move_aside_too(tmp_path):
    r = make_render(tmp_path)
    Path(r.out_dir).mkdir(parents=True)
    r.path(".wav").write_bytes(b"left by a crash")
    outputs.write_take(r, tone(0.3), SR, info=INFO)
    aside = tmp_path / "out" / ".khala" / "superseded" / "night-wind" / "night-wind-s1"
    assert (aside / "no-sidecar" / "night-wind-s1.wav").read_bytes() == b"left by a crash"
    assert outputs.is_done(r)


def test_sidecar_records_sizes_and_hashes_and_is_done_compares_sizes(tmp_path):
    import hashlib

    r = make_render(tmp_path, save_codes=True)
    outputs.write_take(r, tone(0.5), SR, codes=np.ones((64, 10), dtype=np.int64), info=INFO)
    rec = json.loads(r.path(".json").read_text())["file_records"]
    for kind, suffix in (("wav", ".wav"), ("mp3", ".mp3"), ("codes", ".codes.npy")):
        data = r.path(suffix).read_bytes()
        assert rec[kind] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert outputs.is_done(r)
    mp3 = r.path(".mp3")
    mp3.write_bytes(mp3.read_bytes()[:-100])  # a truncated copy
    assert not outputs.is_done(r)


def test_sidecar_from_before_the_records_still_counts_as_done(tmp_path):
    r = make_render(tmp_path)
    outputs.write_take(r, tone(0.3), SR, info=INFO)
    side = json.loads(r.path(".json").read_text())
    del side["file_records"]
    r.path(".json").write_text(json.dumps(side))
    assert outputs.is_done(r)
    r.path(".wav").unlink()
    assert not outputs.is_done(r)


def test_a_full_disk_and_a_read_only_one_carry_the_os_words(small_fs):
    fs = small_fs(1)  # 1 MiB
    with pytest.raises(outputs.OutputError) as exc:
        outputs.write_bytes(fs / "big.wav", b"x" * 3_000_000)
    err = exc.value
    assert err.no_space and err.path == fs / "big.wav"
    assert "No space left on device" in str(err) and "System error" not in str(err)
    assert list(fs.iterdir()) == []  # nothing half-written
    small_fs.read_only(fs)
    with pytest.raises(outputs.OutputError) as exc:
        outputs.write_bytes(fs / "x.wav", b"data")
    assert exc.value.no_space and "Read-only file system" in str(exc.value)


def test_files_get_normal_permissions(tmp_path):
    r = make_render(tmp_path)
    files = outputs.write_take(r, tone(0.2), SR, info=INFO)
    for p in files.values():
        assert Path(p).stat().st_mode & 0o044 == 0o044, p  # group/other can read


def test_temp_files_by_stem(tmp_path):
    d = tmp_path / "job"
    d.mkdir()
    names = [".tmp-job-s1.wav.abc123", ".tmp-job-s1.codes.npy.x_1", ".tmp-job-s12.mp3.zz",
             ".tmp-job-s2.json.q", "job-s1.wav"]
    for n in names:
        (d / n).write_text("x")
    assert [p.name for p in outputs.temp_files(tmp_path)] == sorted(names[:4])
    assert sorted(p.name for p in outputs.temp_files(tmp_path, {"job-s1"})) == sorted(names[:2])
    assert [p.name for p in outputs.temp_files(tmp_path, {"job-s12"})] == [names[2]]


def test_check_ffmpeg(tmp_path, monkeypatch):
    assert outputs.check_ffmpeg() is None  # the real binary has libmp3lame
    monkeypatch.setenv("KHALA_FFMPEG", "/bin/false")
    assert "-encoders failed" in outputs.check_ffmpeg()


# ---- khala verify ------------------------------------------------------------------------


def test_verify_names_each_damaged_file_and_fix_rerenders_only_those(tmp_path):
    from click.testing import CliRunner

    from khala_cli.cli import _register, cli

    _register()
    takes = [make_render(tmp_path, seed=s) for s in (1, 2, 3, 4)]
    for r in takes:
        outputs.write_take(r, tone(0.5), SR, info=INFO)
    ok = CliRunner().invoke(cli, ["verify", str(tmp_path / "out")])
    assert ok.exit_code == 0 and "verified 4 takes: all whole" in ok.output
    mp3 = takes[0].path(".mp3")
    mp3.write_bytes(mp3.read_bytes()[: len(mp3.read_bytes()) // 2])  # truncated
    takes[1].path(".wav").unlink()  # deleted
    wav = takes[2].path(".wav")  # bit rot: same size, other bytes
    data = bytearray(wav.read_bytes())
    data[-10] ^= 0xFF
    wav.write_bytes(bytes(data))
    res = CliRunner().invoke(cli, ["verify", str(tmp_path / "out")])
    assert res.exit_code == 1
    assert f"damaged: {mp3}: " in res.output and "the sidecar records" in res.output
    assert f"damaged: {takes[1].path('.wav')}: missing" in res.output
    assert f"damaged: {wav}: its sha256 differs" in res.output
    assert "3 damaged" in res.output
    # the truncated and the missing files are not done; bit rot needs the hash (verify)
    assert [outputs.is_done(r) for r in takes] == [False, False, True, True]
    fixed = CliRunner().invoke(cli, ["verify", str(tmp_path / "out"), "--fix"])
    assert fixed.exit_code == 1
    assert [outputs.is_done(r) for r in takes] == [False, False, False, True]
    assert (tmp_path / "out" / ".khala" / "damaged" / "night-wind" / "night-wind-s3.json").exists()
    again = CliRunner().invoke(cli, ["verify", str(tmp_path / "out")])
    assert again.exit_code == 0 and "verified 1 takes" in again.output


def test_verify_decodes_old_sidecars_without_records(tmp_path):
    from click.testing import CliRunner

    from khala_cli.cli import _register, cli

    _register()
    r = make_render(tmp_path)
    outputs.write_take(r, tone(0.5), SR, info=INFO)
    side = json.loads(r.path(".json").read_text())
    del side["file_records"]
    r.path(".json").write_text(json.dumps(side))
    assert CliRunner().invoke(cli, ["verify", str(tmp_path / "out")]).exit_code == 0
    r.path(".mp3").write_bytes(b"\xff\xfbgarbage" * 10)  # a garbage MP3
    res = CliRunner().invoke(cli, ["verify", str(tmp_path / "out")])
    assert res.exit_code == 1 and "does not decode" in res.output
