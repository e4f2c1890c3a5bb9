"""Docker cannot run here: check statically what the images and compose file name exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

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
