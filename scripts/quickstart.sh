#!/usr/bin/env bash
# The main job on embedded defaults: set up, then `heimdall pipeline`: synthesise a small low-noise
# dataset (if missing), run a Ray Tune sweep of Ray Train runs on a private local Ray, export the best
# model to ONNX (validated against PyTorch), store it under runs/models and register it in the local
# MLflow store (sqlite:///mlflow.db). Extra key=value arguments override the pipeline's config.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source .venv/bin/activate
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"  # one explicit mode (Ray 2.60 switches on a token if one exists)
heimdall pipeline "$@"
