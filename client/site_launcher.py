"""The per-message ``flwr-clientapp`` launcher in site-worker mode: hands each task to the site worker.

Flower's SuperNode starts a fresh ``flwr-clientapp`` process for every message. In worker mode
that process is this module, run as ``python -I -S`` with the standard library only (≈20 ms
instead of ≈0.7 s to import Flower's runtime and ≈2.5 s to import the ClientApp): it passes
its command line (Runtime API address and task token) and its stdout/stderr to the site's
long-lived worker (client/site_worker.py) over a Unix socket, then waits for the worker's
exit code. The worker pulls the task from the SuperNode, checks the bundle, runs the pinned
ClientApp and pushes the reply with Flower's own runtime functions; data loaded for one
message stays in memory for the next.

One worker per SuperNode: the socket is ``<socket_dir>/clientapp-<parent pid>.sock`` where the
parent is the SuperNode's ``flower-superexec`` (``--parent-pid``). The first launcher starts the
worker under a lock file; the worker exits when that parent is gone or on SIGTERM.

Fallbacks, so a task never hangs on a missing worker:

* the worker cannot be reached or started, or dies before it pulled the task -> this process
  becomes the per-message pinned ClientApp (client/pinned_app.py), as without a worker;
* the worker dies after it pulled the task (the SuperNode hands a task out once) -> the task
  is answered with an error reply that says so (:func:`client.site_worker.report_lost`), and
  the next message starts a new worker.

Nothing here imports Flower, torch or the site's code: keep it that way (it runs per message).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

SOCKET_PREFIX = "clientapp-"
START_TIMEOUT_S = 60.0  # a worker binds its socket before its imports; this only bounds a stuck start
_FRAME = struct.Struct(">I")  # every frame: 4-byte big-endian length, then UTF-8 JSON
MAX_FRAME = 1 << 20


class WorkerUnavailable(Exception):
    """The site worker could not be reached, or it ended before answering."""


def socket_name(parent_pid: int) -> str:
    """The socket's file name for the SuperNode whose ``flower-superexec`` has ``parent_pid``."""
    return f"{SOCKET_PREFIX}{parent_pid}.sock"


def private_dir(path: str) -> None:
    """Create ``path`` as 0700 (tighten it if it is ours; refuse it if it belongs to someone else)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_uid != os.getuid():
        raise PermissionError(f"The site worker folder {path} belongs to uid {st.st_uid}, not to this user ({os.getuid()}); remove it or point the site's state_dir elsewhere.")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


@contextmanager
def in_dir(path: str) -> Iterator[None]:
    """Work inside ``path`` for a moment (socket paths are bound relative: AF_UNIX allows ~107 bytes)."""
    here = os.open(".", os.O_RDONLY)
    try:
        os.chdir(path)
        yield
    finally:
        os.fchdir(here)
        os.close(here)


def send_frame(sock: socket.socket, payload: dict[str, object], fds: list[int] | None = None) -> None:
    data = json.dumps(payload).encode("utf-8")
    blob = _FRAME.pack(len(data)) + data
    if fds:
        sent = socket.send_fds(sock, [blob], fds)
        if sent < len(blob):  # nothing more to send is not a send: the peer may already be done
            sock.sendall(blob[sent:])
    else:
        sock.sendall(blob)


def recv_frame(sock: socket.socket, *, max_fds: int = 0) -> tuple[dict[str, object], list[int]]:
    """One frame (and any descriptors sent with it); WorkerUnavailable at end of stream."""
    buf, fds = b"", []
    while len(buf) < _FRAME.size:
        chunk, got, _, _ = socket.recv_fds(sock, 65536, max_fds) if max_fds and not buf else (sock.recv(_FRAME.size - len(buf)), [], 0, None)
        fds += got
        if not chunk:
            raise WorkerUnavailable("the connection closed before a whole frame arrived")
        buf += chunk
    (size,) = _FRAME.unpack(buf[:_FRAME.size])
    if size > MAX_FRAME:
        raise WorkerUnavailable(f"a frame of {size} bytes is larger than the {MAX_FRAME} allowed")
    body = buf[_FRAME.size:]
    while len(body) < size:
        chunk = sock.recv(size - len(body))
        if not chunk:
            raise WorkerUnavailable("the connection closed inside a frame")
        body += chunk
    if len(body) > size:
        raise WorkerUnavailable("the peer sent more than one frame at once")
    return json.loads(body.decode("utf-8")), fds


def connect(socket_dir: str, parent_pid: int) -> socket.socket | None:
    """A connection to the running worker, or None (no socket, or nobody listening)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with in_dir(socket_dir):
            sock.connect(socket_name(parent_pid))
    except OSError:
        sock.close()
        return None
    return sock


def worker_command(socket_dir: str, parent_pid: int) -> list[str]:
    """How a launcher starts the worker: this interpreter, the site's environment (PYTHONPATH)."""
    return [sys.executable, "-m", "client.site_worker", "--socket-dir", socket_dir, "--parent-pid", str(parent_pid)]


def connect_or_start(socket_dir: str, parent_pid: int, *, command: list[str] | None = None, timeout_s: float = START_TIMEOUT_S) -> socket.socket:
    """Connect to this SuperNode's worker, starting it (under a lock, once) if none answers."""
    private_dir(socket_dir)
    sock = connect(socket_dir, parent_pid)
    if sock is not None:
        return sock
    lock_path = os.path.join(socket_dir, f"{SOCKET_PREFIX}{parent_pid}.lock")
    with os.fdopen(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sock = connect(socket_dir, parent_pid)  # another launcher may have started it meanwhile
        if sock is not None:
            return sock
        with in_dir(socket_dir):
            try:
                os.unlink(socket_name(parent_pid))  # a stale socket of a worker that died
            except FileNotFoundError:
                pass
        log = os.open(os.path.join(socket_dir, f"{SOCKET_PREFIX}{parent_pid}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            proc = subprocess.Popen(command or worker_command(socket_dir, parent_pid), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        except OSError as exc:
            raise WorkerUnavailable(f"could not start the site worker ({exc})") from None
        finally:
            os.close(log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            sock = connect(socket_dir, parent_pid)
            if sock is not None:
                return sock
            if proc.poll() is not None:
                raise WorkerUnavailable(f"the site worker exited with code {proc.returncode} while starting; see {socket_dir}/{SOCKET_PREFIX}{parent_pid}.log")
            time.sleep(0.02)
        proc.kill()
        raise WorkerUnavailable(f"the site worker did not open its socket within {timeout_s:.0f} s; see {socket_dir}/{SOCKET_PREFIX}{parent_pid}.log")


def parent_pid_of(argv: list[str]) -> int:
    """The ``--parent-pid`` Flower gave this task (the SuperNode's superexec), else our parent."""
    for i, arg in enumerate(argv):
        if arg == "--parent-pid" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--parent-pid="):
            return int(arg.split("=", 1)[1])
    return os.getppid()


def delegate(argv: list[str], socket_dir: str, *, command: list[str] | None = None) -> tuple[int | None, str]:
    """Let the worker run this task. Returns ``(exit code, "")`` when it answered, or
    ``(None, header)`` when it did not: ``header`` is "" if the task was never pulled (run it
    here) and the pulled message's header (base64 protobuf) if it was (reply with an error)."""
    header = ""
    try:
        sock = connect_or_start(socket_dir, parent_pid_of(argv), command=command)
        with sock:
            sys.stdout.flush()
            sys.stderr.flush()
            send_frame(sock, {"argv": argv}, [1, 2])
            while True:
                frame, _ = recv_frame(sock)
                if "pulled" in frame:
                    header = str(frame["pulled"])
                elif "exit" in frame:
                    return int(frame["exit"]), ""  # type: ignore[call-overload]
    except (OSError, ValueError, WorkerUnavailable) as exc:
        where = "after it pulled the task" if header else "before it pulled the task"
        print(f"fedrelapse: the site worker is unavailable ({exc}) {where}; "
              + ("answering this task with an error." if header else "running this task in a fresh ClientApp process instead."),
              file=sys.stderr, flush=True)
        return None, header


def main(socket_dir: str) -> None:
    """Entry point of the worker-mode launcher script (see client.pinned_app.write_launcher)."""
    argv = sys.argv[1:]
    code, header = (None, "") if "--token-stdin" in argv else delegate(argv, socket_dir)
    if code is not None:
        sys.exit(code)
    if header:  # the SuperNode gave the task to the worker, which is gone: answer it with an error
        base64.b64decode(header, validate=True)  # only a well-formed header is passed on
        run = "from client.site_worker import report_lost; report_lost()"
        os.execv(sys.executable, [sys.executable, "-c", run, header, *argv])
    os.execv(sys.executable, [sys.executable, "-c", "from client.pinned_app import main; main()", *argv])
