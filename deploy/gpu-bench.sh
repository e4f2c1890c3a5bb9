#!/bin/bash
# `fedrelapse bench gpu` on an offline GPU machine, from a bundle made by deploy/gpu_bundle.py.
#   bash deploy/gpu-bench.sh <bundle> <out>
# Installs the bundle's wheels into a private folder (nothing system-wide), checks that a DP
# update on the GPU equals the CPU's, then measures: DP vs plain steps at 8 and 128 patients
# (fp32, bf16 autocast, and on this machine's CPU) with a simulated round of 4 sites sharing
# the GPU beside CPU sites; then 512 and 1024 patients. Each part is written as it finishes
# (<out>/gpu_*.json), so a run cut short keeps what it measured.
set -u
bundle=${1:?usage: bash deploy/gpu-bench.sh <bundle> <out>}
out=${2:?usage: bash deploy/gpu-bench.sh <bundle> <out>}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi > "$out/nvidia-smi.txt" 2>&1
site=${FEDRELAPSE_GPU_SITE:-/tmp/fedrelapse-gpu-site}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$bundle"/wheels/*.whl > "$out/pip.log" 2>&1 \
  || { echo "installing the bundle's wheels failed; see $out/pip.log" >&2; exit 1; }
export PYTHONPATH="$site:$PWD"
python3 -c "import flwr, opacus, ray, torch; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'; print('GPU', torch.cuda.get_device_name(0), 'torch', torch.__version__)" || exit 1
python3 -m pytest -q -p no:cacheprovider tests/test_dp_patient_level.py -k gpu 2>&1 | tail -3 | tee "$out/gpu_tests.log"
python3 -m server.cli bench gpu --out "$out/run-b8-128" --batches 8,128 --data "$bundle/cohort" --round-config "$bundle/round.yaml" 2>&1 >/dev/null | grep -v "^\s*plan:" | tee "$out/bench-b8-128.log"
cp "$out/run-b8-128/gpu.json" "$out/gpu_b8_128.json" 2>/dev/null
python3 -m server.cli bench gpu --out "$out/run-b512-1024" --batches 512,1024 2>&1 >/dev/null | tee "$out/bench-b512-1024.log"
cp "$out/run-b512-1024/gpu.json" "$out/gpu_b512_1024.json" 2>/dev/null
