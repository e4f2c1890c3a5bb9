"""The site worker: one long-lived process per SuperNode that runs every ClientApp task.

Flower 1.42's SuperNode starts a fresh ``flwr-clientapp`` process per message, so each message
paid Python, Flower, torch and Opacus imports and reloaded the site's data (``Site()``: audio
hashes, features, tensors) — 1.45–1.50× round overhead on the Deployment Engine. In worker
mode the per-message process is the small launcher of client/site_launcher.py; this worker
keeps everything imported and the ClientApp's ``Site`` cache in memory between messages.

For each task the worker does what Flower's ``run_clientapp`` does, with Flower's functions:
pull the message, context and bundle from the SuperNode's Runtime API with the launcher's
token, check the bundle (:func:`client.pinned_app.check_bundle`: read, never extracted or
imported), run the installed pinned ClientApp, push the reply and the context (SecAgg+ keeps
its per-run state in ``context.state``; it is the same object Flower's runtime pushes back).

* One task at a time (a lock around bundle check, ClientApp and reply); each request has its
  own thread so that a pull that waits (a message of a stopped run never arrives) holds up
  nobody. The task's output goes to its launcher's stdout/stderr (passed over the socket),
  so the SuperNode's log reads as before.
* Socket ``<socket_dir>/clientapp-<superexec pid>.sock``: mode 0600 in a 0700 folder, and only
  a peer with this process's uid is served (SO_PEERCRED). Requests are JSON (the launcher's
  command line), never pickle; the bundle never comes over the socket.
* Exits when its SuperNode's superexec (``--parent-pid``) is gone, or on SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from client.site_launcher import WorkerUnavailable, in_dir, private_dir, recv_frame, send_frame, socket_name

_PEERCRED = struct.Struct("3i")  # pid, uid, gid of the connecting process (Linux SO_PEERCRED)


def _runtime_client(args: argparse.Namespace, token: str) -> Any:
    """Flower's Runtime API client with the interceptors ``run_clientapp`` uses."""
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    return RuntimeHttpClient.from_server_address(
        server_address=args.runtime_api_address,
        insecure=args.insecure,
        root_certificates=validate_and_resolve_root_certificates(args.root_certificates, args.insecure),
        interceptors=[RuntimeTracingInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker(),
    )


def _task_args(argv: list[str]) -> tuple[argparse.Namespace, str]:
    """The launcher's ``flwr-clientapp`` command line, parsed by Flower's own parser."""
    from flwr.common.args import try_obtain_flwr_app_token
    from flwr.supernode.cli.flwr_clientapp import _parse_args_run_flwr_clientapp

    args = _parse_args_run_flwr_clientapp().parse_args(argv)
    if getattr(args, "runtime_dependency_install", False):
        raise ValueError("This site installs no run-time dependencies; the SuperNode must not ask for them.")
    return args, try_obtain_flwr_app_token(args)


def execute(message: Any, context: Any, fab_content: bytes) -> Any:
    """Check the bundle, then run the pinned ClientApp on one message (the bundle is only read)."""
    from client.pinned_app import _checked_install, load_pinned

    _checked_install(fab_content)
    return load_pinned()(message=message, context=context)


def error_reason(ex: Exception) -> str:
    """What the coordinator reads about a task that raised: a refused bundle's own sentence (written
    for the researcher, no site data), otherwise only the exception's class and a reference to
    the error in this site's log (logged without patient data or local paths) (:func:`client.site_errors.withheld`)."""
    from client.pinned_app import BundleRefused
    from client.site_errors import withheld

    if isinstance(ex, BundleRefused):
        return str(ex)
    return withheld(ex, site="this site", doing="its ClientApp task")


def run_task(argv: list[str], on_pulled: Callable[[str], None], exclusive: Callable[[Any], AbstractContextManager[None]]) -> int:
    """One ClientApp task, as Flower's ``run_clientapp`` runs it; returns its exit code.

    Pulling the task may wait (a message of a run that was stopped never arrives), so it runs
    outside ``exclusive(context)``; the rest (bundle check, ClientApp, reply) runs inside it:
    one task at a time, with the launcher's stdout/stderr.
    """
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.app.message import remove_content_from_message
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.common.serde import message_to_proto
    from flwr.supercore import log
    from flwr.supercore.exit import ExitCode
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    args, token = _task_args(argv)
    client = _runtime_client(args, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    try:
        try:
            message, context, _run, fab = pull_task_input(client)
        except Exception as ex:  # noqa: BLE001 - no message, so no reply: the task fails, as in Flower
            reason = error_reason(ex)  # logs the error itself, without patient data or local paths (client.site_errors)
            log(40, "ClientApp could not pull its task: %s", reason)
            push_task_output(client=client, context=None, sub_status=SubStatus.FAILED, details=reason)
            return ExitCode.TASK_PROC_EXCEPTION
        on_pulled(base64.b64encode(message_to_proto(remove_content_from_message(message)).SerializeToString()).decode("ascii"))
        with exclusive(context):
            reply, code = None, ExitCode.SUCCESS
            try:
                reply = execute(message, context, fab.content)
                sub_status, details = SubStatus.COMPLETED, ""
            except Exception as ex:  # noqa: BLE001 - reported to the coordinator as Flower does, but without its text
                e_code, reason = ErrorCode.CLIENT_APP_RAISED_EXCEPTION, error_reason(ex)
                if isinstance(ex, LoadClientAppError):
                    e_code, reason = ErrorCode.LOAD_CLIENT_APP_EXCEPTION, "An exception was raised when attempting to load `ClientApp`"
                log(40, "ClientApp raised an exception (%s): %s", type(ex).__name__, reason)  # not exc_info: its text may name a patient or a file (error_reason logged it, withheld)
                sub_status, details, code = SubStatus.FAILED, reason, ExitCode.TASK_PROC_EXCEPTION
                reply = Message(Error(code=e_code, reason=reason), reply_to=message)
            try:
                push_message(client, reply, context)
            except Exception as ex:  # noqa: BLE001
                log(40, "Failed to push reply message", exc_info=ex)
                code = ExitCode.CLIENTAPP_COMMUNICATION_ERROR
            push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        return code
    finally:
        heartbeat.stop()
        client.close()


def report_lost() -> None:
    """``python -c ... HEADER FLWR_CLIENTAPP_ARGS``: the worker died after it pulled the task;
    answer the coordinator with an error reply that says so, instead of letting the task hang."""
    from flwr.common.constant import SubStatus
    from flwr.supercore.exit import ExitCode
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    header, argv = sys.argv[1], sys.argv[2:]
    args, token = _task_args(argv)
    client = _runtime_client(args, token)
    reply = lost_reply(header)
    try:
        push_message(client, reply, _context_of(reply))
    finally:
        push_task_output(client=client, context=None, sub_status=SubStatus.FAILED, details=LOST_REASON)
        client.close()
    sys.exit(ExitCode.TASK_PROC_EXCEPTION)


LOST_REASON = ("The site worker process ended while it ran this task (crash or killed); nothing more was done. "
               "The next message starts a new worker; see the worker log in the site's state_dir/worker folder.")


def lost_reply(header: str) -> Any:
    """The error reply to the message whose header (base64 protobuf, no content) the worker sent."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611

    asked = message_from_proto(ProtoMessage.FromString(base64.b64decode(header, validate=True)))
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=LOST_REASON), reply_to=asked)


def _context_of(reply: Any) -> Any:
    """The two fields ``push_message`` reads from a context: the run and this node (the reply's sender)."""
    from flwr.app import Context, RecordDict

    return Context(run_id=reply.metadata.run_id, node_id=reply.metadata.src_node_id, node_config={}, state=RecordDict(), run_config={})


def _peer_uid(conn: socket.socket) -> int:
    return _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))[1]


class Exclusive:
    """One ClientApp task at a time, with the launcher's stdout/stderr as the process's fd 1 and 2."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tasks = 0

    @contextmanager
    def __call__(self, fds: list[int], context: Any) -> Iterator[None]:
        from flwr.supercore.task_identity import TaskIdentity

        with self.lock:
            saved = os.dup(1), os.dup(2)
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(fds[0], 1)
            os.dup2(fds[1], 2)
            TaskIdentity.run_id, TaskIdentity.node_id = context.run_id, context.node_id  # this task's, not a concurrent pull's
            try:
                yield
                self.tasks += 1
                print(self.line(), file=sys.stderr, flush=True)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])

    def line(self) -> str:
        """What the worker has served (no patient information): the tests and IT read it in the SuperNode log."""
        from client.app import _site

        return f"fedrelapse site worker pid {os.getpid()}: task {self.tasks} done, site plans loaded {_site.cache_info().misses}"


def serve_one(conn: socket.socket, exclusive: Exclusive) -> None:
    """Read one launcher's request, run its task, send its exit code; closes ``conn``."""
    with conn:
        if _peer_uid(conn) != os.getuid():
            print(f"refused a connection from uid {_peer_uid(conn)}: the worker serves only its own user", flush=True)
            return
        frame, fds = recv_frame(conn, max_fds=2)
        try:
            if frame.get("ping"):
                from client.app import _site

                send_frame(conn, {"pid": os.getpid(), "tasks": exclusive.tasks, "sites_loaded": _site.cache_info().misses})
                return
            argv = frame.get("argv")
            if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv) or len(fds) != 2:
                raise WorkerUnavailable("a request needs the launcher's argv (strings) and its stdout and stderr")
            code = run_task(argv, lambda header: send_frame(conn, {"pulled": header}), lambda context: exclusive(fds, context))
            send_frame(conn, {"exit": int(code)})
        finally:
            for fd in fds:
                os.close(fd)


def _serve_logged(conn: socket.socket, exclusive: Exclusive) -> None:
    try:
        serve_one(conn, exclusive)
    except (OSError, ValueError, WorkerUnavailable) as exc:
        print(f"a request ended early: {exc}", flush=True)


def _watch_parent(parent_pid: int, sock_path: str) -> None:
    """Exit (and remove the socket) once the SuperNode's superexec is gone."""
    while True:
        time.sleep(0.5)
        try:
            os.kill(parent_pid, 0)
        except (ProcessLookupError, PermissionError):  # PermissionError: the pid now belongs to someone else (reused)
            _remove(sock_path)
            os._exit(0)


def _remove(sock_path: str) -> None:
    try:
        os.unlink(sock_path)
    except FileNotFoundError:
        pass


def import_site_code() -> None:
    """Import Flower's ClientApp runtime, the ClientApp and the training code once, for every
    task this worker serves (no message pays for them).

    :func:`serve` runs this in a background thread. Flower gives a task 30 s from its launch to
    its first call (``HEARTBEAT_DEFAULT_INTERVAL``); after that the SuperNode hands the task out
    again and refuses the first token. On two loaded cores (load average 15) ten new workers
    took longer than that to import torch and the site's code before their first task's
    heartbeat, and every worker of the 10-site Deployment Engine bench ended within 40 s of
    the first message. A task therefore starts its heartbeat first and waits for this import
    (Python's import lock) only when it runs the ClientApp.
    """
    import flwr.supernode.runtime.run_clientapp as runtime

    from client.pinned_app import prompt_task_pulls

    prompt_task_pulls(runtime)  # a task's first retry for its message objects after 0.05 s, not 1 s
    import client.app  # noqa: F401
    import client.dp_train  # noqa: F401


def serve(socket_dir: str, parent_pid: int) -> None:
    """Bind the socket (0600 in a 0700 folder), import the ClientApp once (in the background), serve tasks forever."""
    os.umask(0o077)
    private_dir(socket_dir)
    sock_path = os.path.join(os.path.abspath(socket_dir), socket_name(parent_pid))
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with in_dir(socket_dir):
        server.bind(socket_name(parent_pid))
        os.chmod(socket_name(parent_pid), 0o600)
    server.listen(16)

    def remove_and_exit(*_: object) -> None:
        _remove(sock_path)
        os._exit(0)

    signal.signal(signal.SIGTERM, remove_and_exit)
    signal.signal(signal.SIGINT, remove_and_exit)
    threading.Thread(target=_watch_parent, args=(parent_pid, sock_path), daemon=True).start()
    print(f"fedrelapse site worker pid {os.getpid()} serving {sock_path} for superexec {parent_pid}", flush=True)
    # In the background: the first task starts its heartbeat while torch and the site's code load.
    threading.Thread(target=import_site_code, name="site-code-import", daemon=True).start()

    exclusive = Exclusive()
    while True:  # a thread per request: a task whose pull waits must not hold up the next one
        conn, _ = server.accept()
        threading.Thread(target=_serve_logged, args=(conn, exclusive), daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description="fedrelapse site worker: runs every ClientApp task of one SuperNode in one process.")
    parser.add_argument("--socket-dir", required=True, help="Folder for the socket (made 0700).")
    parser.add_argument("--parent-pid", required=True, type=int, help="The SuperNode's flower-superexec; the worker exits when it is gone.")
    args = parser.parse_args()
    serve(args.socket_dir, args.parent_pid)


if __name__ == "__main__":
    main()
