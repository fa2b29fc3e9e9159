"""Steady-state training samples/s: Ray Train (1 and 2 workers) beside plain Lightning, same model,
same data, same torch threads, in one command.

Steady state = median of the per-epoch `train_samples_per_s` (first to last training batch, no
validation) over epochs 2..N. The three runs are repeated, rotating their order, and the ratio is the
median of per-repeat ratios: this machine is shared and single runs vary by +-20 %.
Targets (issue 3): Ray 1 worker / plain >= 0.9 on CPU, >= 0.97 on GPU.
Usage: python bench/train_throughput.py [--samples N] [--epochs E] [--threads T] [--repeats R] [--out DIR]
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import time
from pathlib import Path

from heimdall.config import FitConfig, TrainConfig, load_config
from heimdall.data.synth import SynthSpec, synthesize
from launch.cli import WORLD_PRESETS


def steady(rates: list[float]) -> float:
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def plain(common: list[str], out: Path, threads: int, repeat: int, run_it: bool = True) -> list[float]:
    from heimdall.training.fit import fit

    run = out / f"plain-{repeat}"
    config = load_config(None, [*common, f"trainer.out_dir={run}", f"trainer.threads={threads}"], FitConfig)
    if run_it:
        fit(config)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    return [float(r["train_samples_per_s"]) for r in rows if r.get("train_samples_per_s")]


def ray_train(common: list[str], out: Path, workers: int, threads: int, repeat: int, run_it: bool = True) -> list[float]:
    from heimdall.tracking import RUN_KEY_TAG, RunTracker, run_key
    from launch.train import train

    name = f"ray-{workers}w-{repeat}"
    cpus = "null" if workers > 1 else str(threads)
    config = load_config(None, [*common, f"trainer.out_dir={out / name}", f"run.name={name}",
                                f"run.storage_path={out / 'ray'}", f"ray.num_workers={workers}",
                                f"ray.cpus_per_worker={cpus}", f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db"],
                         TrainConfig)
    if run_it:
        train(config)
    tracker = RunTracker(f"sqlite:///{out.resolve()}/mlflow.db", "heimdall")
    key = run_key(str(out / "ray"), name)
    run_id = tracker.client.search_runs([tracker.experiment_id], f"tags.{RUN_KEY_TAG} = '{key}'")[0].info.run_id
    return [m.value for m in sorted(tracker.client.get_metric_history(run_id, "train_samples_per_s"),
                                    key=lambda m: m.step)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=12000)
    p.add_argument("--iq-length", type=int, default=512)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the outputs of a finished run")
    p.add_argument("--out", default="runs/bench-throughput")
    args = p.parse_args()
    out = Path(args.out).resolve()
    data = out / "data"
    if not (data / "manifest.json").exists():
        synthesize(SynthSpec(out=str(data), samples=args.samples, seed=11, iq_length=args.iq_length,
                             world=WORLD_PRESETS["low-noise"]), workers=2)
    for stale in [*out.glob("plain-*"), *out.glob("ray-*"), out / "ray", out / "mlflow.db"]:  # fresh, no resume
        if stale.exists() and not args.report_only:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    common = [f"data.uri={data}", "model.size=tiny", f"trainer.max_epochs={args.epochs}",
              f"trainer.patience={args.epochs}", "data.batch_size=64"]
    go = not args.report_only
    modes = {"plain Lightning": lambda r: plain(common, out, args.threads, r, go),
             "Ray Train 1 worker": lambda r: ray_train(common, out, 1, args.threads, r, go),
             "Ray Train 2 workers": lambda r: ray_train(common, out, 2, args.threads, r, go)}
    results = {name: [] for name in modes}
    names = list(modes)
    for r in range(args.repeats):
        for name in names[r % 3:] + names[:r % 3]:
            rates = modes[name](r)
            results[name].append({"per_epoch": [round(x) for x in rates], "steady": steady(rates)})
    base = [x["steady"] for x in results["plain Lightning"]]

    def ratio(name, over):
        return statistics.median(a["steady"] / b["steady"] for a, b in zip(results[name], over))
    print(f"\nsteady-state training samples/s, tiny model, {args.threads} torch thread(s) per worker, "
          f"{args.repeats} repeats:")
    for name, runs in results.items():
        print(f"  {name:20s} median {statistics.median(x['steady'] for x in runs):7,.0f}  "
              f"ratio to plain {ratio(name, results['plain Lightning']):.3f}  runs {[round(x['steady']) for x in runs]}")
    print(f"  Ray 1 worker / plain = {ratio('Ray Train 1 worker', results['plain Lightning']):.3f} (target >= 0.9 on CPU); "
          f"2 workers / 1 worker = {ratio('Ray Train 2 workers', results['Ray Train 1 worker']):.3f}")
    (out / "throughput.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
