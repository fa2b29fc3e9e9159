"""ASHA vs FIFO: best validation metric, total trial-epochs and wall-clock of each, over repeats that
each draw their own configurations (search seed = repeat), the median of the per-repeat ratios.

Target (issue 19): ASHA's best within 5 % of FIFO's (ratio <= 1.05) with at most 0.30 of its
trial-epochs, on a sweep of at least 16 trials, median of 3 repeats.
Usage: python bench/tune_schedulers.py [--repeats 3] [--trials 16] [--epochs 24] [--grace 1] [--rf 8] [--first-seed 3]
The defaults are the documented run: grace 1 and reduction factor 8 were chosen by replaying the FIFO
sweeps of search seeds 0-2 through Ray's ASHA rule (bench/asha_replay.py), so the measured repeats
use seeds 3-5, which took no part in the choice.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from launch.cli import WORLD_PRESETS
from heimdall.config import TuneConfig
from heimdall.data.synth import SynthSpec, synthesize

SPACE = {"optim.lr": {"loguniform": [1.0e-5, 1.0e-2]}, "optim.weight_decay": {"loguniform": [1.0e-4, 1.0e-1]},
         "model.width": {"choice": [16, 32]}}


def sweep(args, out: Path, data: Path, sched: str, seed: int) -> dict:
    name = f"{sched}-{seed}"
    for stale in (out / name, out / "ray" / name, out / "ray" / f"{name}-trials"):
        shutil.rmtree(stale, ignore_errors=True)
    config = TuneConfig.model_validate({
        "data": {"uri": str(data), "normalization_samples": 512}, "model": {"size": "tiny"},
        "trainer": {"max_epochs": args.epochs, "patience": args.epochs, "out_dir": str(out / name), "progress": False},
        "run": {"storage_path": str(out / "ray")}, "mlflow": {"tracking_uri": f"sqlite:///{out}/mlflow.db"},
        "tune": {"name": name, "num_samples": args.trials, "scheduler": sched, "grace_period": args.grace,
                 "reduction_factor": args.rf, "seed": seed, "space": SPACE}})
    from launch.tune import tune_sweep

    start = time.monotonic()
    s = tune_sweep(config).summary
    return {"best": s["best_metric"], "trial_epochs": s["trial_epochs"], "wall_s": time.monotonic() - start}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--grace", type=int, default=1)
    p.add_argument("--rf", type=int, default=8)
    p.add_argument("--first-seed", type=int, default=3)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--out", default="runs/bench-tune")
    args = p.parse_args()
    out = Path(args.out).resolve()
    data = out / f"data-{args.samples}"
    if not (data / "manifest.json").exists():
        synthesize(SynthSpec(out=str(data), samples=args.samples, seed=13, iq_length=256,
                             world=WORLD_PRESETS["low-noise"]), workers=2)
    result = out / f"schedulers-rf{args.rf}-seed{args.first_seed}.json"
    runs = []
    for seed in range(args.first_seed, args.first_seed + args.repeats):
        pair = {}
        for sched in ("asha", "fifo") if seed % 2 == 0 else ("fifo", "asha"):  # interleaved: drift hits both
            pair[sched] = sweep(args, out, data, sched, seed)
            print(f"search seed {seed} {sched}: best val_p68_m {pair[sched]['best']:,.0f}, "
                  f"{pair[sched]['trial_epochs']} trial-epochs, {pair[sched]['wall_s']:.0f} s", flush=True)
        pair["ratio"] = {k: pair["asha"][k] / pair["fifo"][k] for k in ("best", "trial_epochs", "wall_s")}
        runs.append(pair)
        result.write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))  # a lost machine keeps the repeats done
    med = {k: statistics.median(r["ratio"][k] for r in runs) for k in ("best", "trial_epochs", "wall_s")}
    print(f"\n{args.trials} trials, {args.epochs} epochs, grace {args.grace}, reduction factor {args.rf}; "
          f"median of {args.repeats} per-repeat ASHA/FIFO ratios:")
    print(f"best val_p68_m {med['best']:.3f} (target <= 1.05); trial-epochs {med['trial_epochs']:.2f} "
          f"(target <= 0.30); wall-clock {med['wall_s']:.2f}")
    result.write_text(json.dumps({"args": vars(args), "runs": runs, "median": med}, indent=1))


if __name__ == "__main__":
    main()
