"""Manifest and audio validation: every bad input is reported with its line and skipped."""

from __future__ import annotations

import csv
import errno
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from client.features import FeatureCache, n_frames
from client.manifest import read_manifest
from client.prepare import prepare_site
from shared.config import FeatureConfig
from shared.errors import DataError
from tests.conftest import write_tone

COLS = ["patient_id", "session_id", "recorded_at", "audio_path", "transcript_path", "language", "label"]


def write_manifest(folder: Path, rows: list[dict[str, str]], columns: list[str] = COLS) -> Path:
    path = folder / "manifest.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return path


def row(sid: str, audio: str, transcript: str = "", label: str = "0", patient: str = "p1") -> dict[str, str]:
    return {"patient_id": patient, "session_id": sid, "recorded_at": "2026-03-01T09:30", "audio_path": audio, "transcript_path": transcript, "language": "nb", "label": label}


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "audio").mkdir()
    write_tone(tmp_path / "audio" / "good.wav")
    (tmp_path / "good.txt").write_text("Det var en fin dag.\n", encoding="utf-8")
    return tmp_path


def problems_for(manifest: Path) -> tuple[int, list[str]]:
    data = prepare_site(manifest, FeatureConfig(), manifest.parent / "state")
    return len(data.sessions), [p.render(manifest) for p in data.problems if p.severity == "error"]


def test_good_row_is_used_and_bad_rows_are_each_reported_with_their_line(site: Path) -> None:
    a = site / "audio"
    (a / "empty.wav").write_bytes(b"")
    sf.write(a / "zero.wav", np.zeros(0, np.float32), 16000)
    (a / "garbage.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    full = (a / "good.wav").read_bytes()
    (a / "truncated.wav").write_bytes(full[: len(full) // 2])
    sf.write(a / "silent.wav", np.zeros(48000, np.float32), 16000)
    sf.write(a / "clipped.wav", np.sign(np.sin(np.arange(48000) / 5.0)).astype(np.float32), 16000)
    write_tone(a / "short.wav", seconds=0.4)
    m = write_manifest(site, [
        row("s1", "audio/good.wav", "good.txt"),
        row("s2", "audio/empty.wav"),
        row("s3", "audio/zero.wav"),
        row("s4", "audio/garbage.wav"),
        row("s5", "audio/truncated.wav"),
        row("s6", "audio/silent.wav"),
        row("s7", "audio/clipped.wav"),
        row("s8", "audio/short.wav"),
        row("s1", "audio/good.wav"),  # duplicate session id
        row("s10", "../outside.wav"),  # escapes the manifest folder
        row("s11", "audio/missing.wav"),
        row("s12", "audio/good.wav", label="maybe"),
    ])
    (site.parent / "outside.wav").write_bytes(full)

    usable, errors = problems_for(m)

    assert usable == 1
    text = "\n".join(errors)
    for line, words in [(3, "cannot be decoded"), (4, "empty"), (5, "cannot be decoded"), (6, "truncated"), (7, "silent"), (8, "clipped"), (9, "too short"), (10, "duplicates line 2"), (11, "outside the manifest"), (12, "does not exist"), (13, "must be 1")]:
        assert any(e.startswith(f"manifest.csv:{line} ") and words in e for e in errors), (line, words, text)


def test_other_sample_rate_is_resampled_and_reported(site: Path) -> None:
    write_tone(site / "audio" / "r8k.wav", sr=8000)
    m = write_manifest(site, [row("s1", "audio/r8k.wav", "good.txt")])
    data = prepare_site(m, FeatureConfig(sample_rate=16000), site / "state")
    assert len(data.sessions) == 1
    assert data.report()["sample_rates"] == {8000: 1}
    assert any("resampled 8000 Hz -> 16000 Hz" in p.message for p in data.problems)


def test_missing_or_non_utf8_transcript_keeps_the_session_with_a_warning(site: Path) -> None:
    (site / "latin1.txt").write_bytes("blåbær".encode("latin-1"))
    m = write_manifest(site, [row("s1", "audio/good.wav", "nope.txt"), row("s2", "audio/good.wav", "latin1.txt")])
    man = read_manifest(m)
    assert [r.transcript for r in man.rows] == [None, None]
    warnings = [p.render(m) for p in man.problems if p.severity == "warning"]
    assert any("manifest.csv:2" in w and "does not exist" in w for w in warnings)
    assert any("manifest.csv:3" in w and "not UTF-8" in w for w in warnings)


def test_unknown_columns_are_reported_not_fatal(site: Path) -> None:
    r = row("s1", "audio/good.wav", "good.txt") | {"diagnosis": "x"}
    m = write_manifest(site, [r], COLS + ["diagnosis"])
    man = read_manifest(m)
    assert len(man.rows) == 1
    assert any("unknown column(s) diagnosis" in p.message for p in man.problems)


def test_missing_required_column_names_it(site: Path) -> None:
    m = write_manifest(site, [{"patient_id": "p", "session_id": "s", "audio_path": "audio/good.wav"}], ["patient_id", "session_id", "audio_path"])
    man = read_manifest(m)
    assert not man.rows
    assert any("recorded_at" in p.message and "language" in p.message for p in man.problems)


def test_non_utf8_manifest_is_refused_naming_the_line(site: Path) -> None:
    m = site / "manifest.csv"
    m.write_bytes(",".join(COLS).encode() + b"\np\xe5,s1,2026-03-01,audio/good.wav,,nb,0\n")
    with pytest.raises(DataError, match=r"not UTF-8 \(bad byte at line 2\)"):
        read_manifest(m)


def test_jsonl_manifest_with_a_broken_line_keeps_the_others(site: Path) -> None:
    m = site / "manifest.jsonl"
    m.write_text(
        '{"patient_id": "p1", "session_id": "s1", "recorded_at": "2026-03-01T09:00", "audio_path": "audio/good.wav", "transcript": "Hei.", "language": "nb", "label": 1}\n'
        "{not json\n",
        encoding="utf-8",
    )
    man = read_manifest(m)
    assert [r.session_id for r in man.rows] == ["s1"]
    assert man.rows[0].label == 1 and man.rows[0].transcript == "Hei."
    assert any(p.line == 2 and "not valid JSON" in p.message for p in man.problems)


def test_feature_cache_is_content_addressed_and_reused(site: Path) -> None:
    m = write_manifest(site, [row("s1", "audio/good.wav", "good.txt")])
    first = prepare_site(m, FeatureConfig(), site / "state")
    second = prepare_site(m, FeatureConfig(), site / "state")
    other_cfg = prepare_site(m, FeatureConfig(n_mels=40), site / "state")
    assert (first.cache_hits, second.cache_hits, other_cfg.cache_hits) == (0, 1, 0)
    np.testing.assert_array_equal(first.sessions[0].features.mel, second.sessions[0].features.mel)


def jsonl_row(sid: str, **fields: object) -> str:
    rec: dict[str, object] = {"patient_id": "p1", "session_id": sid, "recorded_at": "2026-03-01T09:00", "audio_path": "audio/good.wav", "transcript": "Hei.", "language": "nb", "label": 0}
    return json.dumps(rec | fields, ensure_ascii=False)


def test_jsonl_lines_are_split_only_at_newlines_so_unicode_separators_stay_in_the_transcript(site: Path) -> None:
    m = site / "manifest.jsonl"
    m.write_text(jsonl_row("s1", transcript="first\u2028second\x85third") + "\r\n" + jsonl_row("s2", label="maybe") + "\n", encoding="utf-8")

    man = read_manifest(m)

    assert [r.transcript for r in man.rows] == ["first\u2028second\x85third"]
    assert man.total_rows == 2
    assert [(p.line, p.field) for p in man.problems if p.severity == "error"] == [(2, "label")]


def csv_lines(n: int) -> list[str]:
    """A header and ``n`` good rows, as the lines of a CSV file (line k is ``lines[k - 1]``)."""
    return [",".join(COLS)] + [f"p1,s{i},2026-03-01T09:30,audio/good.wav,good.txt,nb,0" for i in range(2, n + 2)]


@pytest.mark.parametrize("later", [
    "",  # the quote is never closed: the rest of the file would be one value
    'p1,s9,2026-03-01T09:30,audio/good.wav,"good.txt",nb,0',  # a later quoted value meets it
])
def test_a_stray_quote_refuses_the_whole_manifest_naming_the_line_where_it_opens(site: Path, later: str) -> None:
    lines = csv_lines(24)
    lines[3] = 'p1,"s4,2026-03-01T09:30,audio/good.wav,good.txt,nb,0'
    if later:
        lines[8] = later
    m = site / "manifest.csv"
    m.write_text("\n".join(lines) + "\n", encoding="utf-8")

    with pytest.raises(DataError) as info:
        read_manifest(m)

    message = str(info.value)
    assert "manifest.csv" in message and "line 4" in message and 'quote (")' in message
    assert "refused" in message and "2026-03-01" not in message and "good.wav" not in message  # no row content


def test_a_stray_quote_closed_on_a_later_line_refuses_the_manifest_instead_of_merging_rows(site: Path) -> None:
    lines = csv_lines(24)
    lines[3] = 'p1,"s4,2026-03-01T09:30,audio/good.wav,good.txt,nb,0'
    lines[6] = 'p1,s7",2026-03-01T09:30,audio/good.wav,good.txt,nb,0'  # closes the quote opened on line 4
    m = site / "manifest.csv"
    m.write_text("\n".join(lines) + "\n", encoding="utf-8")

    with pytest.raises(DataError, match=r"line 4 .*line 7"):
        read_manifest(m)


def test_a_quoted_transcript_over_several_lines_is_one_value(site: Path) -> None:
    m = site / "manifest.csv"
    m.write_text("patient_id,session_id,recorded_at,audio_path,transcript,language\np1,s1,2026-03-01,audio/good.wav,\"Hei.\nHade.\",nb\np1,s2,2026-03-02,audio/good.wav,Ja.,nb\n", encoding="utf-8")

    man = read_manifest(m)

    assert [(r.line, r.transcript) for r in man.rows] == [(3, "Hei.\nHade."), (4, "Ja.")]


def test_a_csv_transcript_longer_than_128_kb_is_read(site: Path) -> None:
    long_text = "ord " * 60_000  # 240 000 characters, over the csv module's default limit of 131 072
    m = site / "manifest.csv"
    m.write_text(f"patient_id,session_id,recorded_at,audio_path,transcript,language\np1,s1,2026-03-01,audio/good.wav,{long_text},nb\n", encoding="utf-8")

    man = read_manifest(m)

    assert [len(r.transcript or "") for r in man.rows] == [len(long_text.strip())]


def test_a_csv_value_over_the_limit_is_a_clear_error_naming_the_line(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("client.manifest.MAX_VALUE_CHARS", 1000)
    m = site / "manifest.csv"
    m.write_text(f"patient_id,session_id,recorded_at,audio_path,transcript,language\np1,s1,2026-03-01,audio/good.wav,Hei.,nb\np1,s2,2026-03-01,audio/good.wav,{'x' * 2000},nb\n", encoding="utf-8")

    with pytest.raises(DataError, match=r"manifest\.csv.*line 3.*longer than 1000 characters"):
        read_manifest(m)


def test_spaces_around_header_names_are_trimmed_like_values(site: Path) -> None:
    m = site / "manifest.csv"
    m.write_text("patient_id, session_id , recorded_at,audio_path, transcript_path,language,label\np1,s1,2026-03-01,audio/good.wav,good.txt,nb,0\n", encoding="utf-8")

    man = read_manifest(m)

    assert [r.session_id for r in man.rows] == ["s1"] and man.rows[0].transcript
    assert not man.problems


@pytest.mark.parametrize(("sep", "named"), [(";", "';'"), ("\t", "a tab")])
def test_a_semicolon_or_tab_separated_file_is_told_to_save_as_comma_separated(site: Path, sep: str, named: str) -> None:
    m = site / "manifest.csv"
    m.write_text("\ufeff" + sep.join(COLS) + "\n" + sep.join(["p1", "s1", "2026-03-01", "audio/good.wav", "good.txt", "nb", "0"]) + "\n", encoding="utf-8")

    man = read_manifest(m)

    assert not man.rows
    [problem] = [p for p in man.problems if p.severity == "error"]
    assert (problem.line, problem.field) == (1, "header")
    assert named in problem.message and "comma" in problem.message and "missing required" not in problem.message


def test_a_column_named_twice_in_the_header_is_an_error(site: Path) -> None:
    m = site / "manifest.csv"
    m.write_text(",".join(COLS) + ", label\np1,s1,2026-03-01,audio/good.wav,good.txt,nb,0,1\n", encoding="utf-8")

    man = read_manifest(m)

    assert not man.rows
    assert any(p.field == "header" and "label" in p.message and "more than once" in p.message for p in man.problems)


@pytest.mark.parametrize(("name", "content"), [("manifest.csv", ""), ("manifest.csv", "\ufeff\n  \n"), ("manifest.jsonl", "\n\n")])
def test_an_empty_manifest_is_refused_as_empty(site: Path, name: str, content: str) -> None:
    m = site / name
    m.write_text(content, encoding="utf-8")

    with pytest.raises(DataError, match=r"manifest\.(csv|jsonl) is empty"):
        read_manifest(m)


def test_a_csv_with_only_a_header_is_refused_as_having_no_rows(site: Path) -> None:
    m = write_manifest(site, [])

    with pytest.raises(DataError, match=r"manifest\.csv has a header row but no session rows"):
        read_manifest(m)


def test_a_manifest_of_another_file_type_names_every_accepted_extension(site: Path) -> None:
    m = site / "manifest.txt"
    m.write_text(",".join(COLS) + "\n", encoding="utf-8")

    with pytest.raises(DataError, match=r"\.csv, \.jsonl or \.ndjson"):
        read_manifest(m)


def test_jsonl_values_of_the_wrong_type_are_errors_of_their_field_not_stringified(site: Path) -> None:
    m = site / "manifest.jsonl"
    m.write_text("\n".join([
        jsonl_row("s1", session_id={"x": 1}, label=True, audio_path=7, language=["nb"]),
        jsonl_row("s2", patient_id=17, label=1, relapse_onset=0, ward={"any": "thing"}),
    ]) + "\n", encoding="utf-8")

    man = read_manifest(m)

    assert [(r.patient_id, r.session_id, r.label) for r in man.rows] == [("17", "s2", 1)]
    assert man.total_rows == 2
    errors = {(p.line, p.field): p.message for p in man.problems if p.severity == "error"}
    assert set(errors) == {(1, "session_id"), (1, "label"), (1, "audio_path"), (1, "language")}
    assert "not an object" in errors[(1, "session_id")] and "not true/false" in errors[(1, "label")]
    assert "not a number" in errors[(1, "audio_path")] and "not a list" in errors[(1, "language")]
    assert any("unknown column(s) ward" in p.message for p in man.problems)


def test_a_key_repeated_in_one_jsonl_object_is_an_error(site: Path) -> None:
    m = site / "manifest.jsonl"
    m.write_text(jsonl_row("s1")[:-1] + ', "label": 1}\n' + jsonl_row("s2") + "\n", encoding="utf-8")

    man = read_manifest(m)

    assert [r.session_id for r in man.rows] == ["s2"] and man.total_rows == 2
    assert [(p.line, p.field) for p in man.problems if p.severity == "error"] == [(1, "label")]
    assert "more than once" in man.problems[0].message


def locked(monkeypatch: pytest.MonkeyPatch, method: str, name: str) -> None:
    """Make ``Path.<method>`` of files called ``name`` fail as an unreadable file does (tests run as root)."""
    real = getattr(Path, method)

    def refuse(self: Path, *args: object, **kwargs: object) -> object:
        if self.name == name:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, method, refuse)


def test_a_transcript_path_that_is_a_folder_or_unreadable_keeps_the_session_with_a_warning(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (site / "transcripts").mkdir()
    (site / "locked.txt").write_text("Hei.", encoding="utf-8")
    locked(monkeypatch, "read_bytes", "locked.txt")
    m = write_manifest(site, [row("s1", "audio/good.wav", "transcripts"), row("s2", "audio/good.wav", "locked.txt")])

    man = read_manifest(m)

    assert [(r.session_id, r.transcript) for r in man.rows] == [("s1", None), ("s2", None)]
    warnings = {(p.line, p.field): p.message for p in man.problems if p.severity == "warning"}
    assert "is a folder, not a file" in warnings[(2, "transcript_path")]
    assert "cannot be read (Permission denied)" in warnings[(3, "transcript_path")]


def test_an_audio_path_that_is_a_folder_or_unreadable_is_an_error_of_its_row(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tone(site / "audio" / "locked.wav")
    locked(monkeypatch, "stat", "locked.wav")
    m = write_manifest(site, [row("s1", "audio/good.wav"), row("s2", "audio"), row("s3", "audio/locked.wav")])

    man = read_manifest(m)

    assert [r.session_id for r in man.rows] == ["s1"]
    errors = {(p.line, p.field): p.message for p in man.problems if p.severity == "error"}
    assert "is a folder, not a file" in errors[(3, "audio_path")]
    assert "cannot be read (Permission denied)" in errors[(4, "audio_path")]


def test_a_state_folder_that_is_a_file_is_one_error_about_the_state_folder_not_the_recordings(site: Path) -> None:
    (site / "state-file").write_text("", encoding="utf-8")
    m = write_manifest(site, [row("s1", "audio/good.wav", "good.txt"), row("s2", "audio/good.wav", "good.txt")])

    with pytest.raises(DataError) as info:
        prepare_site(m, FeatureConfig(), site / "state-file" / "features")

    message = str(info.value)
    assert "state folder" in message and "state-file is a file, not a folder" in message
    assert "not a problem of the recordings" in message and "good.wav" not in message


def test_a_full_disk_while_caching_features_is_a_state_folder_error_naming_no_recording(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(self: FeatureCache, digest: str, feats: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FeatureCache, "put", full)
    m = write_manifest(site, [row("s1", "audio/good.wav", "good.txt")])

    with pytest.raises(DataError, match=r"state folder.*the disk is full") as info:
        prepare_site(m, FeatureConfig(), site / "state")

    assert "good.wav" not in str(info.value)


def test_an_unreadable_recording_is_still_an_error_of_its_row(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tone(site / "audio" / "locked.wav")
    locked(monkeypatch, "open", "locked.wav")
    m = write_manifest(site, [row("s1", "audio/good.wav"), row("s2", "audio/locked.wav")])

    usable, errors = problems_for(m)

    assert usable == 1
    assert errors == ["manifest.csv:3 [audio_path] locked.wav cannot be read (Permission denied); row skipped"]


def test_a_cache_write_that_fails_halfway_leaves_no_temporary_file(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_fills(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("client.features.np.savez", disk_fills)
    m = write_manifest(site, [row("s1", "audio/good.wav", "good.txt")])

    with pytest.raises(DataError, match="the disk is full"):
        prepare_site(m, FeatureConfig(), site / "state")

    assert not [p for p in (site / "state").rglob("*") if p.is_file()]


def _sessions(n_per_class: int) -> list:
    from types import SimpleNamespace

    return [SimpleNamespace(row=SimpleNamespace(patient_id=f"P{i:03d}", label=int(i < n_per_class))) for i in range(2 * n_per_class)]


def test_two_plans_differing_only_in_eval_fraction_do_not_hold_out_nested_sets() -> None:
    """Nested held-out sets one patient apart made two released evaluation losses differ by
    exactly that patient's loss (red-team differencing attack); the fraction is in the key."""
    from client.dataset import split_patients

    sessions = _sessions(20)
    _, small = split_patients(sessions, eval_fraction=0.50, seed=0, salt=b"site-secret")
    _, large = split_patients(sessions, eval_fraction=0.55, seed=0, salt=b"site-secret")
    assert len(large) - len(small) == 2  # one more patient per class
    assert len(large - small) > 2  # not the small set plus two patients
    assert split_patients(sessions, eval_fraction=0.50, seed=0, salt=b"site-secret")[1] == small  # the same plan, the same split
    assert split_patients(sessions, eval_fraction=0.50, seed=0, salt=b"other-site")[1] != small  # the coordinator cannot pick it by seed alone


def _cached_entry(site: Path) -> tuple[Path, FeatureCache]:
    """The manifest of one good row, checked once so its features are cached; and the cache."""
    m = write_manifest(site, [row("s1", "audio/good.wav", "good.txt")])
    prepare_site(m, FeatureConfig(), site / "state")
    return m, FeatureCache(site / "state", FeatureConfig())


def test_a_truncated_feature_cache_entry_is_a_miss_and_is_replaced(site: Path) -> None:
    """Red team d02(a): a half-copied .npz made `site check` die with a BadZipFile traceback."""
    m, cache = _cached_entry(site)
    (entry,) = cache.dir.rglob("*.npz")
    good = entry.read_bytes()
    entry.write_bytes(good[: len(good) // 2])

    data = prepare_site(m, FeatureConfig(), site / "state")

    assert (len(data.sessions), data.cache_hits) == (1, 0)
    assert cache.get(entry.stem) is not None  # recomputed and written back whole
    assert prepare_site(m, FeatureConfig(), site / "state").cache_hits == 1


@pytest.mark.parametrize(
    "damage",
    [
        {"mel": np.zeros((3, 5), np.float16)},  # another shape than (n_mels, n_frames)
        {"mel": np.full((FeatureConfig().n_mels, n_frames(FeatureConfig())), np.nan, np.float16)},
        {"markers": np.full(10, np.nan, np.float32)},
        {"markers": np.zeros(3, np.float32)},
        {"seconds": 0.5},  # shorter than min_seconds: the duration check must hold on hits too
        {"seconds": float("nan")},
        {"notes": ("warning",)},  # a note without its text
        {"mel": np.full((FeatureConfig().n_mels, n_frames(FeatureConfig())), "x")},  # text where numbers belong
    ],
    ids=["mel-shape", "mel-nan", "markers-nan", "markers-shape", "too-short", "seconds-nan", "note", "mel-text"],
)
def test_a_well_formed_feature_cache_entry_with_impossible_values_is_a_miss(site: Path, damage: dict[str, object]) -> None:
    """Red team d02(b): an entry of the wrong shape, with NaN markers or 0.5 s long was used as is."""
    from dataclasses import replace

    m, cache = _cached_entry(site)
    (entry,) = cache.dir.rglob("*.npz")
    feats = cache.get(entry.stem)
    assert feats is not None
    fields = {k: v for k, v in damage.items() if k != "notes"}
    notes = (damage["notes"],) if "notes" in damage else feats.notes
    cache.put(entry.stem, replace(feats, notes=notes, **fields))  # type: ignore[arg-type]

    data = prepare_site(m, FeatureConfig(), site / "state")

    assert cache.get(entry.stem) is not None  # recomputed and written back
    assert (len(data.sessions), data.cache_hits) == (1, 0)
    assert data.sessions[0].features.mel.shape == feats.mel.shape and np.isfinite(data.sessions[0].features.markers).all()


def test_temporary_files_of_a_killed_feature_writer_are_swept_when_the_cache_opens(site: Path) -> None:
    """Red team 17: a process killed between mkstemp and os.replace left *.tmp files for ever."""
    import os
    import time

    folder = FeatureCache(site / "state", FeatureConfig()).dir / "ab"
    folder.mkdir(parents=True)
    stale, fresh = folder / "tmpkilled.tmp", folder / "tmpwriting.tmp"
    stale.write_bytes(b"half"), fresh.write_bytes(b"half")
    os.utime(stale, (time.time() - 3600,) * 2)

    FeatureCache(site / "state", FeatureConfig())

    assert (stale.exists(), fresh.exists()) == (False, True)
