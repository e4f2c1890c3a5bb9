"""deploy/gpu_bundle.py and deploy/gpu-bench.sh: the offline bundle for `bench gpu` (no GPU needed here)."""

from __future__ import annotations

import importlib.util
import stat
import subprocess
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("gpu_bundle", ROOT / "deploy" / "gpu_bundle.py")
assert spec and spec.loader
gpu_bundle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_bundle)


def test_every_bundled_package_is_pinned_by_the_lock() -> None:
    pins = gpu_bundle.pinned()
    assert len(pins) == len(gpu_bundle.MISSING_ON_GPU_IMAGES) and all("==" in p for p in pins)
    assert any(p.startswith("flwr==1.42") for p in pins)


def test_a_package_the_lock_does_not_pin_is_refused_by_name(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text("flwr==1.42.0\n")
    with pytest.raises(SystemExit, match=r"no pin for ray.*deploy/setup.sh"):
        gpu_bundle.pinned(("flwr", "ray"), lock=lock)


def test_the_ray_repack_drops_unused_parts_from_files_and_record_and_keeps_executables(tmp_path: Path) -> None:
    src, dst = tmp_path / "ray-1.0-cp312-cp312-linux_x86_64.whl", tmp_path / "out.whl"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("ray/__init__.py", "")
        z.writestr("ray/jars/ray_dist.jar", b"x" * 100)
        z.writestr("ray/rllib/algo.py", "")
        exe = zipfile.ZipInfo("ray/core/src/ray/raylet/raylet")
        exe.external_attr = (stat.S_IFREG | 0o755) << 16
        z.writestr(exe, b"\x7fELF")
        z.writestr("ray-1.0.dist-info/RECORD", "ray/__init__.py,,0\nray/jars/ray_dist.jar,sha256=a,100\nray/rllib/algo.py,,0\nray/core/src/ray/raylet/raylet,,4\n")
    assert gpu_bundle.strip_wheel(src, dst) == (3, 2)
    with zipfile.ZipFile(dst) as z:
        assert sorted(z.namelist()) == ["ray-1.0.dist-info/RECORD", "ray/__init__.py", "ray/core/src/ray/raylet/raylet"]
        assert z.read("ray-1.0.dist-info/RECORD").decode().splitlines() == ["ray/__init__.py,,0", "ray/core/src/ray/raylet/raylet,,4"]
        assert (z.getinfo("ray/core/src/ray/raylet/raylet").external_attr >> 16) & 0o111  # still executable


def test_the_gpu_bench_script_parses_and_names_options_the_cli_has() -> None:
    script = ROOT / "deploy" / "gpu-bench.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    from typer.testing import CliRunner

    from server.cli import app

    helptext = CliRunner().invoke(app, ["bench", "gpu", "--help"], terminal_width=200).output
    for option in ("--batches", "--round-config", "--data", "--out"):
        assert option in text and option in helptext
    assert (ROOT / "tests" / "test_dp_patient_level.py").exists() and "-k gpu" in text
