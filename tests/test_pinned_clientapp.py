"""A site runs only its installed ClientApp: a submitted app bundle that carries code is refused
and its code never runs (while stock Flower 1.42 would import and run it)."""

from __future__ import annotations

import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.clientapp import ClientApp

from client.pinned_app import LAUNCHER, BundleRefused, _checked_install, _pinned_loader, check_bundle, launcher_env, write_launcher
from server.deployment import APP_DIR

EVIL_MODULE = """from pathlib import Path
Path({marker!r}).write_text("researcher code ran at the site")
from flwr.clientapp import ClientApp
app = ClientApp()
"""


def researcher_bundle(tmp_path: Path, marker: Path, *, clientapp: str = "evil:app", module: str = "evil.py") -> bytes:
    """The consortium's pyproject.toml, but pointing at (or shadowing) a ClientApp the researcher ships."""
    app = tmp_path / "researcher-app"
    app.mkdir()
    text = (APP_DIR / "pyproject.toml").read_text().replace('clientapp = "client.app:app"', f'clientapp = "{clientapp}"')
    (app / "pyproject.toml").write_text(text)
    (app / module).parent.mkdir(parents=True, exist_ok=True)
    (app / module).write_text(EVIL_MODULE.format(marker=str(marker)))
    return build_fab_from_disk(app)


def test_the_consortium_bundle_is_configuration_only_and_accepted() -> None:
    config = check_bundle(build_fab_from_disk(APP_DIR))
    assert config["tool"]["flwr"]["app"]["components"]["clientapp"] == "client.app:app"  # type: ignore[index]


def test_stock_flower_would_run_the_researchers_code_but_the_pinned_app_never_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.utils import get_load_client_app_fn

    marker = tmp_path / "marker"
    fab = researcher_bundle(tmp_path, marker)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # Flower's loader prepends the bundle folder
    # Stock Flower (what `flwr-clientapp` does): install the bundle, import what it names.
    installed = install_from_fab(fab, skip_prompt=True)
    import hashlib

    fab_hash = hashlib.sha256(fab).hexdigest()
    get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)("fedrelapse/fedrelapse-app", "0.1.0", fab_hash)
    sys.modules.pop("evil", None)
    assert marker.read_text() == "researcher code ran at the site"  # the threat is real
    marker.unlink()
    shutil.rmtree(installed)

    # The site's pinned flwr-clientapp: the same two steps refuse the bundle and run nothing from it.
    with pytest.raises(BundleRefused, match=r"evil\.py.*installed, pinned ClientApp"):
        _checked_install(fab, skip_prompt=True)
    app = _pinned_loader("", None, True)("fedrelapse/fedrelapse-app", "0.1.0", fab_hash)
    assert isinstance(app, ClientApp) and sys.modules["client.app"].app is app  # the installed app (a ClientApp subclass), not the bundle's
    assert not marker.exists()
    assert not (tmp_path / "flwr-home" / "apps").exists() or not any((tmp_path / "flwr-home" / "apps").rglob("evil.py"))


@pytest.mark.parametrize(
    ("clientapp", "module", "reason"),
    [
        ("client.app:app", "client/app.py", r"client/app\.py"),  # shadows the installed package
        ("client.app:app", "data/setup.yaml", r"data/setup\.yaml"),  # anything but pyproject.toml and docs
    ],
)
def test_a_bundle_that_names_the_pinned_app_but_ships_files_is_refused(tmp_path: Path, clientapp: str, module: str, reason: str) -> None:
    with pytest.raises(BundleRefused, match=reason):
        check_bundle(researcher_bundle(tmp_path, tmp_path / "marker", clientapp=clientapp, module=module))


def test_a_bundle_naming_another_component_is_refused_with_a_sentence(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text((APP_DIR / "pyproject.toml").read_text().replace('"client.app:app"', '"client.other:app"'))
    with pytest.raises(BundleRefused, match=r"asks for ClientApp 'client\.other:app'.*runs only its installed 'client\.app:app'"):
        check_bundle(build_fab_from_disk(app))
    with pytest.raises(BundleRefused, match="not a zip archive"):
        check_bundle(b"not a zip")


def test_the_launcher_comes_first_on_the_supernodes_path_and_runs_this_interpreter(tmp_path: Path) -> None:
    launcher = write_launcher(tmp_path / "bin")
    assert launcher.name == LAUNCHER
    assert launcher.read_text().startswith(f"#!{sys.executable}\n") and "from client.pinned_app import main" in launcher.read_text()
    assert stat.S_IMODE(launcher.stat().st_mode) & stat.S_IXUSR
    env = launcher_env(tmp_path / "bin", {"PATH": os.defpath})
    assert shutil.which(LAUNCHER, path=env["PATH"]) == str(launcher.resolve())
    assert env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.1"  # tasks start within 0.1 s, not Flower's 1 s
    assert launcher_env(tmp_path / "bin", {"PATH": os.defpath, "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "2"})["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "2"
    assert write_launcher(tmp_path / "bin") == launcher  # rewriting is idempotent


def test_the_supernode_and_every_clientapp_it_starts_have_flowers_telemetry_off(tmp_path: Path) -> None:
    """The SuperNode's environment is inherited by flower-superexec, the launcher and the site worker."""
    from server.deployment import LocalConsortium
    from server.node_registry import NodeRegistry

    assert launcher_env(tmp_path / "bin", {"PATH": os.defpath})["FLWR_TELEMETRY_ENABLED"] == "0"
    assert launcher_env(tmp_path / "bin", {"PATH": os.defpath, "FLWR_TELEMETRY_ENABLED": "1"})["FLWR_TELEMETRY_ENABLED"] == "0"
    assert LocalConsortium(tmp_path, [])._env("home")["FLWR_TELEMETRY_ENABLED"] == "0"
    assert NodeRegistry(tmp_path)._env()["FLWR_TELEMETRY_ENABLED"] == "0"


def _zip(files: dict[str, bytes]) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_a_deflate_bomb_bundle_is_refused_by_its_declared_sizes_before_anything_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 MB bundle whose pyproject.toml inflated to 1 GB took 15 s and 2 GB of memory to refuse."""
    import zipfile

    mib = 1 << 20  # the per-file limit; 16 MiB in all
    config = (APP_DIR / "pyproject.toml").read_bytes()
    padded = config + b"#" * (2 * mib) + b"\n"  # the consortium's own settings, then a 2 MiB comment
    bomb = _zip({"pyproject.toml": padded})
    many = _zip({"pyproject.toml": config, **{f"doc{i}.md": b"#" * mib for i in range(17)}})  # 17 files of 1 MiB
    assert len(bomb) < 20_000 and len(many) < 100_000  # each compresses ~500:1
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *a, **k: pytest.fail(f"{name} was decompressed"))
    with pytest.raises(BundleRefused, match=rf"pyproject\.toml is {len(padded):,} bytes uncompressed, above the 1,048,576-byte limit"):
        check_bundle(bomb)
    with pytest.raises(BundleRefused, match=rf"files add up to {len(config) + 17 * mib:,} bytes uncompressed, above the 16,777,216-byte limit"):
        check_bundle(many)


def test_a_bundle_whose_declared_size_lies_is_refused_not_read_past_it() -> None:
    """The size checks trust the archive's directory; a pyproject.toml that inflates past the size
    it declares is cut there by zipfile and then fails its CRC: refused, with a sentence."""
    import struct

    bundle = bytearray(_zip({"pyproject.toml": (APP_DIR / "pyproject.toml").read_bytes() + b"#" * (2 << 20)}))
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local header, central directory: uncompressed size
        at = bundle.index(signature) + offset
        bundle[at:at + 4] = struct.pack("<I", 1000)
    with pytest.raises(BundleRefused, match=r"The app bundle's pyproject\.toml cannot be read \(.*CRC.*\); this site refuses it"):
        check_bundle(bytes(bundle))


def test_flowers_telemetry_goes_off_in_process_even_after_flower_read_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """What `fedrelapse` (main) and simulate() call: Flower reads the variable once, at import."""
    import flwr.supercore.telemetry as telemetry

    from shared.flower_env import disable_flower_telemetry_here

    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")
    monkeypatch.setattr(telemetry, "FLWR_TELEMETRY_ENABLED", "1")
    disable_flower_telemetry_here()
    assert os.environ["FLWR_TELEMETRY_ENABLED"] == "0" and telemetry.FLWR_TELEMETRY_ENABLED == "0"
