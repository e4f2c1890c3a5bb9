"""Make `import torchaudio` work on CPU-only torch when the wheel's CUDA extension cannot load.

torchaudio treats a missing extension library as "not built" and falls back to its
pure-PyTorch code, which is all fedrelapse uses. Run by deploy/setup.sh after installing.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path


def main() -> int:
    probe = subprocess.run([sys.executable, "-c", "import torchaudio"], capture_output=True, text=True)
    if probe.returncode == 0:
        return 0
    if "libc10_cuda" not in probe.stderr and "Could not load this library" not in probe.stderr:
        sys.stderr.write(probe.stderr)
        return 1
    spec = importlib.util.find_spec("torchaudio")
    assert spec is not None and spec.origin is not None  # noqa: S101 - installed just before
    lib = Path(spec.origin).parent / "lib"
    for so in sorted(lib.glob("*.so")):
        so.unlink()
        print(f"torchaudio: removed {so.name} (CUDA extension, unusable with CPU-only torch)")
    return subprocess.run([sys.executable, "-c", "import torchaudio"]).returncode


if __name__ == "__main__":
    raise SystemExit(main())
