"""The site's `flwr-clientapp`: runs only the installed ClientApp, never code from an app bundle.

Stock Flower 1.42 (`flwr-clientapp`, spawned by name by the SuperNode's `flower-superexec`)
extracts the submitted app bundle (FAB), puts it first on ``sys.path`` and imports whatever
``[tool.flwr.app.components] clientapp`` names, so whoever can submit a run could execute
arbitrary code at every hospital. Flower's own remedy (``--trusted-entities``) only accepts
bundles verified by the Flower Hub (``valid_license``), which an offline consortium cannot use.

This module is Flower's ClientApp process with two steps replaced:

* installing the bundle -> :func:`check_bundle`: the bundle is read, never extracted; it must
  carry configuration only (no Python or other code), stay within small size limits (1 MiB a
  file, 16 MiB in all, checked before anything is decompressed) and name ``client.app:app``;
* loading the ClientApp -> the pinned, installed :data:`PINNED_CLIENTAPP`.

It also retries a pull of the task's message objects from its SuperNode every 0.05–0.1 s
instead of after 1, 2, 4 … s (:func:`prompt_task_pulls`, shared/flower_pulls.py).

A refused bundle ends the task with an error reply that names the reason, so the researcher
sees a per-site refusal rather than a timeout. :func:`write_launcher` writes the executable
named ``flwr-clientapp`` that `fedrelapse site start` puts first on the SuperNode's ``PATH``;
in site-worker mode (the default) that launcher is client/site_launcher.py, which hands each
task to the long-lived client/site_worker.py, and this module's :func:`main` is its fallback.
"""

from __future__ import annotations

import importlib
import io
import os
import stat
import sys
import tomllib
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from types import ModuleType

from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import LoadClientAppError

from shared.atomic import write_atomically
from shared.errors import PolicyError
from shared.flower_env import without_flower_telemetry
from shared.flower_pulls import FIRST_RETRY_S, LOCAL_RETRY_CAP_S, shorten_first_retry

PINNED_CLIENTAPP = "client.app:app"
PINNED_MARK = "fedrelapse pinned ClientApp"  # printed by every task this launcher runs
LAUNCHER = "flwr-clientapp"  # the name flower-superexec spawns (flwr.supercore.constant.TASK_TYPE_TO_COMMAND)
# What a configuration-only bundle may hold: its pyproject.toml, Flower's hash list, and text.
_ALLOWED_NAMES = frozenset({"pyproject.toml", ".info/CONTENT", "LICENSE"})
_ALLOWED_SUFFIXES = frozenset({".md"})
# Sizes a configuration-only bundle stays far below (the consortium's pyproject.toml is about
# 1 KB): checked on the archive's declared sizes before anything is decompressed, and the one
# file read (pyproject.toml) is read no further than its limit, so a deflate bomb (1 MB that
# inflates to 1 GB) is refused in milliseconds instead of filling the site's memory.
MAX_BUNDLE_FILE_BYTES = 1 << 20  # 1 MiB per file
MAX_BUNDLE_TOTAL_BYTES = 16 << 20  # 16 MiB for all files together


class BundleRefused(PolicyError):
    """The submitted app bundle carries code or asks for a ClientApp other than the pinned one.

    Not a LoadClientAppError on purpose: Flower replaces that error's text with a generic one,
    and the researcher must read why the site refused.
    """


def check_bundle(fab: bytes) -> dict[str, object]:
    """Refuse a bundle unless it is configuration only and names the pinned ClientApp.

    Returns the bundle's parsed ``pyproject.toml``. Nothing is extracted or imported.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
    except zipfile.BadZipFile:
        raise BundleRefused("The app bundle is not a zip archive; this site refuses it.") from None
    with archive:
        names = [n for n in archive.namelist() if not n.endswith("/")]
        extra = sorted(n for n in names if n not in _ALLOWED_NAMES and PurePosixPath(n).suffix not in _ALLOWED_SUFFIXES)
        if extra:
            raise BundleRefused(
                f"The app bundle carries files this site will not accept ({', '.join(extra[:5])}); sites run only their "
                f"installed, pinned ClientApp, so a bundle may hold pyproject.toml and documentation only."
            )
        if "pyproject.toml" not in names:
            raise BundleRefused("The app bundle has no pyproject.toml; this site refuses it.")
        check_sizes(archive)
        try:
            config = tomllib.loads(_read_small(archive, "pyproject.toml").decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise BundleRefused(f"The app bundle's pyproject.toml does not parse ({exc}); this site refuses it.") from None
    component = config.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}).get("clientapp")
    if component != PINNED_CLIENTAPP:
        raise BundleRefused(
            f"The app bundle asks for ClientApp {component!r}; this site runs only its installed {PINNED_CLIENTAPP!r}. "
            f"Submit the consortium's deploy/flower-app bundle (code changes are installed by each hospital's IT, not shipped)."
        )
    return config


def check_sizes(archive: zipfile.ZipFile) -> None:
    """Refuse a bundle whose files (as the archive declares them) exceed the size limits."""
    total = 0
    for info in archive.infolist():
        if info.file_size > MAX_BUNDLE_FILE_BYTES:
            raise BundleRefused(
                f"The app bundle's {info.filename} is {info.file_size:,} bytes uncompressed, above the {MAX_BUNDLE_FILE_BYTES:,}-byte limit "
                f"for one file of a configuration-only bundle; this site refuses it without reading it."
            )
        total += info.file_size
    if total > MAX_BUNDLE_TOTAL_BYTES:
        raise BundleRefused(
            f"The app bundle's files add up to {total:,} bytes uncompressed, above the {MAX_BUNDLE_TOTAL_BYTES:,}-byte limit "
            f"for a configuration-only bundle; this site refuses it without reading them."
        )


def _read_small(archive: zipfile.ZipFile, name: str) -> bytes:
    """A member's bytes, read no further than the per-file limit (whatever size the archive declares)."""
    try:
        with archive.open(name) as fh:
            data = fh.read(MAX_BUNDLE_FILE_BYTES + 1)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:  # a corrupt entry, or one whose declared size or CRC lies
        raise BundleRefused(f"The app bundle's {name} cannot be read ({exc}); this site refuses it.") from None
    if len(data) > MAX_BUNDLE_FILE_BYTES:
        raise BundleRefused(f"The app bundle's {name} is larger than the {MAX_BUNDLE_FILE_BYTES:,}-byte limit for one file; this site refuses it.")
    return data


def load_pinned() -> ClientApp:
    """The installed ClientApp (imported from site-packages, never from a bundle directory)."""
    module, _, attr = PINNED_CLIENTAPP.partition(":")
    app = getattr(importlib.import_module(module), attr)
    if not isinstance(app, ClientApp):
        raise LoadClientAppError(f"{PINNED_CLIENTAPP} is not a flwr ClientApp; reinstall fedrelapse at this site.")
    return app


def _checked_install(fab_file: Path | bytes, install_dir: Path | None = None, skip_prompt: bool = False) -> Path:
    """Stands in for flwr.cli.install.install_from_fab: check, never extract."""
    del install_dir, skip_prompt
    check_bundle(fab_file if isinstance(fab_file, bytes) else fab_file.read_bytes())
    print(f"{PINNED_MARK}: the app bundle is configuration only; running the installed {PINNED_CLIENTAPP}", file=sys.stderr, flush=True)
    return Path(os.devnull)


def _pinned_loader(default_app_ref: str, app_path: str | None, multi_app: bool) -> Callable[[str, str, str], ClientApp]:
    """Stands in for flwr.clientapp.utils.get_load_client_app_fn: ignores the bundle's reference."""
    del default_app_ref, app_path, multi_app
    return lambda fab_id, fab_version, fab_hash: load_pinned()


def prompt_task_pulls(runtime: ModuleType) -> None:
    """The task's pull of its message objects from the SuperNode (which may still be fetching
    them from the SuperLink) retries after FIRST_RETRY_S, then at most every LOCAL_RETRY_CAP_S,
    not after 1, 2, 4 … 10 s; warns if it cannot."""
    reason = shorten_first_retry(runtime, "pull_and_inflate_object_from_tree", initial_backoff_s=FIRST_RETRY_S, backoff_cap_s=LOCAL_RETRY_CAP_S)
    if reason is not None:
        print(f"fedrelapse: WARNING: {reason}; a task may wait 1 s for its message (Flower's own first retry).", file=sys.stderr, flush=True)


def main() -> None:
    """Entry point of the ``flwr-clientapp`` launcher: Flower's ClientApp process, pinned."""
    from flwr.supernode.cli import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime

    runtime.install_from_fab = _checked_install
    runtime.get_load_client_app_fn = _pinned_loader
    prompt_task_pulls(runtime)
    flwr_clientapp()


CLIENTAPP_MODES = ("worker", "per-message")  # `fedrelapse site start --clientapp`


def write_launcher(bin_dir: Path, *, worker_dir: Path | None = None) -> Path:
    """Write ``bin_dir/flwr-clientapp`` (0755) with this interpreter.

    Without ``worker_dir`` it runs :func:`main`: every message is a fresh ClientApp process.
    With it, it is the small launcher of client/site_launcher.py (``python -I -S``, standard
    library only), which hands each task to the site worker (client/site_worker.py) through
    a socket in ``worker_dir`` and falls back to :func:`main` when no worker answers.
    Put ``bin_dir`` first on the SuperNode's ``PATH`` (see :func:`launcher_env`).
    """
    if len(sys.executable) > 120:
        raise OSError(f"The Python interpreter path {sys.executable} is too long for a #! line; install fedrelapse under a shorter path.")
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / LAUNCHER
    if worker_dir is None:
        script = f"#!{sys.executable}\n# Written by fedrelapse: the site's pinned ClientApp (client/pinned_app.py).\nfrom client.pinned_app import main\n\nmain()\n"
    else:
        root = str(Path(__file__).resolve().parents[1])  # where this fedrelapse is installed: the launcher imports it from there only
        script = (
            f"#!{sys.executable} -IS\n# Written by fedrelapse: hands each ClientApp task to the site worker (client/site_launcher.py).\n"
            f"import sys\n\nsys.path.insert(0, {root!r})\nfrom client.site_launcher import main\n\nmain({str(worker_dir.resolve())!r})\n"
        )
    data = script.encode()
    write_atomically(path, lambda fh: fh.write(data), mode=stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    return path


# How often the SuperNode's flower-superexec looks for a task to start (Flower's default: 1 s,
# i.e. on average 0.5 s added to every message); a look is one local call. Set the variable
# yourself to override it.
SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_S = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1"


def launcher_env(bin_dir: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The SuperNode's environment: the pinned launcher first on ``PATH``, then this interpreter's
    scripts; superexec looks for tasks every 0.1 s unless ``$FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` says otherwise;
    Flower's telemetry off (inherited by superexec, every ClientApp and the site worker)."""
    env = without_flower_telemetry(dict(os.environ if base is None else base))
    env["PATH"] = os.pathsep.join([str(bin_dir.resolve()), str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault(SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_S)
    return env
