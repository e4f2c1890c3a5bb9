"""Manifest and audio validation: every bad input is reported with its line and skipped."""

from __future__ import annotations

import csv
import errno
import json
import os
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from client.features import FeatureCache, n_frames
from client.manifest import MAX_VALUE_CHARS, read_manifest
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
    assert any("unknown key(s) ward" in p.message for p in man.problems)


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
    locked(monkeypatch, "stat", "locked.txt")
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


def test_a_control_character_in_a_path_field_is_an_error_of_its_row_not_a_crash(site: Path) -> None:
    """A NUL in a path made pathlib raise ValueError ('embedded null byte') and `site check` crash."""
    m = site / "manifest.jsonl"
    m.write_text("\n".join([
        jsonl_row("s1", audio_path="audio/x\u0000.wav"),
        jsonl_row("s2", transcript=None, transcript_path="good\u0000.txt"),
        jsonl_row("s3", audio_path="audio/good\u0007.wav"),
        jsonl_row("s4"),
    ]) + "\n", encoding="utf-8")

    man = read_manifest(m)

    assert [r.session_id for r in man.rows] == ["s4"]
    errors = {(p.line, p.field): p.message for p in man.problems if p.severity == "error"}
    assert set(errors) == {(1, "audio_path"), (2, "transcript_path"), (3, "audio_path")}
    assert "control character U+0000" in errors[(1, "audio_path")] and "row skipped" in errors[(1, "audio_path")]
    assert "control character U+0007" in errors[(3, "audio_path")]


def test_a_path_through_a_symbolic_link_loop_is_an_error_of_its_row(site: Path) -> None:
    (site / "loop-a").symlink_to("loop-b")
    (site / "loop-b").symlink_to("loop-a")
    m = write_manifest(site, [row("s1", "loop-a/x.wav"), row("s2", "audio/good.wav")])

    man = read_manifest(m)

    assert [r.session_id for r in man.rows] == ["s2"]
    assert [(p.line, p.field) for p in man.problems if p.severity == "error"] == [(2, "audio_path")]


def test_a_transcript_path_that_is_a_pipe_or_over_16_mib_keeps_the_session_without_reading_it(site: Path) -> None:
    """A FIFO blocked `site check` for ever and a 300 MB file was read whole (a CSV value is capped at 16 MiB)."""
    os.mkfifo(site / "pipe.txt")
    with (site / "big.txt").open("wb") as fh:
        fh.truncate(MAX_VALUE_CHARS + 1)  # sparse: no disk, no time
    m = write_manifest(site, [row("s1", "audio/good.wav", "pipe.txt"), row("s2", "audio/good.wav", "big.txt"), row("s3", "audio/good.wav", "good.txt")])

    man = read_manifest(m)

    assert [(r.session_id, r.transcript) for r in man.rows] == [("s1", None), ("s2", None), ("s3", "Det var en fin dag.\n")]
    warnings = {(p.line, p.field): p.message for p in man.problems if p.severity == "warning"}
    assert "is not a regular file" in warnings[(2, "transcript_path")]
    assert "larger than 16 MiB" in warnings[(3, "transcript_path")]


def test_ids_are_compared_in_unicode_nfc_so_one_person_typed_two_ways_is_one_patient(site: Path) -> None:
    """'Åse' as one character (NFC, most exports) and as 'A' + a combining ring (NFD, some macOS
    exports) counted as two patients: one person, two privacy units."""
    nfc, nfd = unicodedata.normalize("NFC", "Åse-1"), unicodedata.normalize("NFD", "Åse-1")
    m = write_manifest(site, [row("s1", "audio/good.wav", patient=nfc), row("s2", "audio/good.wav", patient=nfd), row(nfd + "-s3", "audio/good.wav")])

    man = read_manifest(m)

    assert [r.patient_id for r in man.rows[:2]] == [nfc, nfc]
    assert man.rows[2].session_id == nfc + "-s3"


def test_an_id_with_an_invisible_or_control_character_is_an_error_of_its_row(site: Path) -> None:
    m = write_manifest(site, [
        row("s1", "audio/good.wav", patient="Åse-1\u200b"),  # zero-width space: looks like 'Åse-1'
        row("s2", "audio/good.wav", patient="Åse\u00a01"),  # no-break space
        row("s3\u0007", "audio/good.wav"),
        row("s4", "audio/good.wav", patient="Åse 1"),  # an ordinary space is fine
    ])

    man = read_manifest(m)

    assert [r.session_id for r in man.rows] == ["s4"]
    errors = {(p.line, p.field): p.message for p in man.problems if p.severity == "error"}
    assert set(errors) == {(2, "patient_id"), (3, "patient_id"), (4, "session_id")}
    assert "U+200B ZERO WIDTH SPACE at position 6" in errors[(2, "patient_id")] and "row skipped" in errors[(2, "patient_id")]
    assert "U+00A0 NO-BREAK SPACE" in errors[(3, "patient_id")]
    assert "U+0007" in errors[(4, "session_id")]


def test_patient_ids_that_differ_only_in_case_are_a_warning_naming_both_lines(site: Path) -> None:
    m = write_manifest(site, [row("s1", "audio/good.wav", patient="Åse-1"), row("s2", "audio/good.wav", patient="OTHER"), row("s3", "audio/good.wav", patient="åse-1"), row("s4", "audio/good.wav", patient="åse-1")])

    man = read_manifest(m)

    assert len(man.rows) == 4
    warnings = [(p.line, p.field, p.message) for p in man.problems if p.field == "patient_id"]
    assert len(warnings) == 1 and warnings[0][:2] == (4, "patient_id"), warnings
    assert "line 2" in warnings[0][2] and "only in upper/lower case" in warnings[0][2]


def test_one_recording_under_two_patients_skips_every_session_of_both_naming_both_lines(site: Path) -> None:
    """The same recording under two patient ids may be one person counted twice in the privacy
    guarantee (sensitivity 2C, not C): neither id's sessions are used until the manifest is fixed."""
    a = site / "audio"
    write_tone(a / "b.wav", seconds=2.0)
    write_tone(a / "c.wav", seconds=2.5)
    (a / "copy.wav").write_bytes((a / "good.wav").read_bytes())  # another name, the same bytes
    m = write_manifest(site, [
        row("s1", "audio/good.wav", patient="A"),
        row("s2", "audio/b.wav", patient="A"),
        row("s3", "audio/copy.wav", patient="B"),
        row("s4", "audio/c.wav", patient="C"),
    ])

    data = prepare_site(m, FeatureConfig(), site / "state")

    assert [s.row.session_id for s in data.sessions] == ["s4"]
    assert data.report()["patients"] == 1 and data.report()["skipped_rows"] == 3
    errors = {p.line: p.message for p in data.problems if p.severity == "error"}
    assert set(errors) == {2, 3, 4}
    assert "line 4" in errors[2] and "line 2" in errors[4] and "same recording" in errors[4]
    assert "lines 2 and 4" in errors[3] and "'A'" in errors[3] and "'B'" in errors[3]


def test_one_recording_under_two_sessions_of_one_patient_keeps_the_first(site: Path) -> None:
    (site / "audio" / "copy.wav").write_bytes((site / "audio" / "good.wav").read_bytes())
    m = write_manifest(site, [row("s1", "audio/good.wav"), row("s2", "audio/copy.wav")])

    data = prepare_site(m, FeatureConfig(), site / "state")

    assert [s.row.session_id for s in data.sessions] == ["s1"]
    assert [p.render(m) for p in data.problems if p.severity == "error"] == [
        "manifest.csv:3 [audio_path] is the same recording (identical content) as line 2 (session 's1'); one recording is one session, so this row is skipped: list it once"
    ]


def _tone_at(path: Path, rate: int, seconds: float = 1.2) -> Path:
    n = int(rate * seconds) if rate >= 1000 else 48000
    sf.write(path, (0.3 * np.sin(np.arange(n) * 2 * np.pi * 150 / max(rate, 1000))).astype(np.float32), rate, subtype="PCM_16")
    return path


@pytest.mark.parametrize("rate", [2, 11127, 44101, 500000])
def test_a_recording_at_an_odd_or_out_of_range_sample_rate_is_refused_before_any_filter_is_built(site: Path, monkeypatch: pytest.MonkeyPatch, rate: int) -> None:
    """11127 Hz (coprime with 16000) needed a 16000 x 11141 filter: 4.5 GiB, then a crash; 2 Hz
    made a 96 KB file 6.7 hours of audio, 3.1 GiB once resampled."""
    from client.audio import AudioProblem, decode

    def no_filter(orig: int, new: int) -> object:
        raise AssertionError(f"a resampling filter {orig} -> {new} Hz was built")

    monkeypatch.setattr("shared.resample._resampler", no_filter)
    path = _tone_at(site / "audio" / f"odd-{rate}.wav", rate)

    with pytest.raises(AudioProblem, match=f"sample rate of {rate} Hz"):
        decode(path, target_rate=16000, min_seconds=1.0)


@pytest.mark.parametrize("target", [8000, 16000])
def test_the_usual_sample_rates_are_resampled_to_either_feature_rate(site: Path, target: int) -> None:
    from client.audio import decode

    for rate in (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000):
        decoded = decode(_tone_at(site / "audio" / f"r{rate}.wav", rate), target_rate=target, min_seconds=1.0)
        assert decoded.sample_rate == target and decoded.original_rate == rate
        assert abs(decoded.samples.shape[0] - 1.2 * target) <= 1, rate


def test_the_resampler_refuses_a_rate_pair_whose_filter_would_be_huge() -> None:
    from shared.resample import _resampler, filter_size, resample

    with pytest.raises(ValueError, match="11127 Hz to 16000 Hz needs a filter bank of 178,256,000 coefficients"):
        resample(np.zeros(100, np.float32), 11127, 16000)
    for orig, new in [(44100, 16000), (11025, 16000), (8000, 16000), (22050, 8000)]:  # the bound follows torchaudio's filter
        assert _resampler(orig, new).kernel.numel() == filter_size(orig, new)


def test_a_resampling_failure_is_an_audio_problem_of_the_recording(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from client.audio import AudioProblem, decode

    def out_of_memory(x: np.ndarray, orig: int, new: int) -> np.ndarray:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr("client.audio.resample", out_of_memory)
    with pytest.raises(AudioProblem, match="cannot be resampled from 44100 Hz to 16000 Hz"):
        decode(_tone_at(site / "audio" / "r44k.wav", 44100), target_rate=16000, min_seconds=1.0)


def test_decode_with_max_seconds_resamples_only_that_much_and_gives_the_same_samples(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import client.audio
    from client.audio import decode

    path = _tone_at(site / "audio" / "long.wav", 44100, seconds=5.0)
    full = decode(path, target_rate=16000, min_seconds=1.0)
    lengths: list[int] = []
    real = client.audio.resample

    def counting_resample(x: np.ndarray, orig: int, new: int) -> np.ndarray:
        lengths.append(x.shape[0])
        return real(x, orig, new)

    monkeypatch.setattr("client.audio.resample", counting_resample)

    cropped = decode(path, target_rate=16000, min_seconds=1.0, max_seconds=2.0)

    assert lengths and lengths[0] <= 2.1 * 44100 + 1
    assert cropped.seconds == full.seconds == 5.0
    assert cropped.samples.shape[0] >= 2 * 16000
    np.testing.assert_allclose(cropped.samples[: 2 * 16000], full.samples[: 2 * 16000], atol=1e-6)


def test_a_raw_recording_is_an_error_of_its_row_saying_raw_is_not_supported(site: Path) -> None:
    """soundfile's TypeError ('samplerate must be specified') for a .raw file crashed the whole check."""
    write_tone(site / "audio" / "other.wav", seconds=2.0)
    (site / "audio" / "other.wav").rename(site / "audio" / "rec.raw")
    m = write_manifest(site, [row("s1", "audio/good.wav"), row("s2", "audio/rec.raw")])

    usable, errors = problems_for(m)

    assert usable == 1
    assert len(errors) == 1 and errors[0].startswith("manifest.csv:3 [audio_path] rec.raw is headerless RAW audio") and "not supported" in errors[0]


def test_any_exception_of_the_decoder_is_an_audio_problem(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from client.audio import AudioProblem, decode

    def odd(*args: object, **kwargs: object) -> object:
        raise ValueError("something soundfile did not expect")

    monkeypatch.setattr(sf, "read", odd)
    with pytest.raises(AudioProblem, match=r"cannot be decoded \(ValueError: something soundfile did not expect\)"):
        decode(site / "audio" / "good.wav", target_rate=16000, min_seconds=1.0)


def test_a_float_recording_with_a_sample_far_beyond_full_scale_is_refused(site: Path) -> None:
    """One float sample of 1e30 passed every check and gave NaN in 6432 of 19200 log-mel values."""
    from client.audio import AudioProblem, decode

    x, sr = sf.read(site / "audio" / "good.wav", dtype="float32")
    x[1000] = 1e30
    sf.write(site / "audio" / "spike.wav", x, sr, subtype="FLOAT")

    with pytest.raises(AudioProblem, match=r"far beyond full scale \(peak 1e\+30"):
        decode(site / "audio" / "spike.wav", target_rate=16000, min_seconds=1.0)


def test_features_that_come_out_non_finite_are_an_audio_problem() -> None:
    from client.audio import AudioProblem, Decoded
    from client.features import extract

    x = (0.3 * np.sin(np.arange(32000) * 2 * np.pi * 150 / 16000)).astype(np.float32)
    x[1000] = 1e20  # finite, within the decoder's checks if they were looser: its power overflows float32
    with pytest.raises(AudioProblem, match="non-finite features"):
        extract(Decoded(x, 16000, 16000, 2.0, ()), FeatureConfig())


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


def test_an_unknown_jsonl_key_is_reported_at_the_first_record_that_has_it(site: Path) -> None:
    """It was `m.jsonl:1 [header] unknown column(s) extra are ignored`: JSONL has no header,
    and line 1 did not have the key."""
    m = site / "manifest.jsonl"
    lines = [jsonl_row(f"s{i}") for i in range(1, 7)] + [jsonl_row("s7", extra="x"), jsonl_row("s8", extra="y", ward=3)]
    m.write_text("\n".join(lines) + "\n", encoding="utf-8")

    man = read_manifest(m)

    warnings = [p.render(m) for p in man.problems if p.severity == "warning"]
    assert warnings == [
        "manifest.jsonl:7 [row] unknown key(s) extra are ignored (here and in every later record)",
        "manifest.jsonl:8 [row] unknown key(s) ward are ignored (here and in every later record)",
    ]
    assert len(man.rows) == 8


def test_a_jsonl_manifest_without_transcripts_is_reported_at_its_first_record_not_at_a_header(site: Path) -> None:
    """It was `m.jsonl:1 [header] no transcript_path or transcript column; ...`: JSONL has no
    header, and line 1 here is not even a record."""
    m = site / "manifest.jsonl"
    rows = [jsonl_row(f"s{i}", transcript=None) for i in (1, 2)]
    m.write_text("\n{broken\n" + "\n".join(r.replace('"transcript": null, ', "") for r in rows) + "\n", encoding="utf-8")

    man = read_manifest(m)

    assert [p.render(m) for p in man.problems if p.field in ("header", "row") and p.severity == "warning"] == [
        "manifest.jsonl:3 [row] has no transcript_path or transcript key, and no later record has one; language markers will be unavailable",
    ]
    assert len(man.rows) == 2


def test_a_jsonl_manifest_where_some_record_has_a_transcript_gives_no_such_warning(site: Path) -> None:
    m = site / "manifest.jsonl"
    m.write_text(jsonl_row("s1").replace('"transcript": "Hei.", ', "") + "\n" + jsonl_row("s2") + "\n", encoding="utf-8")

    man = read_manifest(m)

    assert not [p for p in man.problems if p.field in ("header", "row")]
    assert [(p.line, p.field) for p in man.problems if p.severity == "warning"] == [(1, "transcript_path")]  # that row's own
