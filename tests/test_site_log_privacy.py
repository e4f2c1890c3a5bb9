"""What a site's long-running processes log: never a patient id, a path under the data root, or a transcript.

The SuperNode's log (journald, Docker logs, a collector) leaves the hands of the people who may
see patient data, so the rule of docs/STYLE ("Logs") holds for every record a ClientApp or
site worker writes, at every level, tracebacks included. These tests run the site's real
handlers on a copy of the tiny cohort whose state folder lies inside the data folder (as in the
demo's site.yaml), capture every logger at DEBUG, and look for the manifest's ids, the data
folder and the transcripts' words in every record and in the reply. The site's own CLI
(`fedrelapse site check`) still names the line and the file: IT runs it on purpose, locally.
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import _evaluation_with_train, build_client_app
from client.site import Refusal
from shared import protocol as P  # noqa: N812
from shared.models import build_model
from shared.params import get_arrays, layout, pack
from tests.conftest import run_failing_worker_task, small_site, tiny_experiment

pytestmark = pytest.mark.usefixtures("task_identity")

_EVERYTHING = logging.Formatter("%(name)s %(levelname)s %(message)s")  # format() appends the traceback (exc_info) and stack_info


def _message(kind: str, server_round: int = 1) -> Message:
    arrays = dict(get_arrays(build_model(tiny_experiment())))
    content = RecordDict({
        P.ARRAYS: pack(arrays, layout(arrays)),
        P.CONFIG: ConfigRecord({P.RUN_ID: "r-logs", P.SERVER_ROUND: server_round, P.TOTAL_ROUNDS: 2, P.PLAN_YAML: tiny_experiment().to_yaml()}),
    })
    return Message(content=content, dst_node_id=1, message_type=kind)


def _hospital(tiny_cohort: Path, data: Path) -> Context:
    """Site alpha's whole cohort copied to ``data`` (manifest, audio, transcripts), its site.yaml
    and state folder inside it; the Context a SuperNode gives the ClientApp."""
    small_site(tiny_cohort, data, n_rows=10**6)
    (data / "site.yaml").write_text(f"name: alpha\nmanifest: {data / 'manifest.csv'}\nstate_dir: {data / 'state'}\n")
    return Context(run_id=1, node_id=1, node_config={P.NC_SITE_CONFIG: str(data / "site.yaml")}, state=RecordDict(), run_config={})


def _secrets(data: Path) -> list[str]:
    """What must never be logged: the data folder, every patient and session id, every three-word run of a transcript."""
    rows = list(csv.DictReader((data / "manifest.csv").open()))
    out = [str(data), str(data.resolve()), *(r["patient_id"] for r in rows), *(r["session_id"] for r in rows)]
    for t in (data / "transcripts").glob("*.txt"):
        words = re.findall(r"\w+", t.read_text(encoding="utf-8"))
        out += [" ".join(words[i:i + 3]) for i in range(len(words) - 2)]
    return out


def _leaks(text: str, secrets: list[str]) -> list[str]:
    return [s for s in secrets if s in text]


def _logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(_EVERYTHING.format(r) for r in caplog.records)


def _sent(reply: Message) -> str:
    parts = [str(reply.error.reason)] if reply.has_error() else []
    if reply.has_content():
        parts += [repr(dict(v)) for v in reply.content.config_records.values()] + [repr(dict(v)) for v in reply.content.metric_records.values()]
    return " ".join(parts)


def test_a_round_on_data_with_a_corrupt_recording_and_a_missing_transcript_logs_no_patient_path_or_transcript(
    tiny_cohort: Path, tmp_path: Path, alpha_state: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    data = tmp_path  # alpha_state put the warm feature cache in tmp_path/state: the state folder is inside the data folder
    ctx = _hospital(tiny_cohort, data)
    rows = list(csv.DictReader((data / "manifest.csv").open()))
    (data / rows[0]["audio_path"]).write_bytes(b"RIFF\x00\x00not a wave file")
    (data / rows[1]["transcript_path"]).unlink()
    app = build_client_app()

    with caplog.at_level(logging.DEBUG):
        replies = [app(_message(kind), ctx) for kind in ("query", "train", "evaluate")]

    assert "ledger signing key" in _logged(caplog)  # the first round created the site's key, and said so
    assert not replies[1].has_error() and P.REFUSAL_CODE not in replies[1].content[P.SITE]  # it trained
    secrets = _secrets(data)
    assert _leaks(_logged(caplog), secrets) == []
    for reply in replies:
        assert _leaks(_sent(reply), secrets) == []


def test_recordings_that_all_fail_to_decode_are_logged_and_refused_without_the_data_folder(
    tiny_cohort: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    ctx = _hospital(tiny_cohort, tmp_path)
    for wav in (tmp_path / "audio").glob("*.wav"):
        wav.write_bytes(b"corrupt")

    with caplog.at_level(logging.DEBUG):
        reply = build_client_app()(_message("train"), ctx)

    assert reply.content[P.SITE][P.REFUSAL_CODE] == "invalid"
    ref = re.search(r"reference ([0-9a-f]{8})", _sent(reply))
    assert ref is not None and ref.group(1) in _logged(caplog) and "DataError" in _logged(caplog)  # IT finds the record, and what kind of error it was
    assert "no usable session" in _logged(caplog)  # our own sentence stays readable, its path withheld
    secrets = _secrets(tmp_path)
    assert _leaks(_logged(caplog), secrets) == [] and _leaks(_sent(reply), secrets) == []


def test_an_unexpected_error_that_names_a_patients_recording_is_logged_without_its_text(
    tiny_cohort: Path, tmp_path: Path, alpha_state: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    ctx = _hospital(tiny_cohort, tmp_path)

    def library_bug(path: Path) -> str:  # e.g. a decoder's own exception: it names the file it was given
        raise RuntimeError(f"Error opening {str(path)!r}: unexpected end of chunk")

    monkeypatch.setattr("client.prepare.FeatureCache.audio_hash", staticmethod(library_bug))

    with caplog.at_level(logging.DEBUG):
        reply = build_client_app()(_message("train"), ctx)

    assert reply.has_error() and reply.error.reason is not None and "RuntimeError" in reply.error.reason
    ref = re.search(r"reference ([0-9a-f]{8})", reply.error.reason)
    assert ref is not None
    record = next(r for r in caplog.records if ref.group(1) in r.getMessage())
    assert "RuntimeError" in _EVERYTHING.format(record) and "in _prepare_recording" in _EVERYTHING.format(record)  # the class and where it was raised stay for IT
    assert _leaks(_logged(caplog), _secrets(tmp_path)) == []


@pytest.mark.parametrize("kind", ["query", "train"])
def test_a_damaged_ledger_in_a_state_folder_inside_the_data_folder_is_logged_without_its_path(
    tiny_cohort: Path, tmp_path: Path, alpha_state: Path, caplog: pytest.LogCaptureFixture, kind: str,
) -> None:
    from client.site import site_key_paths
    from shared import signing

    ctx = _hospital(tiny_cohort, tmp_path)
    signing.generate(*site_key_paths(alpha_state))
    ledger = alpha_state / "ledger" / "privacy-ledger.jsonl"
    ledger.parent.mkdir(parents=True)
    ledger.write_text("42\n")

    with caplog.at_level(logging.DEBUG):
        reply = build_client_app()(_message(kind), ctx)

    assert reply.content[P.SITE][P.REFUSAL_CODE] == "ledger"
    assert "line 1" in _logged(caplog) and "privacy-ledger.jsonl" in _logged(caplog)  # IT still learns which file and line: relative to state_dir
    assert _leaks(_logged(caplog), _secrets(tmp_path)) == []


def test_a_failed_evaluation_with_the_update_is_logged_without_its_text(caplog: pytest.LogCaptureFixture) -> None:
    class Site:
        cfg = type("Cfg", (), {"name": "alpha", "state_dir": Path("/srv/hospital/data/state"), "manifest": Path("/srv/hospital/data/manifest.csv")})()

        def reserve_evaluation(self, *args: Any, **kwargs: Any) -> Refusal | None:
            raise OSError(5, "Input/output error", "/srv/hospital/data/transcripts/PATX0005-SESSX0005-1.txt")

    from client.app import Request

    req = Request(run_id="r", server_round=2, total_rounds=2, plan_yaml="", arrays=None, evaluate_first=True)  # type: ignore[arg-type]

    with caplog.at_level(logging.DEBUG):
        assert _evaluation_with_train(Site(), req) is None  # type: ignore[arg-type]

    assert "OSError" in _logged(caplog) and "Input/output error" in _logged(caplog)  # the kind of failure stays
    assert "PATX0005" not in _logged(caplog) and "/srv/hospital" not in _logged(caplog)


def test_the_site_worker_logs_a_failed_task_without_its_text(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Flower's own ``log(ERROR, ..., exc_info=ex)`` in the worker's task loop printed the exception in full."""
    leaky = "[Errno 21] Is a directory: '/srv/hospital/data/transcripts/PATX0005-SESSX0005-1.txt'"

    with caplog.at_level(logging.DEBUG):
        run_failing_worker_task(monkeypatch, _message("train"), IsADirectoryError(leaky))

    assert "IsADirectoryError" in _logged(caplog)
    assert "PATX0005" not in _logged(caplog) and "/srv/hospital" not in _logged(caplog)


def test_a_missing_module_and_an_exception_group_stay_diagnosable_in_the_site_log() -> None:
    """The module IT must install, and which errors a group holds, name code, not data; their
    other text is withheld like any library error's."""
    from client.site_errors import loggable

    missing = loggable(ModuleNotFoundError("No module named 'torchcodec'", name="torchcodec"))
    group = loggable(ExceptionGroup("two failures", [KeyError("PATX0005"), ValueError("/srv/hospital/data/a.wav")]))

    assert "no module named 'torchcodec'" in missing
    assert "2 errors: KeyError, ValueError" in group
    assert "PATX0005" not in group and "/srv/hospital" not in group


def test_our_own_error_classes_and_out_of_memory_keep_their_sentence_in_the_site_log() -> None:
    """An UnsupportedLayerError says which setting to change; an out-of-memory error says how much:
    neither names data, and without them IT could not act."""
    from client.patient_layers import UnsupportedLayerError
    from client.site_errors import loggable

    layer = loggable(UnsupportedLayerError("Layer 'conv' must be called with its input as its one tensor argument. Set `training.per_patient_grads` to functorch."))
    memory = loggable(MemoryError("Unable to allocate 3.2 GiB for an array with shape (52000, 16000)"))

    assert "Set `training.per_patient_grads` to functorch." in layer
    assert "Unable to allocate 3.2 GiB" in memory
    assert "withheld" in loggable(ValueError("PATX0005 has no session"))
    from client.audio import AudioProblem  # ours, but it may quote a decoder naming the file

    assert "PATX0005" not in loggable(AudioProblem("cannot be resampled (ValueError: audio/PATX0005-S1.wav)"))
