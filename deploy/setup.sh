#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv at .venv with the pinned dependencies.
# No root, no apt: everything comes from the package index (or its local mirror).
# Usage: bash deploy/setup.sh            (idempotent; re-run after pulling a new lock)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then  # asked for explicitly: use it or stop, never another interpreter
  PY=$PYTHON
  if ! command -v "$PY" >/dev/null; then
    echo "deploy/setup.sh: PYTHON=$PY is not an executable on PATH; set PYTHON to a Python 3.11 interpreter (e.g. PYTHON=/usr/bin/python3.11) or unset it to use python3.11 (or python3)." >&2
    exit 1
  fi
else
  PY=python3.11
  command -v "$PY" >/dev/null || PY=python3
fi
VENV=${FEDRELAPSE_VENV:-.venv}
LOCK=deploy/requirements.lock
STAMP="$VENV/.fedrelapse-lock.sha256"
want=$(sha256sum "$LOCK" pyproject.toml | sha256sum | cut -c1-64)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$LOCK" 2> >(grep -v "is ignored: it is neither" >&2)
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e . 2> >(grep -v "is ignored: it is neither" >&2)
# PyPI's torchaudio 2.11 wheel is a CUDA build whose optional C++ extension needs
# libc10_cuda; with a CPU-only torch it fails to load and takes `import torchaudio` with it.
# We use only torchaudio's pure-PyTorch transforms (MelSpectrogram, Resample), which work
# without the extension, so drop it when (and only when) it cannot load.
"$VENV/bin/python" deploy/torchaudio_compat.py
echo "$want" > "$STAMP"
