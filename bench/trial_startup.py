"""Per-trial start-up in a sweep: FIFO sweeps of --trials trials x 2 epochs, one trial at a time
(2 CPUs), each in a fresh process with its own local Ray. Reports the sweep's `trial_startup_s`
(a trial's first report less one epoch, median over its trials) and its wall-clock per trial.

With --compare OLD_TREE (another checkout of this repository, e.g. `git worktree add /tmp/old REV`)
the same sweep runs on both trees, interleaved, and the medians are printed side by side.
Usage: python bench/trial_startup.py [--trials 4] [--repeats 2] [--compare /tmp/old]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def one_sweep(out: Path, data: Path, trials: int) -> dict:
    from heimdall.config import TuneConfig
    from launch.tune import tune_sweep

    for stale in ("sweep", "ray", "mlflow.db"):
        p = out / stale
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    config = TuneConfig.model_validate({
        "data": {"uri": str(data), "normalization_samples": 512}, "model": {"size": "tiny"},
        "trainer": {"max_epochs": 2, "patience": 2, "out_dir": str(out / "sweep"), "progress": False},
        "run": {"storage_path": str(out / "ray")}, "mlflow": {"tracking_uri": f"sqlite:///{out}/mlflow.db"},
        "tune": {"name": "startup", "num_samples": trials, "scheduler": "fifo", "seed": 0,
                 "space": {"optim.lr": {"loguniform": [1.0e-4, 1.0e-2]}}}})
    start = time.monotonic()
    summary = tune_sweep(config, log=lambda *_: None).summary
    return {"trial_startup_s": summary["trial_startup_s"], "wall_per_trial_s": (time.monotonic() - start) / trials}


def run_in(tree: Path, out: Path, data: Path, trials: int) -> dict:
    """A sweep in a fresh process importing `tree`'s code (this script's copy of the measurement)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "RAY_ADDRESS": ""}
    done = subprocess.run([sys.executable, str(HERE), "--one", str(out), "--data", str(data), "--trials", str(trials)],
                          env=env, capture_output=True, text=True, timeout=1800, cwd=tree)
    if done.returncode != 0:
        raise RuntimeError(f"sweep in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--compare", help="another checkout: its sweeps run interleaved with this tree's")
    p.add_argument("--out", default="runs/bench-trial-startup")
    p.add_argument("--data")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one_sweep(Path(args.one), Path(args.data), args.trials)))
        return
    from heimdall.data.synth import SynthSpec, synthesize
    from launch.cli import WORLD_PRESETS

    out = Path(args.out).resolve()
    data = out / "data"
    if not (data / "manifest.json").exists():
        synthesize(SynthSpec(out=str(data), samples=1500, seed=2, iq_length=256, world=WORLD_PRESETS["low-noise"]))
    trees = {"this tree": HERE.parents[1], **({"compared": Path(args.compare).resolve()} if args.compare else {})}
    results: dict[str, list[dict]] = {name: [] for name in trees}
    for i in range(args.repeats):
        for name in (list(trees) if i % 2 == 0 else list(trees)[::-1]):  # interleaved: drift hits both
            results[name].append(run_in(trees[name], out / name.replace(" ", "-"), data, args.trials))
            print(f"repeat {i + 1} {name}: {results[name][-1]}", flush=True)
    for name, runs in results.items():
        print(f"{name} ({trees[name]}): trial start-up {statistics.median(r['trial_startup_s'] for r in runs):.1f} s, "
              f"wall per trial {statistics.median(r['wall_per_trial_s'] for r in runs):.1f} s "
              f"(medians of {args.repeats} sweeps of {args.trials} trials x 2 epochs)")


if __name__ == "__main__":
    main()
