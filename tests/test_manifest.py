"""Manifest loading and validation: malformed manifests through the CLI, and valid forms."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from khala_cli.cli import _register, cli
from khala_cli.manifest import jobs as mf

_register()

VALID = """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: hello
"""

# (name, manifest text, line, field or None, job or None, a fragment of the message)
# Line numbers count from the first line of the text.
BAD = [
    ("yaml-syntax", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop
    lyrics: x
""", 6, None, None, "YAML syntax error"),
    ("yaml-tab-indent", "model: demo\njobs:\n\t- id: a\n", 3, None, None, "YAML syntax error"),
    ("duplicate-key", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
    duration: 2
    duration: 3
""", 8, None, None, "duplicate key 'duration' (first on line 7)"),
    ("empty-file", "", 1, None, None, "the manifest is empty"),
    ("top-level-list", "- id: a\n  tags: [Pop]\n", 1, None, None,
     "expected a mapping with `jobs:`"),
    ("unknown-top-key", """\
model: demo
output_dri: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
""", 2, "output_dri", None, "did you mean 'output_dir'?"),
    ("missing-model", """\
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
""", 1, "model", None, "missing `model:`"),
    ("missing-jobs", "model: demo\noutput_dir: out\n", 1, "jobs", None, "missing `jobs:`"),
    ("empty-jobs", "model: demo\noutput_dir: out\njobs: []\n", 3, "jobs", None,
     "the job list is empty"),
    ("jobs-not-list", "model: demo\noutput_dir: out\njobs:\n  a: 1\n", 3, "jobs", None,
     "expected a list of jobs"),
    ("job-not-mapping", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
  - just a string
""", 7, None, "#2", "expected a mapping"),
    ("unknown-job-key", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
    temprature: 1.1
""", 7, "temprature", "a", "did you mean 'temperature'?"),
    ("duration-range", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
    duration: 12
""", 7, "duration", "a", "12 is out of range 1..10"),
    ("duration-fraction", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
    duration: 2.5
""", 7, "duration", "a", "expected a whole number in 1..10"),
    ("duration-text", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
    duration: three
""", 7, "duration", "a", "expected a whole number"),
    ("duration-bool", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
    duration: yes
""", 7, "duration", "a", "a boolean"),
    ("top-k-bb-zero", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
    top_k_bb: 0
""", 7, "top_k_bb", "a", "0 is out of range 1..200"),
    ("top-k-bb-high", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
    top_k_bb: 500
""", 7, "top_k_bb", "a", "500 is out of range 1..200"),
    ("temperature-high", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
    temperature: 2.0
""", 7, "temperature", "a", "2 is out of range 0.6..1.4"),
    ("top-k-sr-high", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
    top_k_sr: 2000
""", 7, "top_k_sr", "a", "2000 is out of range 1..1024"),
    ("max-minutes-low", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
    max_minutes: 0.01
""", 7, "max_minutes", "a", "0.01 is out of range 0.05..10"),
    ("seed-negative", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
    seeds:
      - 1
      - -4
""", 9, "seeds[1]", "a", "-4 is out of range 0..4294967295"),
    ("seed-duplicate", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
    seeds: [3, 5, 3]
""", 7, "seeds[2]", "a", "seed 3 is listed twice"),
    ("seed-range-reversed", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
    seeds: "107-100"
""", 7, "seeds", "a", "ends before it starts"),
    ("seed-range-garbage", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
    seeds: "1 to 5"
""", 7, "seeds", "a", "is not a seed range"),
    ("seeds-from-missing-count", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
    seeds: {from: 100}
""", 7, "seeds.count", "a", "missing 'count'"),
    ("seeds-count-zero", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
    seeds:
      from: 100
      count: 0
""", 9, "seeds.count", "a", "0 is out of range 1..10000"),
    ("seeds-unknown-key", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
    seeds:
      from: 100
      cout: 8
""", 9, "seeds.cout", "a", "did you mean 'seeds.count'?"),
    ("seeds-scalar", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
    seeds: 5
""", 7, "seeds", "a", "for the single seed 5 write [5]"),
    ("mode-typo", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
    mode: vocals
""", 7, "mode", "a", "did you mean 'vocal'?"),
    ("prompt-mode-disagrees", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    prompt_mode: natural
    lyrics: x
""", 6, "prompt_mode", "a", "natural mode needs `prompt`"),
    ("tags-and-prompt", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    prompt: A pop song
    lyrics: x
""", 6, "prompt", "a", "not both"),
    ("neither-tags-nor-prompt", """\
model: demo
output_dir: out
jobs:
  - id: a
    lyrics: x
""", 4, "tags", "a", "missing `tags` (tags mode) or `prompt` (natural mode)"),
    ("tags-empty", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: []
    lyrics: x
""", 5, "tags", "a", "no tags"),
    ("tag-not-text", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags:
      - Pop
      - {name: Rock}
    lyrics: x
""", 7, "tags[1]", "a", "expected text"),
    ("prompt-empty", """\
model: demo
output_dir: out
jobs:
  - id: a
    prompt: "  "
    lyrics: x
""", 5, "prompt", "a", "must not be empty"),
    ("lyrics-not-text", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: [la, la]
""", 6, "lyrics", "a", "expected text"),
    ("id-path-escape", """\
model: demo
output_dir: out
jobs:
  - id: ../../etc
    tags: [Pop]
    lyrics: x
""", 4, "id", "#1", "is not a valid id"),
    ("id-absolute", """\
model: demo
output_dir: out
jobs:
  - id: /tmp/evil
    tags: [Pop]
    lyrics: x
""", 4, "id", "#1", "is not a valid id"),
    ("id-upper-space", """\
model: demo
output_dir: out
jobs:
  - id: Night Wind
    tags: [Pop]
    lyrics: x
""", 4, "id", "#1", "(try 'night-wind')"),
    ("id-reserved", """\
model: demo
output_dir: out
jobs:
  - id: reports
    tags: [Pop]
    lyrics: x
""", 4, "id", "#1", "is reserved"),
    ("id-duplicate", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
  - title: A
    tags: [Rock]
    lyrics: y
""", 7, "id", "a", "duplicate job id (first used on line 4)"),
    ("title-without-slug", """\
model: demo
output_dir: out
jobs:
  - title: 夜风
    tags: [Pop]
    lyrics: x
""", 4, "id", "#1", "cannot make a job id from the title"),
    ("no-id-no-title", """\
model: demo
output_dir: out
jobs:
  - tags: [Pop]
    lyrics: x
""", 4, "id", "#1", "missing `id`"),
    ("lyrics-file-missing", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics_file: lyrics/nope.txt
""", 6, "lyrics_file", "a", "does not exist"),
    ("lyrics-and-lyrics-file", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
    lyrics_file: song.txt
""", 7, "lyrics_file", "a", "not both"),
    ("defaults-unknown-key", """\
model: demo
output_dir: out
defaults:
  durration: 2
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
""", 4, "defaults.durration", None, "did you mean 'defaults.duration'?"),
    ("defaults-prompt", """\
model: demo
output_dir: out
defaults:
  tags: [Pop]
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
""", 4, "defaults.tags", None, "defaults hold settings only"),
    ("defaults-range", """\
model: demo
output_dir: out
defaults: {temperature: 0.1}
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
""", 3, "defaults.temperature", None, "0.1 is out of range 0.6..1.4"),
    ("output-dir-not-text", """\
model: demo
output_dir: [out]
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
""", 2, "output_dir", None, "expected text"),
    ("model-empty", """\
model: ""
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
""", 1, "model", None, "must not be empty"),
    ("too-many-renders", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
    seeds: {from: 0, count: 6000}
  - id: b
    tags: [Rock]
    lyrics: y
    seeds: "0-5999"
""", 3, "jobs", None, "12000 renders (jobs x seeds) is more than the limit of 10000"),
    ("track-zero", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
    track: 0
""", 7, "track", "a", "0 is out of range 1..999"),
    ("track-in-defaults", """\
model: demo
output_dir: out
defaults:
  track: 3
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
""", 4, "defaults.track", None, "unknown key"),
    ("year-text", """\
model: demo
output_dir: out
defaults:
  year: last year
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
""", 4, "defaults.year", None, "whole number"),
    ("genre-list", """\
model: demo
output_dir: out
jobs:
  - id: a
    tags: [Pop]
    lyrics: x
    genre: [Pop, Rock]
""", 7, "genre", "a", "text"),
]


@pytest.mark.parametrize("name,text,line,field,job,fragment", BAD, ids=[b[0] for b in BAD])
def test_malformed_manifest_exits_2_and_writes_nothing(tmp_path, monkeypatch, name, text, line,
                                                        field, job, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "song.txt").write_text("la la\n")
    path = tmp_path / "jobs.yaml"
    path.write_text(text, encoding="utf-8")
    result = CliRunner().invoke(cli, ["render", str(path), "--devices", "cpu"])
    assert result.exit_code == 2, result.output
    msg = result.output
    assert f"jobs.yaml:{line}: " in msg, msg
    if field is not None:
        assert f"field '{field}'" in msg, msg
    if job is not None:
        assert (f"job {job}" if job.startswith("#") else f"job '{job}'") in msg, msg
    assert fragment in msg, msg
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.yaml", "song.txt"]


def test_bad_manifest_exits_2_for_validate_and_plan_too(tmp_path):
    path = tmp_path / "jobs.yaml"
    path.write_text(VALID.replace("lyrics: hello", "lyrics: hello\n    duration: 0"))
    for cmd in ("validate", "plan", "render"):
        result = CliRunner().invoke(cli, [cmd, str(path)])
        assert result.exit_code == 2, (cmd, result.output)
        assert "jobs.yaml:7: job 'a', field 'duration': 0 is out of range 1..10" in result.output
    assert not (tmp_path / "out").exists()


def test_all_errors_are_reported_together(tmp_path):
    path = tmp_path / "jobs.yaml"
    path.write_text(textwrap.dedent("""\
        model: demo
        jobs:
          - id: a
            tags: [Pop]
            lyrics: x
            duration: 11
          - id: b
            prompt: a song
            temperature: 3
    """))
    with pytest.raises(mf.ManifestError) as exc:
        mf.load(path)
    got = [(i.line, i.job, i.field) for i in exc.value.issues]
    assert got == [(6, "a", "duration"), (9, "b", "temperature")]


def test_missing_manifest_file_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(cli, ["render", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "nope.yaml" in result.output


def load_text(tmp_path: Path, text: str, **kw) -> mf.Manifest:
    path = tmp_path / "jobs.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return mf.load(path, **kw)


def test_valid_manifest_with_every_form(tmp_path):
    (tmp_path / "lyrics").mkdir()
    (tmp_path / "lyrics" / "ballad.txt").write_text("第一行\uff01\nsecond line\n", "utf-8")
    m = load_text(tmp_path, """\
        model: demo
        output_dir: out/catalogue
        defaults: {mode: vocal, duration: 3, top_k_bb: 80, temperature: 1.0, top_k_sr: 10,
                   seeds: [1], artist: The Band}
        jobs:
          - title: Night Wind
            tags: [J-Pop, Female Vocals, Piano]
            lyrics: |
              Hello\u3002
              world
          - id: lofi-study
            mode: instrumental
            prompt: A dreamy lo-fi hip-hop instrumental
            duration: 2
            seeds: {from: 100, count: 8}
          - id: ballad
            lyrics_file: lyrics/ballad.txt
            tags: Ballad, Male Vocals
            seeds: "5-7"
            max_minutes: 0.5
            temperature: 1
    """)
    assert m.model == "demo"
    assert m.output_dir == (tmp_path / "out" / "catalogue").resolve()
    a, b, c = m.jobs
    assert a.id == "night-wind" and a.title == "Night Wind"
    assert a.tags == ("J-Pop", "Female Vocals", "Piano") and a.prompt_mode == "tags"
    assert a.lyrics == "Hello.\nworld"  # cleaned: ideographic full stop -> "."
    assert a.seeds == (1,) and a.artist == "The Band" and a.duration == 3
    assert b.prompt_mode == "natural" and b.mode == "instrumental" and b.lyrics == ""
    assert b.seeds == tuple(range(100, 108)) and b.duration == 2
    assert c.tags == ("Ballad", "Male Vocals") and c.seeds == (5, 6, 7)
    assert c.lyrics == "第一行!\nsecond line"
    assert c.lyrics_file == str((tmp_path / "lyrics" / "ballad.txt").resolve())
    assert c.max_new_tokens == 1292 and a.max_new_tokens == mf.MAX_NEW_TOKENS
    assert isinstance(c.temperature, float)
    assert m.render_count == 1 + 8 + 3
    assert m.warnings == []


def test_warnings_vocal_without_lyrics_and_lyrics_in_instrumental(tmp_path):
    m = load_text(tmp_path, """\
        model: demo
        jobs:
          - id: a
            tags: [Pop]
          - id: b
            mode: instrumental
            tags: [Ambient]
            lyrics: ignored words
          - id: c
            tags: [Female Vocal]
            lyrics: x
    """)
    msgs = [(w.line, w.job, w.field, w.message) for w in m.warnings]
    assert msgs[0][:3] == (3, "a", "lyrics") and "unstable" in msgs[0][3]
    assert msgs[1][:3] == (8, "b", "lyrics") and "ignored in instrumental" in msgs[1][3]
    assert msgs[2][:3] == (10, "c", "tags") and "did you mean 'Female Vocals'" in msgs[2][3]
    assert m.job("b").lyrics == ""


def test_validate_prints_warnings_and_exits_0(tmp_path):
    path = tmp_path / "jobs.yaml"
    path.write_text("model: demo\njobs:\n  - id: a\n    tags: [Pop]\n")
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "warning: " in result.output and "jobs.yaml:3: job 'a', field 'lyrics'" in result.output
    assert "untrained" in result.output and "noise" in result.output
    assert not (tmp_path / "out").exists()


def test_default_output_dir_and_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "sub" / "My Jobs.yaml"
    path.parent.mkdir()
    path.write_text("model: ../models/x\njobs:\n  - id: a\n    tags: [Pop]\n    lyrics: x\n")
    m = mf.load(path)
    assert m.output_dir == (tmp_path / "sub" / "out" / "my-jobs").resolve()
    assert m.model == "../models/x" and m.model_base == path.parent.resolve()
    m2 = mf.load(path, output_dir="elsewhere", model="demo")
    assert m2.output_dir == (tmp_path / "elsewhere").resolve()
    assert m2.model == "demo" and m2.model_base == tmp_path.resolve()


def test_max_renders_can_be_raised(tmp_path):
    text = """\
        model: demo
        jobs:
          - id: a
            tags: [Pop]
            lyrics: x
            seeds: {from: 0, count: 12}
    """
    with pytest.raises(mf.ManifestError, match="12 is out of range 1..10 .*--max-renders"):
        load_text(tmp_path, text, max_renders=10)
    assert load_text(tmp_path, text, max_renders=12).render_count == 12


def test_slugify_and_job_dir_never_leave_output_dir(tmp_path):
    assert mf.slugify("Night Wind!") == "night-wind"
    assert mf.slugify("Café del Mar (Remix)") == "cafe-del-mar-remix"
    assert mf.slugify("../../etc/passwd") == "etc-passwd"
    assert mf.job_dir(tmp_path, "a.b_c-1") == (tmp_path / "a.b_c-1").resolve()
    for bad in ("..", "../x", "/abs", "a/b", ".hidden", "reports", "", "A"):
        with pytest.raises(ValueError):
            mf.job_dir(tmp_path, bad)


def test_max_new_tokens_from_max_minutes():
    assert mf.max_new_tokens(None) == 23552
    assert mf.max_new_tokens(10) == 23552  # capped at the reference's limit
    assert mf.max_new_tokens(1) == 2584
    assert mf.max_new_tokens(0.05) == 128  # 129.2 -> even
    assert mf.max_new_tokens(0.05) % 2 == 0


def test_catalogue_fields_track_year_genre(tmp_path):
    from khala_cli.plan import build_renders

    path = tmp_path / "jobs.yaml"
    path.write_text("model: demo\noutput_dir: out\ndefaults: {year: 2026, genre: Pop}\njobs:\n"
                    "  - {id: a, tags: [Pop], lyrics: x, track: 5, genre: Rock}\n"
                    "  - {id: b, tags: [Pop], lyrics: x}\n")
    m = mf.load(path)
    a, b = m.jobs
    assert (a.track, a.year, a.genre, a.index) == (5, 2026, "Rock", 0)
    assert (b.track, b.year, b.genre, b.index) == (None, 2026, "Pop", 1)
    ra, rb = build_renders(m, "fp")
    assert (ra.track, ra.genre, rb.job_index) == (5, "Rock", 1)
    # catalogue fields are not part of the render key, like the title
    path.write_text(path.read_text().replace("track: 5, genre: Rock", "track: 9"))
    assert build_renders(mf.load(path), "fp")[0].key == ra.key
