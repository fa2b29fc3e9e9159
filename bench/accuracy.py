"""Accuracy report on the DEFAULT world: model vs physics baseline (P50/P68/P95, coverage).

Target (issue 2, not a CI gate): model P68 <= 0.6 x the baseline's, coverage within 5 points of
ideal (39.3 % / 86.5 %). `base` needs a GPU; on CPU run `tiny` and report what it reaches.
Usage: python bench/accuracy.py [--samples N] [--size tiny|base] [--epochs E] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from heimdall.config import load_config
from heimdall.training.fit import fit
from heimdall.evaluation.metrics import IDEAL_COVERAGE
from heimdall.data.synth import SynthSpec, synthesize


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=40000)
    p.add_argument("--iq-length", type=int, default=512)
    p.add_argument("--size", default="tiny")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="runs/bench-accuracy")
    args = p.parse_args()
    out = Path(args.out)
    data = out / "data"
    if not (data / "manifest.json").exists():
        start = time.perf_counter()
        synthesize(SynthSpec(out=str(data), samples=args.samples, seed=7, iq_length=args.iq_length),
                   workers=args.workers)
        print(f"synthesised {args.samples} default-world samples in {time.perf_counter() - start:.0f} s")
    config = load_config(None, [f"data.uri={data}", f"model.size={args.size}", f"trainer.max_epochs={args.epochs}",
                                f"data.batch_size={args.batch_size}", "trainer.patience=5",
                                f"trainer.out_dir={out / ('fit-' + args.size)}"])
    start = time.perf_counter()
    result = fit(config)
    rows = result.test_rows
    ratio = rows["model"]["p68_m"] / rows["physics baseline"]["p68_m"]
    summary = {"size": args.size, "samples": args.samples, "iq_length": args.iq_length, "epochs_run": result.epochs_run,
               "train_seconds": round(time.perf_counter() - start), "p68_ratio_model_over_baseline": ratio,
               "cov1_minus_ideal": rows["model"]["cov1"] - IDEAL_COVERAGE["cov1"],
               "cov2_minus_ideal": rows["model"]["cov2"] - IDEAL_COVERAGE["cov2"], "rows": rows}
    (out / f"accuracy-{args.size}.json").write_text(json.dumps(summary, indent=1))
    print(f"P68 model / physics baseline = {ratio:.2f} (target <= 0.6); "
          f"coverage {rows['model']['cov1']:.3f}/{rows['model']['cov2']:.3f} (ideal 0.393/0.865)")


if __name__ == "__main__":
    main()
