"""CPU proxies of the GPU speed work, in one command (docs/gpu-speed.md).

At `tiny`, on the same dataset files, CPUs and torch threads:
  bare       the bare PyTorch step loop (bench/bare_loop.py: batches kept in memory), in this process
  fit        `heimdall fit` (plain Lightning), default config
  fit-old    `heimdall fit` with data.prefetch_batches=0 (the data path before the prefetcher)
  train      `heimdall train`, Ray Train, 1 worker, MLflow off
  baseline   `heimdall fit` of the baseline commit (a git worktree): CPU must not regress

Each round runs every mode once, in a rotated order (this machine is shared and noisy); a mode's
rate is its `train_samples_per_s` (first to last training batch of an epoch), median of epochs
2..N. Ratios are medians of per-round ratios, with their spread (min..max). Milliseconds per step
are batch / rate; the overhead of Lightning is fit - bare, of Ray Train train - fit.
Usage: python bench/cpu_step.py [--rounds 5] [--samples 12000] [--epochs 4] [--threads 1] [--baseline 60d15cb]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def steady(rates: list[float]) -> float:
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")


def fit_rates(out: Path) -> list[float]:
    files = [out / "metrics.csv"] if (out / "metrics.csv").exists() else sorted(out.glob("logs/version_*/metrics.csv"))
    return [float(r["train_samples_per_s"]) for f in files for r in csv.DictReader(open(f)) if r.get("train_samples_per_s")]


def train_rates(storage: Path) -> list[float]:
    last = sorted(storage.glob("epoch_*/epochs.json"))[-1]
    return [r["train_samples_per_s"] for r in json.loads(last.read_text())]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--samples", type=int, default=12000)
    p.add_argument("--iq-length", type=int, default=512)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--baseline", default="60d15cb", help="commit to compare plain fit against")
    p.add_argument("--modes", default="bare,fit,fit-old,train,baseline")
    p.add_argument("--out", default="runs/bench-cpu-step")
    args = p.parse_args()
    out = Path(args.out).resolve()
    data = out / "data"
    py = sys.executable
    if not (data / "manifest.json").exists():
        run([py, "-m", "launch.cli", "data", "synth", "--out", str(data), "--samples", str(args.samples),
             "--iq-length", str(args.iq_length), "--world-preset", "low-noise", "--workers", "2", "--seed", "11"], ROOT)
    old = out / f"worktree-{args.baseline}"
    modes = args.modes.split(",")
    if "baseline" in modes and not old.exists():
        run(["git", "worktree", "add", "--detach", str(old), args.baseline], ROOT)
    common = [f"data.uri={data}", "model.size=tiny", f"trainer.max_epochs={args.epochs}",
              f"trainer.patience={args.epochs}", f"data.batch_size={args.batch}"]
    env = {"RAY_AUTH_MODE": "disabled", "PYTHONPATH": ""}

    def fit(name: str, extra: list[str], code: Path = ROOT) -> float:
        d = out / "runs" / name
        shutil.rmtree(d, ignore_errors=True)
        run([py, "-m", "launch.cli", "fit", *common, f"trainer.out_dir={d}", f"trainer.threads={args.threads}",
             *extra], code, {**env, "PYTHONPATH": str(code)})
        return steady(fit_rates(d))

    def train() -> float:
        d = out / "runs" / "train"
        shutil.rmtree(d, ignore_errors=True)
        run([py, "-m", "launch.cli", "train", *common, f"trainer.out_dir={d}/out", "run.name=bench",
             f"run.storage_path={d}", "mlflow.enabled=false", "ray.num_workers=1",
             f"ray.cpus_per_worker={args.threads}", "ray.check_resources=false"], ROOT, env)
        return steady(train_rates(d / "bench"))

    def bare() -> float:
        import torch
        from bare_loop import bare_loop

        from heimdall.config import load_config, TrainConfig

        config = load_config(None, [*common, f"trainer.threads={args.threads}", "trainer.accelerator=cpu"], TrainConfig)
        rate = bare_loop(config.model_dump(), 8.0)["samples_per_s"]
        torch.set_num_threads(os.cpu_count())
        return rate

    run_mode = {"bare": bare, "fit": lambda: fit("fit", []), "fit-old": lambda: fit("fit-old", ["data.prefetch_batches=0"]),
                "train": train, "baseline": lambda: fit("baseline", [], old)}
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for m in modes[r % len(modes):] + modes[:r % len(modes)]:
            start = time.time()
            rates[m].append(run_mode[m]())
            print(f"round {r + 1}: {m:9s} {rates[m][-1]:8,.0f} samples/s ({time.time() - start:.0f} s)", flush=True)
    report(rates, args, out)


def report(rates: dict[str, list[float]], args, out: Path) -> None:
    def ratio(a: str, b: str) -> str:
        per = sorted(x / y for x, y in zip(rates[a], rates[b]))
        return f"{statistics.median(per):.3f} ({per[0]:.3f}..{per[-1]:.3f})"

    ms = {m: 1000 * args.batch / statistics.median(v) for m, v in rates.items()}
    print(f"\ntiny, batch {args.batch}, {args.threads} torch thread(s), {args.rounds} rounds, medians "
          f"(per-round ratios: median (min..max))")
    print(f"{'mode':10s} {'samples/s':>10s} {'ms/step':>8s}  rounds")
    for m, v in rates.items():
        print(f"{m:10s} {statistics.median(v):10,.0f} {ms[m]:8.2f}  {[round(x) for x in v]}")
    pairs = [("train", "fit", "Ray Train 1 worker / plain fit"), ("fit", "bare", "plain fit / bare loop"),
             ("train", "bare", "Ray Train / bare loop"), ("fit", "fit-old", "fit / fit with the old data path"),
             ("fit", "baseline", f"fit / fit at {args.baseline} (no CPU regression: >= 0.95)")]
    for a, b, what in pairs:
        if a in rates and b in rates:
            print(f"  {what:58s} {ratio(a, b)}")
    if "bare" in ms:
        for m, what in (("fit", "Lightning"), ("train", "Ray Train + Lightning")):
            if m in ms:
                print(f"  per-step overhead of {what} over the bare loop: {ms[m] - ms['bare']:.2f} ms")
    (out / "cpu_step.json").write_text(json.dumps({"rates": rates, "ms_per_step": ms, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
