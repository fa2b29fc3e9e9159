"""Accuracy against the physical limit: a model trained with `fit` on a synthetic world, its test
P68 as a multiple of the world-aware reference's (docs/reference.md), and its ellipse coverage.

Targets (docs/reference.md; benchmarks, not CI gates): default world, `tiny` on CPU: P68 at most
1.05x the reference's, coverage within 2 points of 39.3 % / 86.5 %; `base` on a GPU: at most 1.02x.
Receiver states (docs/receiver-states.md): --states trains the model twice, with silent receivers
as a third state and without (as absent), beside the reference with and without non-detections;
target: the model keeps at least half of the P68 gain the reference gets from non-detections.
Usage: python bench/accuracy.py [--samples N] [--size tiny|base] [--epochs E] [--world default|low-noise]
       python bench/accuracy.py --curve 10000,30000,100000   # learning curve -> docs/learning-curve.png
       python bench/accuracy.py --states [--seeds 3]   # 3 seeds x 2 models x 30 epochs: about 40 min
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from heimdall.config import load_config
from heimdall.data.states import ABSENT, SILENT
from heimdall.data.synth import SynthSpec, synthesize
from heimdall.data.world import WORLD_PRESETS
from heimdall.evaluation.metrics import IDEAL_COVERAGE
from heimdall.training.fit import fit


def dataset(samples: int, world: str, out: Path, iq_length: int, workers: int) -> Path:
    data = out / f"data-{world}-{samples}"
    if not (data / "manifest.json").exists():
        start = time.perf_counter()
        synthesize(SynthSpec(out=str(data), samples=samples, seed=7, iq_length=iq_length, world=WORLD_PRESETS[world]),
                   workers=workers, log=lambda *_: None)
        print(f"synthesised {samples} {world}-world samples in {time.perf_counter() - start:.0f} s")
    return data


def measure(samples: int, size: str, epochs: int, world: str, out: Path, iq_length: int = 512, batch_size: int = 128,
            workers: int = 2, extra: list[str] = (), tag: str = "") -> dict:
    data = dataset(samples, world, out, iq_length, workers)
    name = f"{size}-{world}-{samples}{tag}"
    config = load_config(None, [f"data.uri={data}", f"model.size={size}", f"trainer.max_epochs={epochs}",
                                f"data.batch_size={batch_size}", "trainer.patience=5",
                                f"trainer.out_dir={out / f'fit-{name}'}", *extra])
    start = time.perf_counter()
    result = fit(config)
    test, model = result.test, result.test.model
    summary = {"size": size, "world": world, "samples": samples, "iq_length": iq_length, "epochs": epochs,
               "train_seconds": round(time.perf_counter() - start), "p68_over_reference": test.over_reference(),
               "p68_over_baseline": model.p68_m / test["physics baseline"].p68_m,
               "cov1_minus_ideal": model.cov1 - IDEAL_COVERAGE["cov1"], "cov2_minus_ideal": model.cov2 - IDEAL_COVERAGE["cov2"],
               "nll_over_reference": test.extra.get("nll_over_reference"), "test": test.to_json(),
               "best_checkpoint": result.best_checkpoint}
    (out / f"accuracy-{name}.json").write_text(json.dumps(summary, indent=1))
    print(f"{size}{tag}, {world} world, {samples} captures: P68 / reference = {summary['p68_over_reference']:.3f}, "
          f"/ physics baseline = {summary['p68_over_baseline']:.3f}; coverage {model.cov1:.3f}/{model.cov2:.3f} "
          f"(ideal 0.393/0.865); NLL - reference's = {summary['nll_over_reference']:.2f}")
    return summary


def states(args, out: Path) -> dict:
    """Test P68 with and without the third state, model and reference, on one dataset; each also on
    the captures with a silent receiver and on those without."""
    import numpy as np

    from heimdall.data.dataset import Dataset
    from heimdall.evaluation.evaluate import predict
    from heimdall.evaluation.reference import reference_predictions
    from heimdall.geodesy import haversine_m
    from heimdall.serving.inference import open_model

    ds = Dataset.open(str(dataset(args.samples, args.world, out, args.iq_length, args.workers)))
    truth = {k: np.concatenate([c[k] for c in ds.iter_shards("test", columns=["sample_id", "tx_lat", "tx_lon", "rx_state"])])
             for k in ("sample_id", "tx_lat", "tx_lon", "rx_state")}
    has_silent = (truth["rx_state"] == SILENT).any(1)

    def p68(lat, lon) -> dict[str, float]:
        e = haversine_m(lat, lon, truth["tx_lat"], truth["tx_lon"])
        return {"all": float(np.percentile(e, 68)), "with a silent receiver": float(np.percentile(e[has_silent], 68)),
                "without": float(np.percentile(e[~has_silent], 68))}

    ref = {}
    for nd in (False, True):
        r = reference_predictions(ds, "test", non_detections=nd)
        assert np.array_equal(r["sample_id"], truth["sample_id"])
        ref[nd] = p68(r["lat"], r["lon"])
    # Interleaved seeds, the same schedule to the end for both (no early stop: patience would end
    # one model's cosine schedule early on a noisy epoch); the median test P68 of each.
    runs = {k: [] for k in (2, 3)}
    for seed in range(args.seeds):
        for k in (2, 3):
            run = measure(args.samples, args.size, args.epochs, args.world, out, args.iq_length, args.batch_size,
                          args.workers, [f"trainer.patience={args.epochs}", f"trainer.seed={seed}", *args.overrides,
                                         f"model.receiver_states={k}"], tag=f"-states{k}-e{args.epochs}-seed{seed}")
            pred = predict({"m": open_model(run["best_checkpoint"]).predict}, ds, "test", with_baseline=False,
                           with_reference=False)
            assert np.array_equal(pred["truth"]["sample_id"], truth["sample_id"])
            runs[k].append(p68(pred["m"]["latitude"], pred["m"]["longitude"]))
    model = {k: {part: float(np.median([r[part] for r in v])) for part in v[0]} for k, v in runs.items()}
    gain = {"reference": 1 - ref[True]["all"] / ref[False]["all"], "model": 1 - model[3]["all"] / model[2]["all"]}
    per_seed = [1 - three["all"] / two["all"] for two, three in zip(runs[2], runs[3])]
    result = {"samples": args.samples, "world": args.world, "size": args.size, "epochs": args.epochs,
              "seeds": args.seeds, "silent_share_of_online": float((truth["rx_state"] == SILENT).sum()
                                                                   / max(1, (truth["rx_state"] != ABSENT).sum())),
              "captures_with_a_silent_receiver": float(has_silent.mean()),
              "reference_p68_m": {"heard only": ref[False], "with non-detections": ref[True]},
              "model_p68_m": {"two states": model[2], "three states": model[3]}, "gain": gain,
              "model_keeps": gain["model"] / gain["reference"] if gain["reference"] > 0 else None,
              "per_seed": {"two states": runs[2], "three states": runs[3], "model gain": per_seed}}
    (out / f"states-{args.size}-{args.world}-{args.samples}.json").write_text(json.dumps(result, indent=1))
    print(f"\ntest P68 ({args.world} world, {args.samples} captures, {args.size}, "
          f"{result['silent_share_of_online']:.1%} of online receivers silent, "
          f"{result['captures_with_a_silent_receiver']:.1%} of captures with one); models: medians of {args.seeds} seeds")
    print(f"  {'':34} {'all':>9} {'with silent':>12} {'without':>9}")
    for name, row in (("reference, heard only", ref[False]), ("reference with non-detections", ref[True]),
                      ("model, two states", model[2]), ("model, three states", model[3])):
        print(f"  {name:34} {row['all']:>9,.0f} {row['with a silent receiver']:>12,.0f} {row['without']:>9,.0f}")
    print(f"  gain from silent receivers: reference {gain['reference']:.1%}, model {gain['model']:.1%} "
          f"(per seed {', '.join(f'{g:.1%}' for g in per_seed)})")
    if result["model_keeps"] is None:
        print("  the reference gains nothing from non-detections here (no silent receivers?)")
    else:
        print(f"  the model keeps {result['model_keeps']:.2f} of the reference's gain (target >= 0.5)")
    return result


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
    p.add_argument("--epochs", type=int, help="default 15; 30 with --states")
    p.add_argument("--seeds", type=int, default=3, help="--states: training seeds per model (medians)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--world", default="default", choices=sorted(WORLD_PRESETS))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--curve", help="comma-separated capture counts: a learning curve")
    p.add_argument("--states", action="store_true", help="with and without the silent state, model and reference")
    p.add_argument("--figure", default="docs/learning-curve.png")
    p.add_argument("--out", default="runs/bench-accuracy")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="fit config overrides")
    args = p.parse_args()
    out = Path(args.out)
    args.epochs = args.epochs or (30 if args.states else 15)
    if args.states:
        states(args, out)
        return
    sizes = [int(x) for x in args.curve.split(",")] if args.curve else [args.samples]
    points = [measure(n, args.size, args.epochs, args.world, out, args.iq_length, args.batch_size, args.workers,
                      args.overrides) for n in sizes]
    if args.curve:
        print(f"figure: {curve(points, Path(args.figure))}")


if __name__ == "__main__":
    main()
