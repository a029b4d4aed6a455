"""Keepers and the export: real takes written by the real writer, exported files read back
with mutagen, soundfile and pyloudnorm."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from khala_cli import outputs
from khala_cli.catalogue.names import safe_component
from khala_cli.cli import _register, cli
from khala_cli.plan import Render

SR = 44100


def noise(seconds: float, rms_db: float, seed: int, peaky: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((int(SR * seconds), 2)).astype(np.float32)
    x *= 10 ** (rms_db / 20)
    if peaky:  # sparse spikes near full scale: needs the limiter at -14 LUFS
        x[:: SR // 7] = 0.99
    return x


def take(root: Path, job: str, seed: int, audio: np.ndarray, *, title: str, score: float,
         artist: str = "The Band", album: str = "Nights", flags: tuple = (), **kw) -> None:
    r = Render(job_id=job, seed=seed, key=f"key{job}{seed}", out_dir=str(root / job),
               stem=f"{job}-s{seed}", title=title, artist=artist, album=album,
               lyrics="[verse]\nla la la", **kw)
    outputs.write_take(r, audio, SR, info={"device": "cpu:0", "model": {
        "name": "test", "fingerprint": "fp123", "demo": False}})
    side = json.loads(r.path(".json").read_text())
    side["analysis"].update(score=score, flags=list(flags))
    r.path(".json").write_text(json.dumps(side))


@pytest.fixture
def out(tmp_path) -> Path:
    root = tmp_path / "out"
    take(root, "night", 1, noise(3, -30, 1), title="Night Wind", score=-2.0, job_index=0,
         year=2026, genre="Pop")
    take(root, "night", 2, noise(3, -20, 2, peaky=True), title="Night Wind", score=-1.0,
         job_index=0, year=2026, genre="Pop")
    take(root, "night", 3, noise(3, -20, 3), title="Night Wind", score=-0.5, job_index=0,
         flags=("clipping",))
    take(root, "paper", 5, noise(3, -25, 5), title="Paper Boats", score=-3.0, job_index=1,
         track=7)
    reports = root / "reports"
    reports.mkdir()
    report = json.dumps({"summary": {}, "renders": [
        {"job_id": "paper", "seed": 6, "status": "failed", "error": "boom"}]})
    for name in ("run-20260101T000000Z.json", "latest.json"):  # as a run writes them
        (reports / name).write_text(report)
    return root


def khala(*args: str):
    _register()
    return CliRunner().invoke(cli, [str(a) for a in args])


def marks(root: Path) -> list[tuple[str, int]]:
    data = json.loads((root / "keepers.json").read_text())
    return [(k["job_id"], k["seed"]) for k in data["keepers"]]


# ---- keep ------------------------------------------------------------------------------


def test_keep_drop_and_top(out):
    assert khala("keep", out, "night:1", "paper:5").exit_code == 0
    assert marks(out) == [("night", 1), ("paper", 5)]
    assert khala("keep", out, "--drop", "night:1").exit_code == 0
    assert marks(out) == [("paper", 5)]
    res = khala("keep", out, "--top", "1", "--only", "night")
    assert res.exit_code == 0, res.output
    assert marks(out) == [("paper", 5), ("night", 2)]  # the best unflagged, not seed 3


@pytest.mark.parametrize("arg,msg", [
    ("ghost:1", "no job 'ghost'"),
    ("night:9", "no rendered take with seed 9"),
    ("paper:6", "this take failed"),
    ("night-1", "is not a take: write JOB:SEED"),
])
def test_keep_refuses_bad_takes_and_changes_nothing(out, arg, msg):
    assert khala("keep", out, "night:1").exit_code == 0
    before = (out / "keepers.json").read_bytes()
    res = khala("keep", out, arg, "paper:5")
    assert res.exit_code == 2 and msg in res.output and arg.split(":")[0] in res.output
    assert (out / "keepers.json").read_bytes() == before


def test_keep_and_the_page_read_only_the_latest_report_of_each_shard(out):
    from khala_cli.review.page import write_page

    reports = out / "reports"
    old = {"started_at": "2025-01-01T00:00:00Z", "summary": {}, "renders": [
        {"job_id": "night", "seed": 7, "status": "failed", "error": "old boom"}]}
    (reports / "run-20250101T000000Z.json").write_text(json.dumps(old))  # not the latest
    shard = {"started_at": "2026-01-02T00:00:00Z", "summary": {}, "renders": [
        {"job_id": "night", "seed": 8, "status": "failed", "error": "shard boom"}]}
    (reports / "latest-shard-1-of-2.json").write_text(json.dumps(shard))
    assert "no rendered take with seed 7" in khala("keep", out, "night:7").output
    assert "this take failed" in khala("keep", out, "night:8").output
    assert "this take failed" in khala("keep", out, "paper:6").output  # latest.json
    page = write_page(out).read_text()
    assert "shard boom" in page and "boom" in page and "old boom" not in page


def test_the_page_shows_keepers(out):
    khala("keep", out, "night:2")
    page = (out / "reports" / "index.html").read_text()
    assert 'data-kept="1"' in page


# ---- export ----------------------------------------------------------------------------


def measured(path: Path) -> tuple[float, float]:
    """Integrated loudness and true peak as ffmpeg's ebur128 filter reads them: not the
    helpers the export loops on, so the two can disagree."""
    import imageio_ffmpeg

    proc = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-nostats", "-hide_banner", "-i",
                           str(path), "-af", "ebur128=peak=true", "-f", "null", "-"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = proc.stderr[proc.stderr.rindex("Summary:"):]
    lufs = re.search(r"I:\s+(-?[\d.]+) LUFS", summary)
    peak = re.search(r"True peak:\s+Peak:\s+(-?[\d.]+|-inf) dBFS", summary)
    return float(lufs.group(1)), float(peak.group(1))


def test_export_mp3_loudness_tags_and_catalogue(out, tmp_path):
    from mutagen.id3 import ID3

    khala("keep", out, "night:1", "night:2", "paper:5")
    dest = tmp_path / "cat"
    res = khala("export", out, dest)
    assert res.exit_code == 0, res.output
    album = dest / "The Band" / "Nights"
    names = sorted(p.name for p in album.iterdir())
    assert names == ["01 Night Wind (take 2).mp3", "01 Night Wind.mp3", "07 Paper Boats.mp3"]
    for p in album.iterdir():
        lufs, tp = measured(p)
        assert lufs == pytest.approx(-14.0, abs=0.35), p.name  # MP3 moves it a little
        assert tp <= -1.0, (p.name, tp)
    tags = ID3(album / "01 Night Wind.mp3")
    assert str(tags["TIT2"]) == "Night Wind" and str(tags["TPE1"]) == "The Band"
    assert str(tags["TALB"]) == "Nights" and str(tags["TRCK"]) == "1/7"
    assert str(tags["TDRC"]) == "2026" and str(tags["TCON"]) == "Pop"
    assert tags.getall("USLT")[0].text == "[verse]\nla la la"
    txxx = {f.desc: str(f) for f in tags.getall("TXXX")}
    assert txxx["khala_seed"] == "2"  # the best take gets the plain name
    assert txxx["khala_render_key"] == "keynight2"
    assert txxx["khala_model_fingerprint"] == "fp123" and "khala_version" in txxx
    rows = json.loads((dest / "catalogue.json").read_text())["files"]
    assert len(rows) == 3 and (dest / "catalogue.csv").read_text().count("\n") == 4
    row = next(r for r in rows if r["file"].endswith("07 Paper Boats.mp3"))
    assert row["source"] == "paper/paper-s5.json"
    assert row["lufs_before"] == pytest.approx(measured(out / "paper" / "paper-s5.wav")[0],
                                               abs=0.05)
    assert row["lufs_after"] == pytest.approx(-14.0, abs=0.5)
    import hashlib
    assert row["sha256"] == hashlib.sha256((dest / row["file"]).read_bytes()).hexdigest()
    peaky = next(r for r in rows if r["seed"] == 2)
    assert peaky["limited"] is True  # its peaks needed the limiter


def test_export_flac_and_wav_and_loudness_off(out, tmp_path):
    from mutagen.flac import FLAC
    from mutagen.wave import WAVE

    khala("keep", out, "paper:5")
    dest = tmp_path / "cat"
    res = khala("export", out, dest, "--format", "flac", "--format", "wav",
                "--loudness", "-16", "--true-peak", "-2")
    assert res.exit_code == 0, res.output
    flac = dest / "The Band" / "Nights" / "07 Paper Boats.flac"
    wav = flac.with_suffix(".wav")
    for p in (flac, wav):
        lufs, tp = measured(p)
        assert lufs == pytest.approx(-16.0, abs=0.15) and tp <= -2.0
    f = FLAC(flac)
    assert f["TITLE"] == ["Paper Boats"] and f["TRACKNUMBER"] == ["7"]
    assert f["KHALA_SEED"] == ["5"] and f["LYRICS"] == ["[verse]\nla la la"]
    assert str(WAVE(wav).tags["TIT2"]) == "Paper Boats"
    off = tmp_path / "off"
    assert khala("export", out, off, "--loudness", "off", "--format", "flac").exit_code == 0
    src, _ = sf.read(str(out / "paper" / "paper-s5.wav"), dtype="float32")
    got, _ = sf.read(str(off / "The Band" / "Nights" / "07 Paper Boats.flac"), dtype="float32")
    assert np.abs(got - src).max() < 1e-6  # the audio as rendered


def test_repeating_the_export_writes_nothing_and_a_changed_set_only_what_changed(out, tmp_path):
    dest = tmp_path / "cat"
    khala("keep", out, "night:1", "paper:5")
    assert khala("export", out, dest).exit_code == 0
    files = {p: p.stat().st_mtime_ns for p in dest.rglob("*.mp3")}
    again = khala("export", out, dest)
    assert "exported 0 files, 2 unchanged" in again.output
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*.mp3")} == files
    khala("keep", out, "--drop", "paper:5")
    res = khala("export", out, dest)
    assert "exported 0 files, 1 unchanged, 1 removed" in res.output, res.output
    assert not (dest / "The Band" / "Nights" / "07 Paper Boats.mp3").exists()
    first = dest / "The Band" / "Nights" / "01 Night Wind.mp3"
    assert first.stat().st_mtime_ns == files[first]
    # a better take of the same song: it takes the plain name, seed 1 becomes "take 2"
    khala("keep", out, "night:2")
    res = khala("export", out, dest)
    assert "exported 2 files, 0 unchanged, 0 removed" in res.output, res.output
    rows = {r["file"]: r["seed"] for r in
            json.loads((dest / "catalogue.json").read_text())["files"]}
    assert rows == {"The Band/Nights/01 Night Wind.mp3": 2,
                    "The Band/Nights/01 Night Wind (take 2).mp3": 1}


def test_a_foreign_file_is_never_overwritten_without_force(out, tmp_path):
    dest = tmp_path / "cat"
    khala("keep", out, "paper:5")
    foreign = dest / "The Band" / "Nights" / "07 Paper Boats.mp3"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"my own file")
    res = khala("export", out, dest)
    assert res.exit_code == 2 and str(foreign) in res.output
    assert foreign.read_bytes() == b"my own file" and not (dest / "catalogue.json").exists()
    assert khala("export", out, dest, "--force").exit_code == 0
    assert foreign.read_bytes() != b"my own file"


def test_hostile_titles_make_safe_distinct_names(tmp_path):
    root = tmp_path / "out"
    titles = {"a": "AC/DC: *Live* ..", "b": "..", "c": "夜の風 🌙", "d": "x" * 300,
              "e": "Same", "f": "Same", "g": "con"}
    for i, (job, title) in enumerate(titles.items()):
        take(root, job, 1, noise(2, -25, i), title=title, score=-1.0, job_index=i,
             artist="A/B", album="..")
    assert khala("keep", root, *[f"{j}:1" for j in titles]).exit_code == 0
    dest = tmp_path / "cat"
    res = khala("export", root, dest)
    assert res.exit_code == 0, res.output
    files = sorted(dest.rglob("*.mp3"))
    assert len(files) == 7
    for p in files:
        rel = p.relative_to(dest)
        assert len(rel.parts) == 3 and ".." not in rel.parts and rel.parts[1] == "Unknown Album"
        assert all(len(part.encode()) <= 255 and part == safe_component(part.removesuffix(
            ".mp3"), suffix=".mp3" if part.endswith(".mp3") else "") for part in rel.parts)
        assert not any(c in "/\\:*?\"<>|" for c in p.name)
    names = [p.name for p in files]
    assert "03 夜の風 🌙.mp3" in names and "01 AC_DC_ _Live_.mp3" in names
    assert "07 con.mp3" in names  # not a device name once numbered
    assert {"05 Same.mp3", "06 Same.mp3"} <= set(names)


def test_safe_component_rules():
    assert safe_component("CON.txt") == "_CON.txt"
    assert safe_component("trail. . ") == "trail"
    assert safe_component("a\x00b\nc") == "a_b_c"
    long = safe_component("é" * 300, suffix=" (take 2).flac")
    assert len(long.encode()) <= 255 and long.endswith(" (take 2).flac")


def test_a_full_destination_disk_fails_cleanly(out, small_fs):
    dest = small_fs(1)
    khala("keep", out, "night:1", "night:2", "paper:5")
    res = khala("export", out, dest, "--format", "wav")
    assert res.exit_code == 74, res.output
    assert "No space left on device" in res.output
    assert outputs.temp_files(dest) == []  # nothing half-written


def test_export_without_keepers_exits_2(out, tmp_path):
    res = khala("export", out, tmp_path / "cat")
    assert res.exit_code == 2 and "no keepers" in res.output


@pytest.mark.slow
def test_rendered_takes_carry_the_manifest_tags_into_the_export(tmp_path, demo_model_dir):
    from mutagen.id3 import ID3

    manifest = tmp_path / "jobs.yaml"
    manifest.write_text(
        "model: demo\noutput_dir: out\n"
        "defaults: {max_minutes: 0.05, artist: Demo Band, album: Noise Tests, year: 2025, "
        "genre: Ambient}\njobs:\n"
        "  - {id: first, title: First Light, tags: [Pop], lyrics: \"[verse]\\nhello\", "
        "seeds: [1], track: 3}\n"
        "  - {id: second, title: Second, mode: instrumental, tags: [Piano], seeds: [2]}\n")
    proc = subprocess.run([sys.executable, "-m", "khala_cli", "render", str(manifest),
                           "--devices", "cpu", "--quiet"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert khala("keep", out, "first:1", "second:2").exit_code == 0
    res = khala("export", out, tmp_path / "cat")
    assert res.exit_code == 0, res.output
    album = tmp_path / "cat" / "Demo Band" / "Noise Tests"
    first, second = ID3(album / "03 First Light.mp3"), ID3(album / "02 Second.mp3")
    assert str(first["TRCK"]) == "3/3" and str(second["TRCK"]) == "2/3"
    assert str(first["TDRC"]) == "2025" and str(first["TCON"]) == "Ambient"
    assert first.getall("USLT")[0].text == "[verse]\nhello"
    assert "noise" in str(first.getall("COMM")[0])  # demo takes say what they are


# ---- keepers are protected -------------------------------------------------------------


def sha1(path: Path) -> str:
    import hashlib
    return hashlib.sha1(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_keeper_survives_a_changed_setting_and_force_moves_the_old_one_aside(
        tmp_path, demo_model_dir):
    manifest = tmp_path / "jobs.yaml"
    text = ("model: demo\noutput_dir: out\ndefaults: {max_minutes: 0.05, temperature: 1.0}\n"
            "jobs:\n  - {id: song, tags: [Pop], lyrics: \"[verse]\\nla la\", seeds: [1, 2]}\n")
    manifest.write_text(text)

    def render(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "khala_cli", "render", str(manifest),
                               "--devices", "cpu", "--quiet", *args], capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return proc

    render()
    out, song = tmp_path / "out", tmp_path / "out" / "song"
    assert (song / "song-s1.codes.npy").exists()  # codes are saved by default
    assert khala("keep", out, "song:1").exit_code == 0
    kept_sha, kept_key = sha1(song / "song-s1.wav"), json.loads(
        (song / "song-s1.json").read_text())["render_key"]
    other_key = json.loads((song / "song-s2.json").read_text())["render_key"]

    manifest.write_text(text.replace("temperature: 1.0", "temperature: 0.8"))
    shown = khala("plan", manifest)
    assert "kept: not re-rendered" in shown.output and "song:1" in shown.output, shown.output
    planned = json.loads(khala("plan", manifest, "--json").output)
    assert [(x["seed"], x["status"]) for x in planned["renders"]] == [(1, "kept"),
                                                                      (2, "rerender")]
    proc = render()
    assert "kept: not re-rendered" in proc.stderr and "song:1" in proc.stderr
    assert sha1(song / "song-s1.wav") == kept_sha  # the keeper is untouched
    # the take that was not kept re-rendered; its old version moved aside, whole
    old2 = out / ".khala" / "superseded" / "song" / "song-s2" / other_key
    assert sorted(p.name for p in old2.iterdir()) == [
        "song-s2.codes.npy", "song-s2.json", "song-s2.mp3", "song-s2.wav"]
    assert json.loads((old2 / "song-s2.json").read_text())["render_key"] == other_key

    render("--force")
    assert sha1(song / "song-s1.wav") != kept_sha  # --force re-rendered the keeper ...
    old1 = out / ".khala" / "superseded" / "song" / "song-s1" / kept_key
    assert sha1(old1 / "song-s1.wav") == kept_sha  # ... and kept the old version
    assert json.loads((old1 / "song-s1.json").read_text())["render_key"] == kept_key
    report = khala("report", out)
    assert report.exit_code == 0 and "superseded: 3 replaced take versions" in report.output
    assert re.search(r"versions, \d+\.\d MB, under .*superseded", report.output), report.output
    assert khala("verify", out).exit_code == 0  # what moved aside is never read as a take


# ---- one library, many sources ---------------------------------------------------------


def test_two_sources_in_one_destination_keep_each_other(tmp_path):
    one, two, dest = tmp_path / "out1", tmp_path / "out2", tmp_path / "music"
    take(one, "song", 1, noise(2, -25, 1), title="Song 1", score=-1.0, artist="Band1",
         album="Album1")
    take(two, "song", 1, noise(2, -25, 2), title="Song 1", score=-1.0, artist="Band2",
         album="Album2")
    take(two, "clash", 1, noise(2, -25, 3), title="Song 1", score=-1.0, artist="Band1",
         album="Album1")  # the same name as out1's file
    assert khala("keep", one, "song:1").exit_code == 0
    assert khala("keep", two, "song:1").exit_code == 0
    assert khala("export", one, dest).exit_code == 0
    first = dest / "Band1" / "Album1" / "01 Song 1.mp3"
    before = first.read_bytes()
    res = khala("export", two, dest)
    assert res.exit_code == 0 and "0 removed" in res.output, res.output
    assert first.read_bytes() == before  # the first album survives
    rows = {r["file"]: r for r in json.loads((dest / "catalogue.json").read_text())["files"]}
    assert {r["output_dir"] for r in rows.values()} == {str(one.resolve()), str(two.resolve())}
    assert rows["Band1/Album1/01 Song 1.mp3"]["output_dir"] == str(one.resolve())
    # a file of the other source is in the way, named with its source
    assert khala("keep", two, "clash:1").exit_code == 0
    res = khala("export", two, dest)
    assert res.exit_code == 2 and str(first) in res.output and str(one.resolve()) in res.output
    assert first.read_bytes() == before
    # dropping a take removes only what this source wrote
    assert khala("keep", two, "--drop", "clash:1", "--drop", "song:1").exit_code == 0
    assert khala("keep", one, "song:1").exit_code == 0
    res = khala("export", two, dest)
    assert res.exit_code == 2 and "no keepers" in res.output
    assert khala("keep", two, "song:1").exit_code == 0
    assert khala("export", one, dest).exit_code == 0
    assert first.read_bytes() == before and (dest / "Band2" / "Album2" / "01 Song 1.mp3").exists()
    rows = json.loads((dest / "catalogue.json").read_text())["files"]
    assert len(rows) == 2 and "output_dir" in (dest / "catalogue.csv").read_text()


def test_rows_from_before_the_source_was_recorded_are_never_removed(out, tmp_path):
    dest = tmp_path / "cat"
    khala("keep", out, "night:1", "paper:5")
    assert khala("export", out, dest).exit_code == 0
    data = json.loads((dest / "catalogue.json").read_text())
    for row in data["files"]:
        del row["output_dir"]  # as an older khala wrote them
    (dest / "catalogue.json").write_text(json.dumps(data))
    khala("keep", out, "--drop", "paper:5")
    res = khala("export", out, dest)
    assert "0 files, 1 unchanged, 0 removed" in res.output, res.output  # whose it is: unknown
    assert (dest / "The Band" / "Nights" / "07 Paper Boats.mp3").exists()
    rows = {r["file"]: r for r in json.loads((dest / "catalogue.json").read_text())["files"]}
    # the file this export would write anyway is taken over; the other keeps its old row
    assert rows["The Band/Nights/01 Night Wind.mp3"]["output_dir"] == str(out.resolve())
    assert "output_dir" not in rows["The Band/Nights/07 Paper Boats.mp3"]


def _catalogue_row(dest: Path, **row) -> None:
    data = json.loads((dest / "catalogue.json").read_text())
    data["files"].append(row)
    (dest / "catalogue.json").write_text(json.dumps(data))


def test_a_catalogue_path_outside_the_destination_stops_the_export(out, tmp_path):
    import hashlib

    dest = tmp_path / "cat"
    khala("keep", out, "paper:5")
    assert khala("export", out, dest).exit_code == 0
    victim = tmp_path / "victim.mp3"
    victim.write_bytes(b"not khala's")
    _catalogue_row(dest, file="../victim.mp3", job_id="night", seed=9, format="mp3",
                   output_dir=str(out.resolve()),
                   sha256=hashlib.sha256(victim.read_bytes()).hexdigest())
    before = (dest / "catalogue.json").read_bytes()
    res = khala("export", out, dest)
    assert res.exit_code == 2, res.output
    assert "row 2 (night:9)" in res.output and "'../victim.mp3'" in res.output
    assert victim.read_bytes() == b"not khala's"  # not removed as "no longer kept"
    assert (dest / "catalogue.json").read_bytes() == before  # nothing written


def test_an_export_never_writes_through_a_symlink_inside_the_destination(out, tmp_path):
    dest, elsewhere = tmp_path / "cat", tmp_path / "elsewhere"
    elsewhere.mkdir()
    dest.mkdir()
    (dest / "The Band").symlink_to(elsewhere, target_is_directory=True)
    khala("keep", out, "paper:5")
    res = khala("export", out, dest)
    assert res.exit_code == 2 and "symbolic link" in res.output and "The Band" in res.output
    assert list(elsewhere.iterdir()) == [] and not (dest / "catalogue.json").exists()


# ---- names always terminate ------------------------------------------------------------


def test_a_300_character_title_with_three_takes_exports_three_files(tmp_path):
    root, dest = tmp_path / "out", tmp_path / "cat"
    title = "夜" * 100 + "x" * 200  # 300 characters, 500 bytes of UTF-8
    for seed in (1, 2, 3):
        take(root, "long", seed, noise(1, -25, seed), title=title, score=-seed)
    assert khala("keep", root, "long:1", "long:2", "long:3").exit_code == 0
    # in a subprocess: an endless naming loop fails the test instead of hanging it
    proc = subprocess.run([sys.executable, "-m", "khala_cli", "export", str(root), str(dest)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in dest.rglob("*.mp3"))
    assert len(names) == 3 and all(len(n.encode()) <= 255 for n in names)
    assert names[0].endswith("夜 (take 2).mp3") and names[1].endswith("夜 (take 3).mp3")
    assert names[2].endswith("夜.mp3") and all(n.startswith("01 夜夜") for n in names), names


def test_equal_names_after_cleaning_get_distinct_names(tmp_path):
    root = tmp_path / "out"
    for job, title in (("a", "Same/Name"), ("b", "Same_Name"), ("c", "same_name"),
                       ("d", "Same:Name")):
        take(root, job, 1, noise(1, -25, ord(job)), title=title, score=-1.0, track=1)
    assert khala("keep", root, "a:1", "b:1", "c:1", "d:1").exit_code == 0
    res = khala("export", root, tmp_path / "cat", "--format", "mp3", "--format", "wav")
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in (tmp_path / "cat").rglob("*.*") if p.suffix != ".csv"
                   and p.name != "catalogue.json")
    assert len({n.lower() for n in names}) == 8, names
    assert "01 Same_Name (b).mp3" in names and "01 same_name (c).wav" in names


# ---- only takes are takes --------------------------------------------------------------


def test_an_export_inside_the_output_directory_is_not_a_damaged_take(out):
    from khala_cli.review.page import write_page

    khala("keep", out, "paper:5")
    assert khala("export", out, out / "export").exit_code == 0
    assert khala("export", out, out).exit_code == 0  # the output directory itself, too
    res = khala("verify", out)
    assert res.exit_code == 0, res.output
    assert "verified 4 takes: all whole" in res.output
    page = write_page(out).read_text()
    assert "unreadable sidecars" not in page and "catalogue.json" not in page
