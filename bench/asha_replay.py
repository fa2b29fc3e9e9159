"""Replay FIFO sweeps through Ray's ASHA scheduler: what each grace period and reduction factor would
have cost, and the best it would have kept, without training again.

A FIFO sweep runs every trial to the end, so its per-epoch results hold what ASHA would have seen; with
one trial at a time (2 CPUs) ASHA meets the trials in the same order, and its decision depends only on
the results before it. The replay feeds those results to `ASHAScheduler.on_trial_result` in that
order; on the runs of bench/tune_schedulers.py it reproduces the real ASHA sweeps' trial-epochs
exactly. Trial orders are also shuffled (--shuffles), since a sequential ASHA depends on which
trials come first: the share of orders that meet the target says how much a setting relies on luck.
Usage: python bench/asha_replay.py runs/bench-tune/ray/fifo-0 runs/bench-tune/ray/fifo-1 ... [--max-t 24]
"""
from __future__ import annotations

import argparse
import csv
import random
import statistics
from pathlib import Path
from types import SimpleNamespace

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from launch.tune import EPOCH

METRIC = "val_p68_m"  # what bench/tune_schedulers.py's sweeps rank by


def curves(sweep_dir: Path) -> list[list[float]]:
    """Each trial's per-epoch metric, in the order the trials started (Ray's trial index)."""
    trials = sorted(sweep_dir.glob("run_trial_*"), key=lambda d: int(d.name.split("_")[3]))
    return [[float(r[METRIC]) for r in csv.DictReader((d / "progress.csv").open())] for d in trials]


def replay(trials: list[list[float]], grace: int, rf: int, max_t: int) -> tuple[int, float]:
    """(trial-epochs, best metric) of ASHA over these trials run one after another."""
    asha = ASHAScheduler(time_attr=EPOCH, metric=METRIC, mode="min", max_t=max_t, grace_period=grace,
                         reduction_factor=rf)
    cost, best = 0, float("inf")
    for i, curve in enumerate(trials):
        trial = SimpleNamespace(trial_id=str(i))
        asha.on_trial_add(None, trial)
        for epoch, value in enumerate(curve[:max_t], start=1):
            cost, best = cost + 1, min(best, value)
            if asha.on_trial_result(None, trial, {EPOCH: epoch, METRIC: value}) == TrialScheduler.STOP:
                break
    return cost, best


def ratios(sweeps: list[list[list[float]]], grace: int, rf: int, max_t: int) -> list[tuple[float, float]]:
    """Per sweep, ASHA/FIFO (trial-epochs, best metric)."""
    out = []
    for trials in sweeps:
        cost, best = replay(trials, grace, rf, max_t)
        out.append((cost / (len(trials) * max_t), best / min(min(c[:max_t]) for c in trials)))
    return out


def medians(per_sweep: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(x for x, _ in per_sweep), statistics.median(b for _, b in per_sweep)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("sweeps", nargs="+", type=Path, help="Ray storage folders of FIFO sweeps")
    p.add_argument("--max-t", type=int, default=24)
    p.add_argument("--grace", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rf", type=int, nargs="+", default=[3, 4, 6, 8])
    p.add_argument("--shuffles", type=int, default=100)
    args = p.parse_args()
    sweeps = [curves(d) for d in args.sweeps]
    rng = random.Random(0)
    print(f"{len(sweeps)} FIFO sweeps of {[len(s) for s in sweeps]} trials, {args.max_t} epochs; "
          "ASHA/FIFO ratios, median over sweeps")
    print("grace  rf  trial-epochs per sweep      median  best  | shuffled orders: median q90  meets")
    for grace in args.grace:
        for rf in args.rf:
            per = ratios(sweeps, grace, rf, args.max_t)
            med, best = medians(per)
            shuffled = [medians(ratios([rng.sample(s, len(s)) for s in sweeps], grace, rf, args.max_t))
                        for _ in range(args.shuffles)]
            meds = sorted(m for m, _ in shuffled)
            meets = sum(m <= 0.30 and b <= 1.05 for m, b in shuffled) / args.shuffles
            print(f"{grace:5d} {rf:3d}  {' '.join(f'{x:.3f}' for x, _ in per):26s}  {med:.3f}  {best:.3f} | "
                  f"{statistics.median(meds):.3f} {meds[int(0.9 * len(meds))]:.3f}  {meets:.2f}")


if __name__ == "__main__":
    main()
