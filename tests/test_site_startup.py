"""A fresh site process (one per message on the Deployment Engine) imports only what it needs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_clientapp_process_that_does_not_train_never_imports_opacus_or_scipy_stats() -> None:
    code = "import sys, client.app; print(sorted(m for m in ('opacus', 'scipy.stats') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_train_handler_loads_the_training_code_before_its_compute_clock() -> None:
    code = "import sys, client.app; client.app._import_training(); print('opacus' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True", out.stdout + out.stderr
