#!/usr/bin/env bash
# Create .venv with the exact pinned versions (requirements.lock) and this package, editable.
# Idempotent: skips pip when the lock file has not changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.heimdall-lock.sha256
want=$(sha256sum requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing pinned dependencies into .venv (first time: a few minutes)"
  start=$(date +%s)
  quiet() { grep -v "^WARNING: Location .* is ignored" || true; }  # this host's pip config is chatty
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.lock 2>&1 | quiet
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e . 2>&1 | quiet
  echo "$want" > "$stamp"
  echo "setup: done in $(( $(date +%s) - start )) s"
fi
