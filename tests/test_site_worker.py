"""The site worker (client/site_worker.py) and its per-message launcher (client/site_launcher.py):
one process serves many requests, a killed worker is replaced, the socket is private, a task
never hangs on a missing worker, and a bundle with code is still refused before anything runs.

The end-to-end proof (several real messages served by one process, the site loaded once, over
TLS) is in tests/test_deployment_engine.py, which runs its SuperNodes in worker mode."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.common.serde import message_to_proto

from client import pinned_app, site_launcher, site_worker
from client.pinned_app import BundleRefused, write_launcher
from client.site_launcher import WorkerUnavailable, connect_or_start, delegate, recv_frame, send_frame, socket_name

ROOT = Path(__file__).resolve().parents[1]


def ping(sock: socket.socket) -> dict[str, object]:
    with sock:
        send_frame(sock, {"ping": True})
        return recv_frame(sock)[0]


@pytest.fixture
def worker_dir() -> Iterator[Path]:
    """A socket folder in a world-readable parent (so only its own permissions guard it); the
    worker a test left running is ended by its pid afterwards."""
    parent = Path(tempfile.mkdtemp(prefix="fedrelapse-worker-test-"))
    parent.chmod(0o755)
    folder = parent / "w"
    yield folder
    sock = site_launcher.connect(str(folder), os.getpid()) if folder.is_dir() else None
    if sock is not None:
        os.kill(int(ping(sock)["pid"]), signal.SIGTERM)  # type: ignore[call-overload]
    shutil.rmtree(parent, ignore_errors=True)


def test_one_worker_serves_every_request_and_a_killed_one_is_replaced_on_the_next(worker_dir: Path) -> None:
    first = ping(connect_or_start(str(worker_dir), os.getpid()))
    again = ping(connect_or_start(str(worker_dir), os.getpid()))
    assert again["pid"] == first["pid"] and first["sites_loaded"] == 0  # the same process, no new start

    os.kill(int(first["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
    time.sleep(0.2)
    replaced = ping(connect_or_start(str(worker_dir), os.getpid()))

    assert replaced["pid"] != first["pid"]
    assert replaced["tasks"] == 0


def test_a_task_is_taken_up_while_the_site_code_is_still_importing(worker_dir: Path) -> None:
    """Flower refuses a task that has not called back within 30 s of its launch, so the worker
    must not hold its first task until torch and the ClientApp are imported: here that import
    never ends, and a task (with a command line Flower's parser rejects) is still answered."""
    never = "import client.site_worker as w, threading; w.import_site_code = threading.Event().wait; w.main()"
    command = [sys.executable, "-c", never, "--socket-dir", str(worker_dir), "--parent-pid", str(os.getpid())]
    worker = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, sock = time.monotonic() + 60, None
        while sock is None and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.05)
            sock = site_launcher.connect(str(worker_dir), os.getpid()) if worker_dir.is_dir() else None
        assert sock is not None, "the worker never opened its socket"
        sock.settimeout(60)
        with sock:
            send_frame(sock, {"argv": ["--not-a-flower-option"]}, [1, 2])
            with pytest.raises(WorkerUnavailable):  # the task thread ran (and failed on the argv) instead of waiting for the import
                recv_frame(sock)
    finally:
        worker.terminate()
        worker.wait(timeout=30)


def test_the_socket_folder_is_private_and_others_cannot_connect(worker_dir: Path) -> None:
    worker_dir.mkdir(mode=0o777)
    worker_dir.chmod(0o777)  # a too-open folder that is ours is tightened

    ping(connect_or_start(str(worker_dir), os.getpid()))

    assert stat.S_IMODE(worker_dir.stat().st_mode) == 0o700
    sock = worker_dir / socket_name(os.getpid())
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in worker_dir.iterdir())
    if os.getuid() != 0 or not Path("/usr/bin/python3").is_file():
        return
    other = subprocess.run(  # another user (nobody) on the same host cannot reach the socket
        ["/usr/bin/python3", "-I", "-c", f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({str(sock)!r})"],
        user=65534, capture_output=True, text=True, check=False,
    )
    assert other.returncode != 0 and "PermissionError" in other.stderr


@pytest.mark.skipif(os.getuid() != 0, reason="needs to hand the folder to another user")
def test_a_socket_folder_owned_by_someone_else_is_refused_with_a_sentence(tmp_path: Path) -> None:
    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o700)
    os.chown(folder, 65534, 65534)
    with pytest.raises(PermissionError, match="belongs to uid 65534"):
        site_launcher.private_dir(str(folder))


def test_a_worker_that_cannot_start_makes_the_task_run_in_a_fresh_process(worker_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    broken = [sys.executable, "-c", "raise SystemExit(3)"]
    with pytest.raises(WorkerUnavailable, match="exited with code 3"):
        connect_or_start(str(worker_dir), os.getpid(), command=broken)
    argv = ["--runtime-api-address", "127.0.0.1:1", "--token", "t", "--parent-pid", str(os.getpid())]

    code, header = delegate(argv, str(worker_dir), command=broken)
    execs: list[list[str]] = []
    monkeypatch.setattr(site_launcher, "delegate", lambda *a, **k: (None, ""))

    def execv(exe: str, args: list[str]) -> NoReturn:  # exec never returns
        execs.append(args)
        sys.exit(0)

    monkeypatch.setattr(os, "execv", execv)
    monkeypatch.setattr(sys, "argv", ["flwr-clientapp", *argv])
    with pytest.raises(SystemExit):
        site_launcher.main(str(worker_dir))

    assert (code, header) == (None, "")
    assert "running this task in a fresh ClientApp process instead" in capsys.readouterr().err
    assert execs == [[sys.executable, "-c", "from client.pinned_app import main; main()", *argv]]  # today's per-message path


def _message() -> Message:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 3, 1  # as a pulled task sets them
    msg = Message(RecordDict(), dst_node_id=7, message_type="train")
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as the SuperNode's pull sets it
    return msg


def test_a_worker_that_dies_after_pulling_the_task_gets_an_error_reply_not_a_hang(worker_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    asked = _message()
    header = base64.b64encode(message_to_proto(remove_content_from_message(asked)).SerializeToString()).decode("ascii")
    site_launcher.private_dir(str(worker_dir))
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with site_launcher.in_dir(str(worker_dir)):
        server.bind(socket_name(os.getpid()))
    server.listen(1)

    def dying_worker() -> None:  # takes the task, says it pulled it, then is gone
        conn, _ = server.accept()
        _, fds = recv_frame(conn, max_fds=2)
        send_frame(conn, {"pulled": header})
        for fd in fds:
            os.close(fd)
        conn.close()

    threading.Thread(target=dying_worker, daemon=True).start()
    argv = ["--token", "t", "--parent-pid", str(os.getpid())]
    code, got = delegate(argv, str(worker_dir))
    server.close()
    assert (code, got) == (None, header), capsys.readouterr().err
    execs: list[list[str]] = []
    monkeypatch.setattr(site_launcher, "delegate", lambda *a, **k: (None, got))

    def execv(exe: str, args: list[str]) -> NoReturn:  # exec never returns
        execs.append(args)
        sys.exit(0)

    monkeypatch.setattr(os, "execv", execv)
    monkeypatch.setattr(sys, "argv", ["flwr-clientapp", *argv])
    with pytest.raises(SystemExit):
        site_launcher.main(str(worker_dir))
    reply = site_worker.lost_reply(got)

    assert "after it pulled the task; answering this task with an error" in capsys.readouterr().err
    assert execs == [[sys.executable, "-c", "from client.site_worker import report_lost; report_lost()", header, *argv]]
    assert reply.has_error() and "site worker process ended" in reply.error.reason
    assert reply.metadata.reply_to_message_id == asked.metadata.message_id and reply.metadata.dst_node_id == asked.metadata.src_node_id


def _bundle(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return buf.getvalue()


def test_the_worker_refuses_a_bundle_with_code_before_loading_any_clientapp(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[str] = []
    monkeypatch.setattr(pinned_app, "load_pinned", lambda: loaded.append("loaded"))
    toml = '[tool.flwr.app.components]\nclientapp = "client.app:app"\nserverapp = "server.app:app"\n'
    fab = _bundle({"pyproject.toml": toml, "researcher.py": "import os; os.system('curl evil')"})
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})

    with pytest.raises(BundleRefused, match="researcher.py"):
        site_worker.execute(_message(), context, fab)

    assert loaded == []


def test_the_worker_mode_launcher_imports_neither_flower_nor_torch(tmp_path: Path) -> None:
    launcher = write_launcher(tmp_path / "bin", worker_dir=tmp_path / "w")
    text = launcher.read_text()
    probe = text.replace("main(", "print(sorted(m for m in sys.modules if m.split('.')[0] in {'flwr', 'torch', 'numpy', 'client', 'grpc'})) or (")

    out = subprocess.run([sys.executable, "-IS", "-c", probe.split("\n", 1)[1]], capture_output=True, text=True, check=True, env={"PATH": ""})

    assert text.startswith(f"#!{sys.executable} -IS\n") and repr(str((tmp_path / "w").resolve())) in text
    assert out.stdout.strip() == "['client', 'client.site_launcher']"


@pytest.mark.slow
def test_secure_aggregation_stages_keep_their_state_across_messages_served_by_one_worker(tiny_cohort: Path, tmp_path: Path) -> None:
    """SecAgg+ keeps each site's per-run secrets in ``context.state`` between its stages (one
    message each); in worker mode that context is Flower's own object, pulled and pushed per task."""
    from dataclasses import replace

    import yaml

    from server.deployment import LocalConsortium
    from shared.config import SecureAggregationConfig
    from shared.schema import to_plain
    from tests.conftest import tiny_experiment

    exp = tiny_experiment()
    sa = SecureAggregationConfig(enabled=True, num_shares=3, reconstruction_threshold=2, max_weight=20.0, clipping_range=8.0)
    exp = replace(exp, federation=replace(exp.federation, rounds=2, min_nodes=3, secure_aggregation=sa))
    exp_path = tmp_path / "experiment.yaml"
    exp_path.write_text(yaml.safe_dump(to_plain(exp)))
    sites = []
    for name in ("alpha", "beta", "gamma"):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(f"name: {name}\nmanifest: {tiny_cohort / name / 'manifest.csv'}\nstate_dir: {tmp_path / name}\n")
        sites.append(cfg)
    out, logs = tmp_path / "run", tmp_path / "flower" / "logs"

    with LocalConsortium(tmp_path / "flower", sites) as consortium:
        done = consortium.submit(exp_path, out, run_id="secagg-worker", timeout_s=400)

    all_logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(logs.glob("*.log")))
    assert done.returncode == 0, done.stderr[-2000:] + all_logs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2, summary
    assert set(summary["sites"]) == {"alpha", "beta", "gamma"} and all(s["epsilon"] > 0 for s in summary["sites"].values())
    for i in range(3):  # the pre-flight plan, 4 SecAgg+ stages per training round and the evaluations: one process
        served = re.findall(r"fedrelapse site worker pid (\d+): task (\d+) done", (logs / f"supernode-{i}.log").read_text(errors="replace"))
        assert len(served) >= 1 + 2 * 4 and len({pid for pid, _ in served}) == 1, served
