"""Make the offline bundle `fedrelapse bench gpu` needs on a GPU machine that has no registry.

GPU machines (a hospital's, or a lent benchmark box) often have a CUDA build of torch and the
usual scientific stack but no network. This gathers, on a machine that has one:

* ``wheels/``: the pinned (deploy/requirements.lock) wheels of what such an image usually
  lacks, for the target Python, with Ray repacked without the parts Flower's simulation never
  loads (Java jars, RLlib, data, serve, tune, train, llm, the dashboard's web frontend), which
  halves it (73.8 → 35.0 MB for 2.55.1, cp312);
* ``cohort/``: a small synthetic cohort (3 hospitals × 12 patients × 6 sessions of 4 s, 8 kHz,
  FLAC; about 10 MB) and ``round.yaml``, the experiment for its simulated rounds.

Then, on the GPU machine: ``bash deploy/gpu-bench.sh <bundle> <out>``. Used for the H200
figures in BENCHMARKS.md (section GPU).

    python deploy/gpu_bundle.py --out gpu-bundle [--python 3.12]
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "deploy" / "requirements.lock"
# What a CUDA image with torch, transformers and the scientific stack usually lacks (checked
# against the lent H200 image, November 2026): flwr and the dependencies it imports, Ray,
# Opacus, cryptography, soundfile.
MISSING_ON_GPU_IMAGES = (
    "flwr", "ray", "opacus", "cryptography", "cffi", "pycparser", "soundfile", "pycryptodome", "iterators", "tomli", "tomli-w",
    "grpcio-health-checking", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py", "sqlalchemy", "alembic", "mako",
    "fastapi", "starlette", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
)
RAY_UNUSED = ("ray/jars/", "ray/rllib/", "ray/data/", "ray/serve/", "ray/tune/", "ray/train/", "ray/llm/", "ray/dashboard/client/")
# In pip's order of preference: glibc 2.28 builds first (they ran on the lent H200 image), older after.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(names: tuple[str, ...] = MISSING_ON_GPU_IMAGES, lock: Path = LOCK) -> list[str]:
    """``name==version`` for each of ``names`` as deploy/requirements.lock pins it."""
    pins = {}
    for line in lock.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if m:
            pins[_norm(m.group(1))] = m.group(2)
    missing = [n for n in names if _norm(n) not in pins]
    if missing:
        raise SystemExit(f"{lock}: no pin for {', '.join(missing)}; run deploy/setup.sh to re-resolve the lock, or drop them from MISSING_ON_GPU_IMAGES.")
    return [f"{n}=={pins[_norm(n)]}" for n in names]


def strip_wheel(src: Path, dst: Path, drop: tuple[str, ...] = RAY_UNUSED) -> tuple[int, int]:
    """Copy wheel ``src`` to ``dst`` without the files under ``drop`` (also out of its RECORD);
    returns (files kept, files dropped). File modes (the executables') are kept."""
    kept = dropped = 0
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        for info in zin.infolist():
            if info.filename.startswith(drop):
                dropped += 1
                continue
            data = zin.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                rows = [r for r in csv.reader(io.StringIO(data.decode())) if r and not r[0].startswith(drop)]
                buf = io.StringIO()
                csv.writer(buf, lineterminator="\n").writerows(rows)
                data = buf.getvalue().encode()
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
            kept += 1
    return kept, dropped


def download(out: Path, *, python: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python,
                    "--implementation", "cp", *platforms, "-d", str(out), *pinned()], check=True)
    for ray in out.glob("ray-*.whl"):
        full = ray.with_suffix(".full")
        ray.rename(full)
        kept, dropped = strip_wheel(full, ray)
        full.unlink()
        print(f"{ray.name}: kept {kept} files, dropped {dropped} ({', '.join(RAY_UNUSED)})")


def make_cohort(out: Path) -> None:
    """The small FLAC cohort and round.yaml (needs the `synth` extra: espeak-ng)."""
    from dataclasses import replace

    import soundfile as sf
    import yaml

    from server.bench_fl import quick_cohort_config
    from shared.synth.cohort import synthesize_cohort
    from shared.synth.config import HospitalSpec

    cfg = quick_cohort_config()
    hospitals = tuple(HospitalSpec(name=n, language=lang, sample_rate=8000, noise_snr_db=snr, n_patients=12, relapse_prevalence=0.5)
                      for n, lang, snr in (("alpha", "nb", 30), ("beta", "nb", 20), ("gamma", "en", 25)))
    synthesize_cohort(replace(cfg, hospitals=hospitals, trajectory=replace(cfg.trajectory, sessions_per_patient=6)), out / "cohort", seed=3, workers=1)
    for manifest in (out / "cohort").glob("*/manifest.csv"):
        for wav in (manifest.parent / "audio").glob("*.wav"):
            audio, rate = sf.read(wav, dtype="int16")
            sf.write(wav.with_suffix(".flac"), audio, rate, format="FLAC", subtype="PCM_16")
            wav.unlink()
        manifest.write_text(manifest.read_text().replace(".wav,", ".flac,"))
    exp = yaml.safe_load((ROOT / "configs" / "experiment.yaml").read_text())
    exp["name"] = "gpu-bench-round"
    exp["federation"].update(min_patients_metric=2)
    exp["training"].update(batch_patients=4)
    exp["features"].update(max_seconds=4.0, baseline_sessions=2)
    exp["language"].update(encoder="lsa")  # the bundled MiniLM weights (88 MB) stay behind; LSA is fitted at each site
    (out / "round.yaml").write_text("# `bench gpu` rounds on the bundle's cohort: 4-s sessions, 12 patients a site, LSA language markers.\n"
                                    + yaml.safe_dump(exp, sort_keys=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="bundle folder (wheels/, cohort/, round.yaml)")
    ap.add_argument("--python", default="3.12", help="the GPU machine's Python (major.minor)")
    args = ap.parse_args()
    download(args.out / "wheels", python=args.python)
    make_cohort(args.out)
    print(f"bundle ready in {args.out}; on the GPU machine: bash deploy/gpu-bench.sh {args.out} <out>")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
