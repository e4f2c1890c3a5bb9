"""deploy/setup.sh: an interpreter asked for explicitly is used or the script stops, never swapped."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import ROOT


def test_an_explicit_python_that_does_not_exist_stops_setup_with_a_sentence(tmp_path: Path) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for name in ("python3", "python3.11"):  # a fallback would run one of these: it only says so
        (fake_bin / name).write_text("#!/bin/sh\necho FALLBACK-INTERPRETER-USED\nexit 1\n")
        (fake_bin / name).chmod(0o755)
    env = {"PATH": f"{fake_bin}{os.pathsep}/usr/bin{os.pathsep}/bin", "PYTHON": "/nonexistent/python3.11", "FEDRELAPSE_VENV": str(tmp_path / "venv")}

    done = subprocess.run(["bash", str(ROOT / "deploy" / "setup.sh")], capture_output=True, text=True, env=env, timeout=60, check=False)

    assert done.returncode != 0
    assert "FALLBACK-INTERPRETER-USED" not in done.stdout + done.stderr
    assert "PYTHON=/nonexistent/python3.11" in done.stderr and "unset it" in done.stderr
    assert not (tmp_path / "venv").exists()
