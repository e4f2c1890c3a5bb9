"""Docker cannot run here: check statically what the images and compose file name exists."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import yaml
from typer.testing import CliRunner

from server.cli import app
from tests.conftest import ROOT

DOCKER = ROOT / "deploy" / "docker"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


SITES = {"oslo", "bergen", "london"}


def test_compose_parses_and_every_build_names_an_existing_dockerfile() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert set(compose["services"]) == {"coordinator", "register-sites"} | SITES
    for name, svc in compose["services"].items():
        context = (DOCKER / svc["build"]["context"]).resolve()
        assert context == ROOT, name
        assert (context / svc["build"]["dockerfile"]).is_file(), name
        if name in SITES:
            assert "coordinator" in svc["depends_on"]
            assert any(v.endswith(":/consortium/ca.pem:ro") for v in svc["volumes"])


def test_each_site_gets_only_its_own_node_key_and_starts_after_its_key_is_registered() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    for name in SITES:
        svc = compose["services"][name]
        keys = [v for v in svc["volumes"] if v.startswith("./keys")]
        assert sorted(keys) == sorted([
            "./keys/ca/ca.pem:/consortium/ca.pem:ro", f"./keys/sites/{name}/node.key:/consortium/node.key:ro",
            "./keys/server/model-signing.pub.pem:/consortium/model-signing.pub.pem:ro",  # public: sites verify every global model
        ]), name
        assert svc["depends_on"]["register-sites"] == {"condition": "service_completed_successfully"}
    register = compose["services"]["register-sites"]
    script = register["entrypoint"][-1]
    assert script.startswith("for s in ") and set(script.split(";")[0].split()[3:]) == SITES
    help_text = CliRunner().invoke(app, ["server", "register-site", "--help"], terminal_width=200).output
    assert "fedrelapse server register-site $$s --keys /keys --superlink coordinator:9092" in script
    assert "--keys" in help_text and "--superlink" in help_text
    assert register["depends_on"]["coordinator"] == {"condition": "service_healthy"} and register["restart"] == "no"
    coordinator = json.loads(next(v for k, v in instructions(DOCKER / "coordinator.Dockerfile") if k == "ENTRYPOINT"))
    assert "--no-node-auth" not in coordinator and "--insecure" not in coordinator  # node auth stays on
    site = json.loads(next(v for k, v in instructions(DOCKER / "site.Dockerfile") if k == "ENTRYPOINT"))
    assert site[site.index("--node-key") + 1] == "/consortium/node.key" and site[site.index("--ca") + 1] == "/consortium/ca.pem"


def test_images_are_pinned_non_root_with_health_checks_and_copy_existing_paths() -> None:
    for dockerfile in (DOCKER / "coordinator.Dockerfile", DOCKER / "site.Dockerfile"):
        ins = instructions(dockerfile)
        kinds = [k for k, _ in ins]
        base = next(v for k, v in ins if k == "FROM")
        assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base  # pinned patch version
        assert "USER" in kinds and next(v for k, v in ins if k == "USER") != "root"
        assert "HEALTHCHECK" in kinds
        for k, v in ins:
            if k == "COPY":
                assert (ROOT / v.split()[0]).exists(), (dockerfile.name, v)
        assert "requirements.lock" in " ".join(v for k, v in ins if k == "RUN")


def test_entry_points_and_flags_exist_in_the_cli() -> None:
    runner = CliRunner()
    for dockerfile in (DOCKER / "coordinator.Dockerfile", DOCKER / "site.Dockerfile"):
        ins = instructions(dockerfile)
        argv = json.loads(next(v for k, v in ins if k == "ENTRYPOINT"))
        cmd = json.loads(next((v for k, v in ins if k == "CMD"), "[]"))
        assert argv[0] == "fedrelapse"
        sub = [a for a in argv[1:3]]
        help_text = runner.invoke(app, [*sub, "--help"], terminal_width=200).output
        for flag in [a for a in argv[3:] + cmd if a.startswith("--")]:
            assert flag in help_text, (dockerfile.name, flag)
        exposed = next(v for k, v in ins if k == "EXPOSE")
        assert exposed in " ".join(argv) or exposed in next(v for k, v in ins if k == "HEALTHCHECK")


def test_site_image_never_installs_the_gpl_synthesiser() -> None:
    run = " ".join(v for k, v in instructions(DOCKER / "site.Dockerfile") if k == "RUN")
    assert "grep -v '^espeakng-loader=='" in run


def test_the_coordinator_key_synth_names_in_site_yaml_is_mounted_where_it_resolves_in_a_site_container() -> None:
    from shared.synth import cohort

    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    named = re.search(r'"coordinator_public_key": "([^"]+)"', Path(cohort.__file__).read_text())
    assert named is not None
    in_container = (Path("/site") / named.group(1)).resolve()  # site.yaml is /site/site.yaml in the container
    for name in SITES:
        mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"][name]["volumes"]}
        assert mounts[str(in_container)] == "./keys/server/model-signing.pub.pem", name


# --- What goes into the images (the build context) and what each container sees (its mounts).
# Docker reads `.dockerignore` at the root of the build context (the repository root for both
# Dockerfiles); a `<Dockerfile>.dockerignore` beside a Dockerfile would replace it. The
# functions below follow moby/patternmatcher (MatchesOrParentMatches), which both the classic
# builder and BuildKit use: the last pattern matching a path or one of its parent folders wins.


def dockerignore_patterns(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, regex) per pattern line, in order; as patternmatcher compiles them."""
    patterns = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = os.path.normpath(line[1:].strip() if exception else line).lstrip("/") or "."
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                i += 2
                if pattern.startswith("/", i):
                    i += 1
                regex += ".*" if i == len(pattern) else "(.*/)?"
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((exception, re.compile(f"^{regex}$")))
    return patterns


def ignored(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = path.split("/")
    candidates = [path] + ["/".join(parts[: i + 1]) for i in range(len(parts) - 1)]
    matched = False
    for exception, regex in patterns:
        if exception != matched:  # an exception can only undo a match, a pattern only make one
            continue
        if any(regex.match(c) for c in candidates):
            matched = not exception
    return matched


def repository_files() -> set[str]:
    found = set()
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in {".git", ".venv"}]
        found |= {os.path.relpath(os.path.join(folder, f), ROOT).replace(os.sep, "/") for f in files}
    return found


def planted_secrets(tmp_path: Path) -> set[str]:
    """Every key `fedrelapse keys` writes, where the compose header and the runbooks put them,
    and site data (recordings, transcripts, state/ with ledger key and noise seed) likewise."""
    from server.keys import make_ca, make_server, make_site

    keys = tmp_path / "keys"
    make_ca(keys)
    make_server(keys, hosts=("coordinator", "localhost", "127.0.0.1"))
    for name in SITES:
        make_site(keys, name)
    layout = {p.relative_to(keys).as_posix() for p in keys.rglob("*") if p.is_file()} | {"sites/oslo/node.key.retired-20261126T010203Z"}
    site = ["site.yaml", "manifest.csv", "audio/p0001-s01.wav", "transcripts/p0001-s01.txt", "state/noise-seed.key",
            "state/keys/ledger-ed25519.pem", "state/keys/ledger-ed25519.pub.pem", "state/ledger.jsonl", "state/features/x.npz"]
    return (
        {f"deploy/docker/keys/{f}" for f in layout} | {f"keys/{f}" for f in layout}  # the compose demo; the runbooks' `--keys keys`
        | {f"deploy/docker/data/{s}/{f}" for s in SITES for f in site} | {f"demo/oslo/{f}" for f in site}
        | {"runs/deployment/summary.json", "configs/oslo/state/noise-seed.key", "configs/oslo/node.key", "server/node.key.retired-x",
           "client/state/keys/ledger-ed25519.pem", ".venv/bin/python", ".git/config"}
    )


def copied_into(dockerfile: Path, context: set[str]) -> set[str]:
    """The files the Dockerfile's COPY instructions take from ``context``; every source must exist there."""
    out = set()
    for kind, value in instructions(dockerfile):
        if kind != "COPY":
            continue
        *sources, _dest = value.split()
        for src in sources:
            got = {f for f in context if f == src or f.startswith(src.rstrip("/") + "/")}
            assert got, f"{dockerfile.name}: COPY {src} finds nothing in the build context"
            out |= got
    return out


def test_the_build_context_holds_no_key_or_site_data_and_the_images_get_the_code_they_run(tmp_path: Path) -> None:
    secrets = planted_secrets(tmp_path)
    ignore = ROOT / ".dockerignore"
    patterns = dockerignore_patterns(ignore.read_text()) if ignore.is_file() else []

    context = {f for f in repository_files() | secrets if not ignored(f, patterns)}

    assert not list(DOCKER.glob("*.dockerignore")) and not list(DOCKER.glob("*Dockerfile.dockerignore"))  # would replace the root one
    assert not context & secrets, sorted(context & secrets)[:8]
    assert not {f for f in context if re.search(r"\.(key|pem)($|\.)|(^|/)(state|keys|data)/", f)}
    for dockerfile in (DOCKER / "coordinator.Dockerfile", DOCKER / "site.Dockerfile"):
        image = copied_into(dockerfile, context)
        for needed in ("pyproject.toml", "README.md", "server/cli.py", "client/app.py", "shared/signing.py", "configs/experiment.yaml",
                       "deploy/requirements.lock", "deploy/torchaudio_compat.py"):
            assert needed in image, (dockerfile.name, needed)
        assert not {f for f in image if f.startswith("deploy/docker/")}, dockerfile.name
    assert "deploy/flower-app/pyproject.toml" in copied_into(DOCKER / "coordinator.Dockerfile", context)


def key_mounts(svc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host path under the compose folder, container path, mode) of each ./keys volume."""
    out = []
    for volume in svc.get("volumes", []):
        host, container, *mode = volume.split(":")
        if host.startswith("./keys"):
            out.append((host, container, mode[0] if mode else "rw"))
    return out


def container_view(svc: dict[str, Any], compose_dir: Path, root: Path) -> dict[str, Path]:
    """What a service sees of the keys: container path → host file, built under ``root``
    as copies (so the CLI's own checks can run on it)."""
    seen: dict[str, Path] = {}
    for host, container, mode in key_mounts(svc):
        source = compose_dir / host
        assert source.exists(), f"{host} does not exist after the compose header's commands (Docker would mount an empty folder)"
        assert mode == "ro", f"{host} is mounted {mode}"
        files = [source] if source.is_file() else [p for p in source.rglob("*") if p.is_file()]
        for f in files:
            inside = container if f == source else f"{container}/{f.relative_to(source).as_posix()}"
            seen[inside] = f
            target = root / inside.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
    return seen


def test_compose_mounts_each_container_only_the_keys_it_uses_and_never_the_ca_key(tmp_path: Path) -> None:
    from server.deployment import superlink_argv
    from server.keys import make_ca, make_server, make_site

    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    demo = tmp_path / "docker"  # stands in for deploy/docker after the commands at the top of compose.yaml
    make_ca(demo / "keys")
    make_server(demo / "keys", hosts=("coordinator", "localhost", "127.0.0.1"))
    for name in SITES:
        make_site(demo / "keys", name)
    private = {p for p in (demo / "keys").rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()}
    assert demo / "keys" / "ca" / "ca.key" in private and len(private) == 3 + len(SITES)

    views = {name: container_view(svc, demo, tmp_path / "containers" / name) for name, svc in compose["services"].items()}
    private_seen = {name: {f.relative_to(demo / "keys").as_posix() for f in view.values() if f in private} for name, view in views.items()}

    assert private_seen["coordinator"] == {"server/server.key", "server/model-signing.key"}  # its own keys only
    assert private_seen["register-sites"] == set()
    for name in SITES:
        assert private_seen[name] == {f"sites/{name}/node.key"}
    coordinator_keys = tmp_path / "containers" / "coordinator" / "keys"
    superlink_argv(keys=coordinator_keys, host="0.0.0.0", port=9092)  # raises if server start would miss a file
    assert "/keys/ca/ca.pem" in views["coordinator"]  # its health check
    for name in SITES:
        assert (tmp_path / "containers" / "register-sites" / "keys" / "sites" / name / "node.pub").is_file()
    assert (tmp_path / "containers" / "register-sites" / "keys" / "ca" / "ca.pem").is_file()
    for name, svc in compose["services"].items():
        data = [v.split(":")[0] for v in svc.get("volumes", []) if v.startswith("./data")]
        assert data == ([f"./data/{name}"] if name in SITES else []), name  # a site sees its own folder only
