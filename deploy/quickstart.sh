#!/usr/bin/env bash
# README command 1: set up, synthesise a 3-hospital cohort, run a federated DP simulation.
# Usage: bash deploy/quickstart.sh [RUN_FOLDER]
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
FR=.venv/bin/fedrelapse
RUN=${1:-runs/demo-$(date -u +%Y%m%dT%H%M%SZ)}
if [ ! -f demo/cohort/.complete ]; then
  "$FR" synth --config configs/cohort.yaml --out demo/cohort
  touch demo/cohort/.complete
fi
"$FR" simulate --config configs/experiment.yaml --data demo/cohort --out "$RUN" --centralised
