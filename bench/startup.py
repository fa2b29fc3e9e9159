"""Start-up: seconds from command to the first training step, `heimdall train` (tiny, 1 worker)
beside a minimal bare TorchTrainer (bench/bare_trainer.py) started the same way (a fresh process
that starts its own local Ray). Paired runs, alternating order; medians.
Target: the launcher's own overhead (median of paired differences) at most 5 s.
Usage: python bench/startup.py [--pairs 5] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from launch.cli import WORLD_PRESETS
from heimdall.data.synth import SynthSpec, synthesize

HERE = Path(__file__).resolve().parent


def first_step_seconds(cmd: list[str]) -> float:
    start = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HEIMDALL_MARK_FIRST_STEP": "1", "RAY_ADDRESS": ""})
    found = re.search(r"HEIMDALL_FIRST_STEP (\d+\.\d+)", out.stdout + out.stderr)
    if out.returncode != 0 or not found:
        raise RuntimeError(f"{cmd[:3]} failed:\n{out.stderr[-3000:]}")
    return float(found.group(1)) - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--out", default="runs/bench-startup")
    args = p.parse_args()
    out = Path(args.out).resolve()
    data = out / "data"
    if not (data / "manifest.json").exists():
        synthesize(SynthSpec(out=str(data), samples=1500, seed=2, iq_length=256, world=WORLD_PRESETS["low-noise"]))
    for stale in (out / "ray", out / "fit", out / "mlflow.db"):  # fresh runs: a finished run would only resume
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    heimdall = str(Path(sys.executable).with_name("heimdall"))
    launcher, bare = [], []
    for i in range(args.pairs):
        cmds = {
            "launcher": [heimdall, "train", f"data.uri={data}", "model.size=tiny", "trainer.max_epochs=1",
                         f"run.name=startup-{i}", f"run.storage_path={out / 'ray'}", f"trainer.out_dir={out / 'fit'}",
                         f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db", "ray.cpus_per_worker=1"],
            "bare": [sys.executable, str(HERE / "bare_trainer.py"), str(data), str(out / "ray")],
        }
        order = ["launcher", "bare"] if i % 2 == 0 else ["bare", "launcher"]
        for name in order:
            (launcher if name == "launcher" else bare).append(first_step_seconds(cmds[name]))
        print(f"pair {i + 1}: launcher {launcher[-1]:.1f} s, bare TorchTrainer {bare[-1]:.1f} s", flush=True)
    diffs = [a - b for a, b in zip(launcher, bare)]
    print(f"\ncommand -> first training step, median of {args.pairs}: launcher {statistics.median(launcher):.1f} s, "
          f"bare TorchTrainer {statistics.median(bare):.1f} s; launcher overhead (median paired difference) "
          f"{statistics.median(diffs):.1f} s (target < 5 s)")


if __name__ == "__main__":
    main()
