"""ASHA vs FIFO on a fixed 8-trial space: best validation metric and total trial-epochs of each,
median over repeats (each repeat draws the same 8 configurations: same search seed).

Target (issue 4): ASHA's best within 5 % of FIFO's with at most 40 % of its trial-epochs.
Usage: python bench/tune_schedulers.py [--repeats 3] [--epochs 8] [--samples 4000] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from launch.cli import WORLD_PRESETS
from heimdall.config import TuneConfig
from heimdall.data.synth import SynthSpec, synthesize

SPACE = {"optim.lr": {"loguniform": [1.0e-5, 1.0e-2]}, "optim.weight_decay": {"loguniform": [1.0e-4, 1.0e-1]},
         "model.width": {"choice": [16, 32]}}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--out", default="runs/bench-tune")
    args = p.parse_args()
    from launch.tune import tune_sweep

    out = Path(args.out).resolve()
    data = out / "data"
    if not (data / "manifest.json").exists():
        synthesize(SynthSpec(out=str(data), samples=args.samples, seed=13, iq_length=256,
                             world=WORLD_PRESETS["low-noise"]), workers=2)
    results = {"asha": [], "fifo": []}
    for r in range(args.repeats):
        for sched in ("asha", "fifo") if r % 2 == 0 else ("fifo", "asha"):
            name = f"{sched}-{r}"
            for stale in (out / name, out / "ray" / name, out / "ray" / f"{name}-trials"):
                shutil.rmtree(stale, ignore_errors=True)
            config = TuneConfig.model_validate({
                "data": {"uri": str(data), "normalization_samples": 512}, "model": {"size": "tiny"},
                "trainer": {"max_epochs": args.epochs, "patience": args.epochs, "out_dir": str(out / name),
                            "progress": False},
                "run": {"storage_path": str(out / "ray")}, "mlflow": {"tracking_uri": f"sqlite:///{out}/mlflow.db"},
                "tune": {"name": name, "num_samples": 8, "scheduler": sched, "grace_period": 1, "seed": 0,
                         "space": SPACE}})
            s = tune_sweep(config).summary
            results[sched].append({"best": s["best_metric"], "trial_epochs": s["trial_epochs"]})
            print(f"repeat {r + 1} {sched}: best {s['metric']} {s['best_metric']:,.0f}, "
                  f"{s['trial_epochs']} trial-epochs", flush=True)
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("best", "trial_epochs")} for k, v in results.items()}
    print(f"\nmedian of {args.repeats}: ASHA best {med['asha']['best']:,.0f} m in {med['asha']['trial_epochs']:.0f} "
          f"trial-epochs; FIFO best {med['fifo']['best']:,.0f} m in {med['fifo']['trial_epochs']:.0f} trial-epochs")
    print(f"ASHA/FIFO best = {med['asha']['best'] / med['fifo']['best']:.3f} (target <= 1.05); "
          f"epochs = {med['asha']['trial_epochs'] / med['fifo']['trial_epochs']:.2f} (target <= 0.40)")
    (out / "schedulers.json").write_text(json.dumps({"runs": results, "median": med}, indent=1))


if __name__ == "__main__":
    main()
