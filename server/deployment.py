"""Flower's Deployment Engine on one host: a SuperLink, one SuperNode per site, `flwr run`.

Used by `fedrelapse run --local` and by the integration tests. The ServerApp and ClientApp are
the installed `server`/`client` packages; the submitted app bundle (deploy/flower-app)
carries only configuration, and every SuperNode runs the pinned `flwr-clientapp` of
client/pinned_app.py, which refuses a bundle that carries code; by default its tasks run in
one long-lived site worker per SuperNode (client/site_worker.py). Insecure transport here is
for 127.0.0.1 only.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from client.pinned_app import launcher_env, write_launcher
from client.supernode_main import IDLE_GROWTH
from server.node_registry import NodeRegistry, write_connection
from shared import protocol as P  # noqa: N812
from shared.errors import FederationError
from shared.flower_env import without_flower_telemetry

APP_DIR = Path(__file__).resolve().parents[1] / "deploy" / "flower-app"
FEDERATION = "fedrelapse-local"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    """A console script from this interpreter's environment (SuperLink spawns them by name)."""
    here = Path(sys.executable).parent / name
    found = here if here.exists() else shutil.which(name)
    if not found:
        raise FederationError(f"`{name}` is not installed in this environment; run deploy/setup.sh.")
    return str(found)


def scripts_first_on_path(env: dict[str, str]) -> dict[str, str]:
    """``env`` with this interpreter's scripts folder first on ``PATH``: Flower's SuperLink and
    SuperNode start ``flower-superexec`` (and it ``flwr-serverapp``) by name, which fails with
    FileNotFoundError when the virtual environment is not activated. Flower's telemetry off."""
    return without_flower_telemetry({**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})


def _wait_healthy(port: int, proc: subprocess.Popen[bytes], what: str, log: Path, timeout_s: float, ca: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    url, ctx = f"http://127.0.0.1:{port}/health", None
    if ca is not None:
        url, ctx = f"https://127.0.0.1:{port}/health", ssl.create_default_context(cafile=str(ca))
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FederationError(f"{what} exited with code {proc.returncode}; see {log}.")
        try:
            with urllib.request.urlopen(url, timeout=1, context=ctx):  # noqa: S310 - loopback only
                return
        except OSError:
            time.sleep(0.2)
    raise FederationError(f"{what} did not become healthy within {timeout_s:.0f} s; see {log}.")


@dataclass
class LocalConsortium:
    """Start/stop a SuperLink and SuperNodes as processes on 127.0.0.1."""

    workdir: Path
    site_configs: list[Path]
    startup_timeout_s: float = 60.0
    superlink_port: int = 0
    keys: Path | None = None  # a `fedrelapse keys` folder: TLS on every link; None = insecure loopback
    node_auth: bool = False  # with keys: only SuperNodes whose public key was registered may join
    site_worker: bool = True  # one long-lived ClientApp worker per SuperNode; False: a fresh process per message
    bounded_poll: bool = True  # idle SuperNodes look for work from site.yaml idle_poll_s up to 3 s (client/supernode_main.py); False: always Flower's 3 s
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def _env(self, home: str) -> dict[str, str]:
        env = scripts_first_on_path(dict(os.environ))
        env.update(FLWR_HOME=str(self.workdir / home), PYTHONUNBUFFERED="1")  # telemetry off: scripts_first_on_path
        return env

    def _spawn(self, args: list[str], home: str, log_name: str, *, pinned: bool = False) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.workdir / "logs" / log_name
        env = self._env(home)
        if pinned:  # the SuperNode's flower-superexec finds the pinned flwr-clientapp first
            env = launcher_env(self.workdir / "pinned-bin", env)
        fh = open(log, "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append(proc)
        return proc, log

    def start(self) -> None:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.superlink_port = self.superlink_port or free_port()
        link, log = self._spawn(
            [_bin("flower-superlink"), *self._server_tls(), "--host", "127.0.0.1", "--port", str(self.superlink_port),
             "--isolation", "subprocess", "--disable-runtime-dependency-installation"],
            "home-superlink", "superlink.log",
        )
        _wait_healthy(self.superlink_port, link, "flower-superlink", log, self.startup_timeout_s, self.ca)
        write_connection(self.workdir / "home-cli", address=f"127.0.0.1:{self.superlink_port}", ca=self.ca, name=FEDERATION)
        write_launcher(self.workdir / "pinned-bin", worker_dir=self.workdir / "site-workers" if self.site_worker else None)
        for i, cfg in enumerate(self.site_configs):
            key = None
            if self.node_auth:
                key = self.site_node_key(cfg)
                self.register(key.with_suffix(".pub"))
            self.start_supernode(cfg, f"supernode-{i}", auth_key=key)

    def site_node_key(self, cfg: Path) -> Path:
        """The site's node private key under keys/sites/<name>/ (made if missing)."""
        from server.keys import make_site
        from shared.config import load_site

        assert self.keys is not None  # noqa: S101 - node_auth requires keys (checked by the caller)
        name = load_site(cfg).name
        key = self.keys / "sites" / name / "node.key"
        return key if key.exists() else make_site(self.keys, name)[0]

    @property
    def registry(self) -> NodeRegistry:
        """The SuperLink's node registry (register, find by key, revoke)."""
        return NodeRegistry(self.workdir / "home-cli", FEDERATION)

    def register(self, public_key: Path) -> int:
        """Register a site's node public key with the SuperLink; return its node id."""
        return self.registry.register(public_key)

    @property
    def ca(self) -> Path | None:
        return (self.keys / "ca" / "ca.pem").resolve() if self.keys else None

    def _server_tls(self) -> list[str]:
        if not self.keys:
            return ["--insecure"]
        k = self.keys.resolve()
        auth = ["--enable-supernode-auth"] if self.node_auth else []
        return ["--ssl-ca-certfile", str(k / "ca" / "ca.pem"), "--ssl-certfile", str(k / "server" / "server.pem"), "--ssl-keyfile", str(k / "server" / "server.key"), *auth]

    def start_supernode(self, cfg: Path, name: str, *, insecure: bool | None = None, wait: bool = True, auth_key: Path | None = None) -> tuple[subprocess.Popen[bytes], Path]:
        """One site's SuperNode running the pinned ClientApp; ``insecure=True`` forces plaintext
        (to test that it is refused)."""
        plain = (self.ca is None) if insecure is None else insecure
        transport = ["--insecure"] if plain else ["--root-certificates", str(self.ca)]
        if auth_key is not None:
            transport += ["--auth-supernode-private-key", str(auth_key.resolve())]
        port = free_port()
        program = supernode_program(*self._idle_poll(cfg)) if self.bounded_poll else supernode_program(None)
        node, log = self._spawn(
            [*program, *transport, "--superlink", f"127.0.0.1:{self.superlink_port}", "--port", str(port),
             "--isolation", "subprocess", "--node-config", f"{P.NC_SITE_CONFIG}=\"{cfg.resolve()}\""],
            f"home-{name}", f"{name}.log", pinned=True,
        )
        if wait:
            _wait_healthy(port, node, f"flower-supernode for {cfg}", log, self.startup_timeout_s)
        return node, log

    @staticmethod
    def _idle_poll(cfg: Path) -> tuple[float, float]:
        from shared.config import load_site

        site = load_site(cfg)
        return site.idle_poll_s, site.idle_poll_growth

    def submit_command(self, experiment: Path | None, out: Path | None, *, run_id: str = "", resume: Path | None = None, app_dir: Path = APP_DIR) -> tuple[list[str], dict[str, str]]:
        """The `flwr run` command line and environment that submit a run (or resume one) here."""
        key = (self.keys / "server" / "model-signing.key").resolve() if self.keys else None
        values = {P.RC_EXPERIMENT: experiment, P.RC_OUT: out, P.RC_RUN_ID: run_id, P.RC_SIGNING_KEY: key if key and key.exists() else None, P.RC_RESUME: resume}
        return flwr_run_argv(app_dir, FEDERATION, values), self._env("home-cli")

    def submit(
        self, experiment: Path | None, out: Path | None, *, run_id: str = "", resume: Path | None = None, timeout_s: float = 600.0, app_dir: Path = APP_DIR,
    ) -> subprocess.CompletedProcess[str]:
        """`flwr run` the app bundle and stream until the ServerApp finishes; with ``resume``
        (a run folder) the ServerApp continues that run instead (experiment and out may be None)."""
        argv, env = self.submit_command(experiment, out, run_id=run_id, resume=resume, app_dir=app_dir)
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> LocalConsortium:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_config_arg(values: dict[str, str | Path | None]) -> str:
    """``--run-config`` text for ``values`` (paths made absolute; None and "" give an empty value)."""
    parts = []
    for key, value in values.items():
        text = "" if value is None else str(value.resolve()) if isinstance(value, Path) else value
        if '"' in text or "\n" in text:
            raise FederationError(f"Run-config value for {key!r} contains a quote or a line break ({text!r}); rename the file or folder.")
        parts.append(f'{key}="{text}"')
    return " ".join(parts)


def flwr_run_argv(app_dir: Path, federation: str, values: dict[str, str | Path | None]) -> list[str]:
    """`flwr run APP FEDERATION --stream --run-config ...`: submit and stream until the run ends."""
    return [_bin("flwr"), "run", str(app_dir), federation, "--stream", "--run-config", run_config_arg(values)]


def superlink_argv(*, keys: Path | None, host: str, port: int, node_auth: bool = True) -> list[str]:
    """The coordinator's SuperLink command line: TLS with the consortium certificate and
    SuperNode authentication (only registered site keys join) unless ``keys`` is None
    (loopback testing only), and no run-time package installation."""
    if node_auth and keys is None:
        raise FederationError("SuperNode authentication needs TLS: give the keys folder, or turn node authentication off for a loopback test.")
    tls = ["--insecure"]
    if keys is not None:
        k = keys.resolve()
        for f in (k / "ca" / "ca.pem", k / "server" / "server.pem", k / "server" / "server.key"):
            if not f.is_file():
                raise FederationError(f"{f} is missing; create it with `fedrelapse keys ca` and `fedrelapse keys server`.")
        tls = ["--ssl-ca-certfile", str(k / "ca" / "ca.pem"), "--ssl-certfile", str(k / "server" / "server.pem"), "--ssl-keyfile", str(k / "server" / "server.key")]
        tls += ["--enable-supernode-auth"] if node_auth else []
    return [_bin("flower-superlink"), *tls, "--host", host, "--port", str(port), "--isolation", "subprocess", "--disable-runtime-dependency-installation"]


def supernode_program(idle_poll_s: float | None, growth: float = IDLE_GROWTH) -> list[str]:
    """How a SuperNode is started: Flower's SuperNode looking for work ``idle_poll_s`` seconds
    after a message, then ``growth`` times longer per empty look up to 3 s (client/supernode_main.py,
    this interpreter, ``-P``: nothing is imported from the working folder), or with None the
    plain ``flower-supernode`` script (always every 3 s).
    The arguments that follow are Flower's own either way."""
    if idle_poll_s is None:
        return [_bin("flower-supernode")]
    return [sys.executable, "-P", "-m", "client.supernode_main", "--idle-poll-s", f"{idle_poll_s:g}", "--idle-growth", f"{growth:g}"]


def supernode_argv(
    *, site_yaml: Path, superlink: str, ca: Path | None, port: int, node_key: Path | None = None, idle_poll_s: float | None = None, idle_poll_growth: float = IDLE_GROWTH,
) -> list[str]:
    """A site's SuperNode command line: trusts only the consortium CA, proves itself with its
    node key, and runs the installed ClientApp (start it with :func:`client.pinned_app.launcher_env`);
    ``idle_poll_s``: see :func:`supernode_program`."""
    if ca is not None and not ca.is_file():
        raise FederationError(f"CA certificate {ca} is missing; ask the coordinator admin for ca.pem.")
    if not site_yaml.is_file():
        raise FederationError(f"{site_yaml} does not exist; write the site's site.yaml first (docs/runbook-hospital-it.md).")
    if node_key is not None and not node_key.is_file():
        raise FederationError(f"Node key {node_key} is missing; ask the coordinator admin for this site's node.key (`fedrelapse keys site NAME`).")
    if node_key is not None and ca is None:
        raise FederationError("A node key needs TLS (Flower refuses SuperNode authentication over plaintext); give the consortium ca.pem.")
    transport = ["--insecure"] if ca is None else ["--root-certificates", str(ca.resolve())]
    transport += ["--auth-supernode-private-key", str(node_key.resolve())] if node_key is not None else []
    return [*supernode_program(idle_poll_s, idle_poll_growth), *transport, "--superlink", superlink, "--port", str(port), "--isolation", "subprocess",
            "--node-config", f"{P.NC_SITE_CONFIG}=\"{site_yaml.resolve()}\""]
