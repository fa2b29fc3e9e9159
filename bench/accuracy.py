"""Accuracy against the physical limit: a model trained with `fit` on a synthetic world, its test
P68 as a multiple of the world-aware reference's (docs/reference.md), and its ellipse coverage.

Targets (docs/reference.md; benchmarks, not CI gates): default world, `tiny` on CPU: P68 at most
1.05x the reference's, coverage within 2 points of 39.3 % / 86.5 %; `base` on a GPU: at most 1.02x.
Usage: python bench/accuracy.py [--samples N] [--size tiny|base] [--epochs E] [--world default|low-noise]
       python bench/accuracy.py --curve 10000,30000,100000   # learning curve -> docs/learning-curve.png
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from heimdall.config import load_config
from heimdall.data.synth import SynthSpec, synthesize
from heimdall.data.world import WORLD_PRESETS
from heimdall.evaluation.metrics import IDEAL_COVERAGE
from heimdall.training.fit import fit


def measure(samples: int, size: str, epochs: int, world: str, out: Path, iq_length: int = 512, batch_size: int = 128,
            workers: int = 2, extra: list[str] = ()) -> dict:
    data = out / f"data-{world}-{samples}"
    if not (data / "manifest.json").exists():
        start = time.perf_counter()
        synthesize(SynthSpec(out=str(data), samples=samples, seed=7, iq_length=iq_length, world=WORLD_PRESETS[world]),
                   workers=workers, log=lambda *_: None)
        print(f"synthesised {samples} {world}-world samples in {time.perf_counter() - start:.0f} s")
    config = load_config(None, [f"data.uri={data}", f"model.size={size}", f"trainer.max_epochs={epochs}",
                                f"data.batch_size={batch_size}", "trainer.patience=5",
                                f"trainer.out_dir={out / f'fit-{size}-{world}-{samples}'}", *extra])
    start = time.perf_counter()
    test = fit(config).test
    model = test.model
    summary = {"size": size, "world": world, "samples": samples, "iq_length": iq_length, "epochs": epochs,
               "train_seconds": round(time.perf_counter() - start), "p68_over_reference": test.over_reference(),
               "p68_over_baseline": model.p68_m / test["physics baseline"].p68_m,
               "cov1_minus_ideal": model.cov1 - IDEAL_COVERAGE["cov1"], "cov2_minus_ideal": model.cov2 - IDEAL_COVERAGE["cov2"],
               "nll_over_reference": test.extra.get("nll_over_reference"), "test": test.to_json()}
    (out / f"accuracy-{size}-{world}-{samples}.json").write_text(json.dumps(summary, indent=1))
    print(f"{size}, {world} world, {samples} captures: P68 / reference = {summary['p68_over_reference']:.3f}, "
          f"/ physics baseline = {summary['p68_over_baseline']:.3f}; coverage {model.cov1:.3f}/{model.cov2:.3f} "
          f"(ideal 0.393/0.865); NLL - reference's = {summary['nll_over_reference']:.2f}")
    return summary


def curve(points: list[dict], out: Path) -> Path:
    from heimdall.evaluation.plots import _save, plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for size in sorted({p["size"] for p in points}):
        mine = sorted((p for p in points if p["size"] == size), key=lambda p: p["samples"])
        ax.plot([p["samples"] for p in mine], [p["p68_over_reference"] for p in mine], "o-", label=size)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="reference")
    ax.set_xscale("log"), ax.set_xlabel("captures synthesised (80 % train)"), ax.set_ylabel("test P68 / reference P68")
    ax.set_title(f"{points[0]['world']} world: the gap to the physical limit"), ax.legend()
    return _save(fig, out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=40000)
    p.add_argument("--iq-length", type=int, default=512)
    p.add_argument("--size", default="tiny")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--world", default="default", choices=sorted(WORLD_PRESETS))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--curve", help="comma-separated capture counts: a learning curve")
    p.add_argument("--figure", default="docs/learning-curve.png")
    p.add_argument("--out", default="runs/bench-accuracy")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="fit config overrides")
    args = p.parse_args()
    out = Path(args.out)
    sizes = [int(x) for x in args.curve.split(",")] if args.curve else [args.samples]
    points = [measure(n, args.size, args.epochs, args.world, out, args.iq_length, args.batch_size, args.workers,
                      args.overrides) for n in sizes]
    if args.curve:
        print(f"figure: {curve(points, Path(args.figure))}")


if __name__ == "__main__":
    main()
