#!/usr/bin/env bash
# The main job on embedded defaults: set up, synthesise a small low-noise dataset (if missing),
# train the tiny model on this machine without Ray, print the test table beside the physics baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source .venv/bin/activate
[ -f data/quick/manifest.json ] || heimdall data synth --out data/quick --samples 12000 --iq-length 512 \
  --world-preset low-noise --workers "$(nproc)"
heimdall fit --config configs/quick.yaml "$@"
