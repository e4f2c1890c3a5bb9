"""Package boundaries: GPL espeak-ng only in `synth`; shared/ never imports server/ or client/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

RUNTIME = ["client.app", "client.site", "client.prepare", "server.app", "server.federation", "server.simulate", "server.deployment", "server.cli"]


def test_site_and_coordinator_runtime_never_load_espeak() -> None:
    code = "import sys\n" + "".join(f"import {m}\n" for m in RUNTIME) + "print(sorted(m for m in sys.modules if 'espeak' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_shared_imports_neither_server_nor_client() -> None:
    offenders = []
    for path in (ROOT / "shared").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("server", "client")]
    assert offenders == []


def test_no_hub_downloads_in_code() -> None:
    hits = []
    for path in [*Path(ROOT / "server").rglob("*.py"), *Path(ROOT / "client").rglob("*.py"), *Path(ROOT / "shared").rglob("*.py")]:
        text = path.read_text()
        if "hf_hub_download" in text or "snapshot_download" in text:
            hits.append(str(path))
    assert hits == []
