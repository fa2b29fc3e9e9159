#!/usr/bin/env bash
# GPU check, from the repository root: synthesise data, time a bare PyTorch loop and Ray Data ingest, profile a
# step on the old and new data path, train `base` with plain Lightning and under Ray Train (bf16, MLflow off) on
# both paths, print one summary (bench/gpu_check.py).
#   GPU machine:  bench/gpu_wheels.sh on a machine with network (the wheels go to .whl/), then on the GPU machine
#                 bench/gpu_check.sh   (it needs CUDA torch and Lightning there; Ray comes from .whl/, MLflow unused)
#   CPU smoke:    GPU_CHECK_CPU=1 bench/gpu_check.sh   (tiny sizes, fp32, the GPU image's missing packages blocked)
# Env: GPU_CHECK_BUDGET_S (360: the whole script, wheels included, never runs longer), OUT (summary and log go
# there as gpu_check.json / gpu_check.log, else runs/gpu_check/summary.json and gpu_check.log). Arguments go to
# bench/gpu_check.py: --samples N, --world-preset low-noise, training overrides key=value (data.batch_size=64).
set -uo pipefail
start=$(date +%s)
budget=${GPU_CHECK_BUDGET_S:-360}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}  # ~/.ray/auth_token alone turns token auth on: say which
unset RAY_ADDRESS                                # a private local Ray, never a cluster that happens to be set
if [ -x .venv/bin/python ]; then
  py=.venv/bin/python
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
else  # the GPU image: its python3 plus the wheels that bench/gpu_wheels.sh prepared (stripped ray, pydantic, ...)
  py=python3
  if [ -d .whl ]; then
    timeout 120 $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || exit 1
    export GPU_CHECK_WHEELS_S=$(( $(date +%s) - start ))
  fi
  export PYTHONPATH=/tmp/site:$PWD
fi
args=()
if [ -n "${GPU_CHECK_CPU:-}" ]; then
  args+=(--cpu-smoke)
  if [ "${GPU_CHECK_BLOCK:-1}" = 1 ]; then  # the smoke run sees only what the GPU image has
    export PYTHONPATH=$PWD/bench/lean_env:$PYTHONPATH HEIMDALL_BLOCK_LOG=$PWD/runs/gpu_check/blocked.log
    mkdir -p runs/gpu_check && : > "$HEIMDALL_BLOCK_LOG"
  fi
fi
out=${OUT:-runs/gpu_check}
mkdir -p "$out"
export GPU_CHECK_SESSION_FILE=$(mktemp)               # where it names its local Ray's session
# The grep drops Ray Train's once-a-second warning that its placement-group cleaner finds no state API
# (no ray[default]); the controller itself releases the placement group when training ends.
timeout -k 15 $(( budget - 15 - ($(date +%s) - start) )) $py bench/gpu_check.py "${args[@]}" "$@" 2>&1 \
  | grep --line-buffered -v 'Failed to query Ray Train Controller actor state' | tee "$out/gpu_check.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "gpu_check: stopped at the ${budget} s budget; partial summary in $out"
# Normally ray.shutdown() has stopped it; after a SIGKILL, stop this check's own Ray (its session's processes
# and their children) and nothing else.
session=$(cat "$GPU_CHECK_SESSION_FILE"); rm -f "$GPU_CHECK_SESSION_FILE"
for _ in 1 2 3 4 5 6 7 8 9 10; do [ -n "$session" ] && pgrep -f -- "$session" > /dev/null && sleep 1; done
if [ -n "$session" ] && pids=$(pgrep -f -- "$session"); then
  echo "stopping the local Ray left by gpu_check.py ($session)"
  for p in $pids; do kill $(pgrep -P "$p") "$p" 2>/dev/null; done
fi
if [ -n "${HEIMDALL_BLOCK_LOG:-}" ]; then
  echo "import blocker active in $(grep -c ' active ' "$HEIMDALL_BLOCK_LOG") processes; lookups of absent packages:"
  grep ' absent ' "$HEIMDALL_BLOCK_LOG" | cut -d' ' -f2- | sort | uniq -c
fi
exit "$rc"
