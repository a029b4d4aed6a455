"""The take analysis against signals whose answers are known, and `khala analyse`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from khala_cli import analysis
from khala_cli.cli import _register, cli

SR = 44100
# BS.1770-4's K-weighting as the standard prints it, for 48 kHz (Tables 1 and 2): the
# high-frequency shelf, then the RLB high-pass. pyloudnorm designs its filters from their
# parameters instead, so these are an independent reading of the same curve.
K_SHELF = ([1.53512485958697, -2.69169618940638, 1.19839281085285],
           [1.0, -1.69065929318241, 0.73248077421585])
K_HIGHPASS = ([1.0, -2.0, 1.0], [1.0, -1.99004745483398, 0.99007225036621])


def sine(freq: float, peak_dbfs: float, seconds: float, channels: int = 2,
         sr: int = SR) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    x = (10 ** (peak_dbfs / 20)) * np.sin(2 * np.pi * freq * t)
    return np.repeat(x[:, None], channels, axis=1).astype(np.float32)


def k_weighting_db(freq: float) -> float:
    """The gain of the standard's K-weighting at `freq`, in dB."""
    z = np.exp(-2j * np.pi * freq / 48000 * np.arange(3))
    gain = 1.0
    for b, a in (K_SHELF, K_HIGHPASS):
        gain *= abs(np.dot(b, z) / np.dot(a, z))
    return 20 * math.log10(gain)


def sine_lufs(freq: float, peak_dbfs: float, channels: int) -> float:
    """BS.1770 loudness of a steady sine: -0.691 + 10 log10 of the weighted mean squares."""
    return (-0.691 + peak_dbfs - 10 * math.log10(2) + k_weighting_db(freq)
            + 10 * math.log10(channels))


def test_k_weighting_is_the_curve_the_standard_describes():
    # ~0 dB near 1 kHz (the -0.691 offset cancels it), about +4 dB above 2 kHz, a steep cut
    # below 100 Hz: a check on the reading above, before it checks the code.
    assert k_weighting_db(997) == pytest.approx(0.691, abs=0.01)
    assert 3.4 < k_weighting_db(4000) < 4.2
    assert k_weighting_db(40) < -0.5


@pytest.mark.parametrize("freq", [40.0, 997.0, 4000.0])
def test_sine_loudness_matches_the_standard(freq):
    # a missing or wrong K-weighting moves the 40 Hz or 4 kHz reading by over 0.5 LU
    for peak, channels in ((-20.0, 1), (-20.0, 2), (-6.0, 2)):
        got = analysis.loudness_lufs(sine(freq, peak, 5.0, channels, sr=48000), 48000)
        assert got == pytest.approx(sine_lufs(freq, peak, channels), abs=0.05), (peak, channels)


def test_true_peak_sees_intersample_peaks():
    # A sine at fs/4 sampled at 45 degrees: every sample is at 0.707 of the true peak.
    n = np.arange(SR)
    x = np.sin(2 * np.pi * (SR / 4) * n / SR + np.pi / 4).astype(np.float32)[:, None]
    assert 20 * np.log10(np.abs(x).max()) == pytest.approx(-3.01, abs=0.05)
    assert analysis.true_peak_db(x) == pytest.approx(0.0, abs=0.3)


def test_full_scale_square_clips_and_a_quiet_sine_does_not():
    sq = np.sign(sine(100, 0.0, 2.0)) * 1.2
    m = analysis.analyse(sq, SR)
    assert m["clip_fraction"] > 0.9 and "clipping" in m["flags"]
    quiet = analysis.analyse(sine(440, -12.0, 2.0), SR)
    assert quiet["clip_fraction"] == 0.0 and "clipping" not in quiet["flags"]


def test_eighty_percent_silence():
    x = np.zeros((SR * 10, 2), dtype=np.float32)
    x[SR * 3 : SR * 5] = sine(440, -10.0, 2.0)  # sound from 3 s to 5 s of 10 s
    m = analysis.analyse(x, SR)
    assert m["silence_fraction"] == pytest.approx(0.8, abs=0.02)
    assert m["leading_silence_s"] == pytest.approx(3.0, abs=0.1)
    assert m["trailing_silence_s"] == pytest.approx(5.0, abs=0.1)
    assert "silent" in m["flags"]
    assert "silent" in analysis.analyse(np.zeros((SR * 2, 2), np.float32), SR)["flags"]


def test_repetition_of_a_looping_stream_and_a_random_one():
    rng = np.random.default_rng(0)
    block = rng.integers(0, 1024, 200)
    looping = np.tile(block, 5)  # the same 200 frames five times
    assert analysis.repetition(looping) == pytest.approx(0.8, abs=0.02)
    assert analysis.repetition(rng.integers(0, 1024, 1000)) < 0.01
    assert "looping" in analysis.flags_of({"repetition": 0.8, "silence_fraction": 0,
                                           "lufs": -14.0})
    assert analysis.repetition(None) is None and analysis.repetition(np.arange(3)) is None


def test_flags_always_rank_below_unflagged_takes():
    good = {"lufs": -14.0, "silence_fraction": 0.0, "repetition": 0.0}
    # the worst unflagged take: hopeless confidence, just under the looping/silent limits
    worst_clean = dict(good, logprob_mean=-1e9, repetition=0.49, silence_fraction=0.49)
    best_flagged = dict(good, logprob_mean=0.0, ended="token_cap")
    assert analysis.flags_of(worst_clean) == []
    assert analysis.flags_of(best_flagged) == ["cut_at_cap"]
    assert (analysis.score_of(worst_clean, []) >
            analysis.score_of(best_flagged, ["cut_at_cap"]))
    # an unknown confidence ranks below any real one of a top-k draw (>= -ln 1024)
    assert analysis.score_of(dict(good, logprob_mean=-math.log(1024)), []) > \
        analysis.score_of(dict(good, logprob_mean=None), [])
    # higher confidence ranks higher among unflagged takes
    assert analysis.score_of(dict(good, logprob_mean=-2.0), []) > \
        analysis.score_of(dict(good, logprob_mean=-3.0), [])


@pytest.mark.parametrize("lufs,flag", [(-35.0, "too_quiet"), (-5.0, "too_loud")])
def test_level_flags(lufs, flag):
    assert flag in analysis.flags_of({"lufs": lufs, "silence_fraction": 0.0})


def test_short_audio_does_not_crash():
    m = analysis.analyse(sine(440, -10, 0.1), SR)
    assert m["lufs"] is None and "silent" in m["flags"]


# ---- khala analyse on takes written before the analysis existed -----------------------


def _old_take(root: Path, job: str, seed: int, audio: np.ndarray, *, tokens: int,
              cap: int) -> Path:
    d = root / job
    d.mkdir(parents=True, exist_ok=True)
    stem = f"{job}-s{seed}"
    sf.write(str(d / f"{stem}.wav"), audio, SR, subtype="PCM_24")
    side = {"render_key": f"key-{seed}", "job_id": job, "seed": seed, "title": job,
            "max_new_tokens": cap, "tokens": {"prompt": 10, "backbone": tokens},
            "audio": {"seconds": len(audio) / SR}, "files": {"wav": f"{stem}.wav"}}
    path = d / f"{stem}.json"
    path.write_text(json.dumps(side))
    return path


def test_analyse_fills_old_sidecars_without_touching_the_rest(tmp_path):
    _register()
    a = _old_take(tmp_path, "song", 1, sine(440, -10, 3.0), tokens=100, cap=200)
    b = _old_take(tmp_path, "song", 2, np.sign(sine(50, 0, 3.0)), tokens=200, cap=200)
    before = {p: json.loads(p.read_text()) for p in (a, b)}
    res = CliRunner().invoke(cli, ["analyse", str(tmp_path)])
    assert res.exit_code == 0, res.output
    for p in (a, b):
        after = json.loads(p.read_text())
        assert {k: v for k, v in after.items() if k != "analysis"} == before[p]
        assert after["analysis"]["measured_from"] == "wav"
        assert after["analysis"]["inferred"] == ["ended"]
    ta, tb = (json.loads(p.read_text())["analysis"] for p in (a, b))
    assert ta["ended"] == "end_of_song" and ta["flags"] == []
    assert tb["ended"] == "token_cap" and {"clipping", "cut_at_cap"} <= set(tb["flags"])
    assert ta["lufs"] == pytest.approx(sine_lufs(440, -10, 2), abs=0.05)
    assert (tmp_path / "reports" / "index.html").exists()
    # a second run has nothing to do
    mtime = a.stat().st_mtime_ns
    assert "analysed 0 takes" in CliRunner().invoke(cli, ["analyse", str(tmp_path)]).output
    assert a.stat().st_mtime_ns == mtime


def test_analyse_uses_saved_codes(tmp_path):
    _register()
    p = _old_take(tmp_path, "loop", 3, sine(440, -10, 3.0), tokens=100, cap=200)
    other = _old_take(tmp_path, "other", 4, sine(440, -10, 3.0), tokens=100, cap=200)
    rng = np.random.default_rng(0)
    loop = np.tile(np.arange(20, dtype=np.int16), 10)  # repeats every 20 frames
    noise = rng.integers(0, 1024, size=(64, 200)).astype(np.int16)
    q0_loops = noise.copy()
    q0_loops[0] = loop  # only q0 repeats: the rows and columns around it do not
    rest_loops = np.tile(loop, (64, 1))
    rest_loops[0] = noise[0]  # every row repeats but q0
    np.save(p.parent / "loop-s3.codes.npy", q0_loops)
    np.save(other.parent / "other-s4.codes.npy", rest_loops)
    assert CliRunner().invoke(cli, ["analyse", str(tmp_path)]).exit_code == 0
    m = json.loads(p.read_text())["analysis"]
    assert m["measured_from"] == "wav+codes" and m["repetition"] > 0.8 and "looping" in m["flags"]
    m = json.loads(other.read_text())["analysis"]
    assert m["measured_from"] == "wav+codes" and m["repetition"] < 0.1
    assert "looping" not in m["flags"]


def test_analyse_and_report_refuse_a_folder_that_is_not_an_output_dir(tmp_path):
    _register()
    (tmp_path / "notes.txt").write_text("hello")
    for cmd in ("analyse", "report"):
        res = CliRunner().invoke(cli, [cmd, str(tmp_path)])
        assert res.exit_code == 2, (cmd, res.output)
        assert "not a khala output directory" in res.output
    res = CliRunner().invoke(cli, ["report", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "is not a directory" in res.output
    assert not (tmp_path / "reports").exists()
