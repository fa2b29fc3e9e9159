"""Steady-state training samples/s: Ray Train (1 and 2 workers) beside plain Lightning, same model,
same data, same torch threads, in one command.

Steady state = median of the per-epoch `train_samples_per_s` (first to last training batch, no
validation) over epochs 2..N. Targets (issue 3): Ray 1 worker / plain >= 0.9 on CPU, >= 0.97 on GPU.
Usage: python bench/train_throughput.py [--samples N] [--epochs E] [--threads T] [--out DIR]
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

from heimdall.config import FitConfig, TrainConfig, load_config
from heimdall.synth import SynthSpec, synthesize
from heimdall.cli import WORLD_PRESETS


def steady(rates: list[float]) -> float:
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def plain(common: list[str], out: Path, threads: int) -> list[float]:
    from heimdall.fit import fit

    config = load_config(None, [*common, f"trainer.out_dir={out / 'plain'}", f"trainer.threads={threads}"], FitConfig)
    fit(config)
    rows = [r for p in sorted((out / "plain" / "logs").glob("version_*/metrics.csv")) for r in csv.DictReader(open(p))]
    return [float(r["train_samples_per_s"]) for r in rows if r.get("train_samples_per_s")]


def ray_train(common: list[str], out: Path, workers: int, threads: int) -> list[float]:
    from heimdall.tracking import RunTracker
    from launch.train import train

    name = f"ray-{workers}w"
    cpus = "null" if workers > 1 else str(threads)
    config = load_config(None, [*common, f"trainer.out_dir={out / name}", f"run.name={name}",
                                f"run.storage_path={out / 'ray'}", f"ray.num_workers={workers}",
                                f"ray.cpus_per_worker={cpus}", f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db"],
                         TrainConfig)
    outcome = train(config)
    tracker = RunTracker(f"sqlite:///{out.resolve()}/mlflow.db", "heimdall")
    return [m.value for m in sorted(tracker.client.get_metric_history(outcome.mlflow_run_id, "train_samples_per_s"),
                                    key=lambda m: m.step)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=12000)
    p.add_argument("--iq-length", type=int, default=512)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/bench-throughput")
    args = p.parse_args()
    out = Path(args.out).resolve()
    data = out / "data"
    if not (data / "manifest.json").exists():
        synthesize(SynthSpec(out=str(data), samples=args.samples, seed=11, iq_length=args.iq_length,
                             world=WORLD_PRESETS["low-noise"]), workers=2)
    for stale in ("plain", "ray", "ray-1w", "ray-2w", "mlflow.db"):  # fresh runs, not resumes
        path = out / stale
        if path.exists():
            __import__("shutil").rmtree(path) if path.is_dir() else path.unlink()
    common = [f"data.uri={data}", "model.size=tiny", f"trainer.max_epochs={args.epochs}",
              f"trainer.patience={args.epochs}", "data.batch_size=64"]
    results = {}
    for name, run in (("plain Lightning", lambda: plain(common, out, args.threads)),
                      ("Ray Train 1 worker", lambda: ray_train(common, out, 1, args.threads)),
                      ("Ray Train 2 workers", lambda: ray_train(common, out, 2, args.threads))):
        start = time.perf_counter()
        rates = run()
        results[name] = {"per_epoch": [round(r) for r in rates], "steady": steady(rates),
                         "wall_s": round(time.perf_counter() - start)}
    base = results["plain Lightning"]["steady"]
    print(f"\nsteady-state training samples/s, tiny model, {args.threads} torch thread(s) per worker:")
    for name, r in results.items():
        print(f"  {name:20s} {r['steady']:8,.0f}  ratio {r['steady'] / base:.3f}  per epoch {r['per_epoch']}  "
              f"wall {r['wall_s']} s")
    two_over_one = results["Ray Train 2 workers"]["steady"] / results["Ray Train 1 worker"]["steady"]
    print(f"  Ray 1 worker / plain = {results['Ray Train 1 worker']['steady'] / base:.3f} (target >= 0.9 on CPU); "
          f"2 workers / 1 worker = {two_over_one:.3f}")
    (out / "throughput.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
