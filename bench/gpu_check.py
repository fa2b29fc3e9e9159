"""The GPU check (run it through bench/gpu_check.sh): in one command on one GPU, within a time budget,

1. synthesise a dataset (`heimdall data synth`, every core),
2. time a bare PyTorch step loop of the model (batches already on the device: the limit),
3. time Ray Data ingest alone (read -> decoded batches on the device, as bench/ingest.py),
4. train under Ray Train (`launch.train.train`, MLflow off) for as many epochs as the time left holds,
   judged from 2 and 3, then evaluate on the test split beside the physics baseline and the centroid,

and print one summary (also JSON). Steps 2 and 3 run as Ray tasks holding what a training worker
holds (its CPUs, its GPU), so they see the CPUs that training leaves to Ray Data. --cpu-smoke runs
the same steps with tiny sizes, fp32, on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import ray
import torch

from heimdall.config import TrainConfig, load_config
from heimdall.dataset import Dataset
from heimdall.metrics import format_table
from launch.cluster import DRIVER_RESOURCE, connect, plan_workers
from launch.train import apply_plan, train

sys.path.insert(0, str(Path(__file__).parent))
import bare_loop as _bare  # noqa: E402

ray.cloudpickle.register_pickle_by_value(_bare)  # Ray workers do not have bench/ on their path
bare_loop = _bare.bare_loop

GPU = dict(samples=120_000, size="base", batch=256, precision="bf16-mixed", bare_s=15.0, max_epochs=100)
SMOKE = dict(samples=600, size="base", batch=64, precision="32-true", bare_s=3.0, max_epochs=1)
# Seconds kept back from training: Ray Train start-up, the summary, and a margin for misjudged epochs.
TRAIN_STARTUP_S, MARGIN_S, BASELINE_RATE = 45.0, 30.0, 300.0  # BASELINE_RATE: physics-baseline samples/s, one core


def ingest(config: dict, read_cpus: float) -> dict:
    """One epoch of the train split through Ray Data into device batches; the rate excludes the first batch."""
    from ray.data import DataContext

    from launch.ingest import ShardBatches, train_val_datasets

    DataContext.get_current().enable_progress_bars = False  # as connect() does in the driver
    c = TrainConfig.model_validate(config)
    device = "cuda" if c.trainer.accelerator == "gpu" else "cpu"
    dataset = Dataset.open(c.data.uri)
    shard = train_val_datasets(dataset, c.trainer.seed, read_cpus)["train"].streaming_split(1, equal=True)[0]
    start, n, first = time.perf_counter(), 0, None
    for b in ShardBatches(shard, dataset, "train", c.data.batch_size, 45.0, 7.5, drop_last=True):
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        if first is None:
            first = time.perf_counter()
        else:
            n += len(b["mask"])
    if device == "cuda":
        torch.cuda.synchronize()
    return {"samples_per_s": n / (time.perf_counter() - first), "first_batch_s": first - start}


def epoch_metrics(storage: Path) -> list[dict]:
    """Every finished epoch's reported metrics, from Ray Train's checkpoint snapshot (all epochs are kept)."""
    snapshot = storage / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return []
    return sorted((r["metrics"] for r in json.loads(snapshot.read_text())["checkpoint_results"]),
                  key=lambda m: m["epoch"])


def throughput(epochs: list[dict]) -> dict:
    rates = [m["train_samples_per_s"] for m in epochs if "train_samples_per_s" in m]
    return {"epochs_done": len(epochs), "per_epoch_samples_per_s": rates,
            "per_epoch_val_p68_m": [m.get("val_p68_m") for m in epochs],
            # steady state: epoch 1 holds start-up costs (first batches, cuDNN autotuning)
            "samples_per_s": statistics.median(rates[1:] if len(rates) > 1 else rates) if rates else None}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes, fp32, CPU: the same steps in a few minutes")
    p.add_argument("--samples", type=int)
    p.add_argument("--iq-length", type=int, default=1024)
    p.add_argument("--world-preset", default="default")
    p.add_argument("--out", default="runs/gpu_check")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training config overrides (data.batch_size=128)")
    args = p.parse_args()
    t0 = time.time()
    deadline = float(os.environ.get("GPU_CHECK_DEADLINE", t0 + 450))
    s = dict(SMOKE if args.cpu_smoke else GPU)
    samples = args.samples or s["samples"]
    out = Path(args.out).resolve()
    summary_path = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else out / "summary.json"
    stages: dict[str, float] = {}
    if os.environ.get("GPU_CHECK_WHEELS_S"):
        stages["wheels"] = float(os.environ["GPU_CHECK_WHEELS_S"])
    summary = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu", "complete": False, "stages_s": stages,
               "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
               "lightning": version("lightning")}

    def save():
        summary["wall_s"] = round(time.time() - t0, 1)
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(summary, indent=1))

    def stage(name, fn, *a):
        start = time.time()
        result = fn(*a)
        stages[name] = round(time.time() - start, 1)
        save()
        return result

    try:
        data = out / f"data-{args.world_preset}-{samples}x{args.iq_length}"
        for old in (out / "ray", out / "train"):  # a fresh run each time; the dataset is reused
            shutil.rmtree(old, ignore_errors=True)
        stage("ray_start", connect)
        # SIGTERM from the outer `timeout`: unwind, so Ray is shut down and the partial summary written. Set after
        # ray.init, whose own handler dumps a stack trace and exits, leaving the local Ray running.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
        if os.environ.get("GPU_CHECK_SESSION_FILE"):  # for gpu_check.sh, should this process be killed outright
            session = ray._private.worker._global_node.get_session_dir_path()
            Path(os.environ["GPU_CHECK_SESSION_FILE"]).write_text(session)
        if not args.cpu_smoke and ray.cluster_resources().get("GPU", 0) < 1:
            raise SystemExit("no GPU in the local Ray: run the CPU smoke mode instead (GPU_CHECK_CPU=1)")
        if not (data / "manifest.json").exists():
            cmd = [sys.executable, "-m", "heimdall.cli", "data", "synth", "--out", str(data), "--samples", str(samples),
                   "--iq-length", str(args.iq_length), "--workers", str(int(ray.cluster_resources()["CPU"])),
                   "--world-preset", args.world_preset, "--overwrite"]
            stage("synth", lambda: subprocess.run(cmd, check=True))
        dataset = Dataset.open(str(data))
        counts = {k: dataset.count(k) for k in ("train", "val", "test")}
        summary["dataset"] = {"uri": str(data), "samples": samples, "receivers": dataset.num_receivers,
                              "iq_length": dataset.iq_length, "world_preset": args.world_preset, **counts}
        run = f"gpu-check-{int(t0)}"
        common = [f"data.uri={data}", f"model.size={s['size']}", f"data.batch_size={s['batch']}",
                  f"trainer.precision={s['precision']}", f"trainer.out_dir={out / 'train'}", f"run.name={run}",
                  f"run.storage_path={out / 'ray'}", "mlflow.enabled=false",
                  *(["ray.use_gpu=false"] if args.cpu_smoke else []), *args.overrides]
        config = load_config(None, common, TrainConfig)
        plan = plan_workers(config.ray, ray.cluster_resources())
        apply_plan(config, plan)
        summary["setup"] = {"model": config.model.size, "batch_size": config.data.batch_size,
                            "precision": config.trainer.precision, "workers": plan.num_workers, "use_gpu": plan.use_gpu,
                            "cpus_per_worker": plan.cpus_per_worker, "threads": plan.threads,
                            "cluster_cpus": ray.cluster_resources().get("CPU")}
        slot = dict(num_cpus=plan.cpus_per_worker, num_gpus=int(plan.use_gpu))  # what one training worker holds
        bare = stage("bare_loop", lambda: ray.get(ray.remote(bare_loop).options(**slot).remote(
            config.model_dump(), s["bare_s"])))
        summary["device"] = bare.pop("device")
        summary["bare_loop"] = bare
        ing = stage("ingest", lambda: ray.get(ray.remote(ingest).options(**slot).remote(
            config.model_dump(), plan.read_cpus)))
        summary["ingest"] = ing

        # Epochs that fit the time left, assuming Ray Train reaches half the slower of the two limits: an overrun
        # loses the test table (the outer timeout stops it), finishing early loses only some accuracy.
        guess = 0.5 * min(bare["samples_per_s"], ing["samples_per_s"])
        epoch_s = counts["train"] / guess + counts["val"] / ing["samples_per_s"] + 2
        left = deadline - time.time() - TRAIN_STARTUP_S - counts["test"] / BASELINE_RATE - MARGIN_S
        epochs = max(1, min(s["max_epochs"], int(left // epoch_s)))
        print(f"\ntraining for {epochs} epoch(s): about {epoch_s:.0f} s each judged from the bare loop and ingest, "
              f"{left:.0f} s left for epochs")
        # Every epoch's checkpoint is kept, so Ray's checkpoint snapshot holds every epoch's metrics.
        config = load_config(None, [*common, f"trainer.max_epochs={epochs}", f"trainer.patience={epochs}",
                                    f"run.keep_checkpoints={epochs}"], TrainConfig)
        summary["ray_train"] = {"epochs": epochs}
        outcome = stage("train", train, config)
        summary["ray_train"].update(best_val=outcome.best_val, best_checkpoint=outcome.best_checkpoint_uri)
        summary["test"] = outcome.test_rows
        summary["complete"] = True
    finally:
        ray.shutdown()
        if "ray_train" in summary:  # also after a stop mid-training: the epochs that finished
            summary["ray_train"].update(throughput(epoch_metrics(out / "ray" / run)))
            rate = summary["ray_train"]["samples_per_s"]
            summary["ratio_ray_over_bare"] = rate / summary["bare_loop"]["samples_per_s"] if rate else None
            summary["ingest_over_bare"] = summary["ingest"]["samples_per_s"] / summary["bare_loop"]["samples_per_s"]
        save()
    report(summary, summary_path)


def report(s: dict, path: Path) -> None:
    d, st, rt = s["dataset"], s["setup"], s["ray_train"]
    rows = s["test"]
    line = "=" * 100
    print(f"\n{line}\nGPU check ({s['mode']}) finished in {s['wall_s'] / 60:.1f} min on {s['device']}")
    print(f"python {s['python']}, torch {s['torch']}, lightning {s['lightning']}, ray {s['ray']}")
    print(f"dataset {d['samples']:,} x {d['receivers']} receivers x {d['iq_length']} IQ ({d['world_preset']} world): "
          f"train {d['train']:,}, val {d['val']:,}, test {d['test']:,}")
    print(f"model {st['model']}, batch {st['batch_size']}, {st['precision']}, {st['workers']} worker "
          f"({'1 GPU, ' if st['use_gpu'] else ''}{st['cpus_per_worker']:g} of {st['cluster_cpus']:g} CPUs, "
          f"{st['threads']} torch threads)\n")
    print("training samples/s")
    which = f"median of epochs 2..{rt['epochs']}" if rt["epochs"] > 1 else "its one epoch"
    print(f"  Ray Train (launch.train.train)      {rt['samples_per_s']:10,.0f}   {which}; per epoch "
          f"{[round(r) for r in rt['per_epoch_samples_per_s']]}")
    print(f"  bare PyTorch step loop              {s['bare_loop']['samples_per_s']:10,.0f}   the limit: 8 batches "
          f"kept on the device, {s['bare_loop']['steps']} steps")
    print(f"  Ray Train / bare                    {s['ratio_ray_over_bare']:10.3f}")
    print(f"  ingest alone (Ray Data -> batches)  {s['ingest']['samples_per_s']:10,.0f}   "
          f"{s['ingest_over_bare']:.2f}x the bare loop; one epoch, first batch after "
          f"{s['ingest']['first_batch_s']:.1f} s\n")
    print(format_table(rows, title=f"test split ({d['test']:,} samples), best of {rt['epochs']} epoch(s)"))
    m = rows["model"]["p68_m"]
    ratios = ", ".join(f"{m / rows[k]['p68_m']:.2f} of the {k}'s" for k in ("physics baseline", "centroid")
                       if k in rows)
    print(f"test P68 {m:,.0f} m = {ratios}\n")
    print("stages (s): " + ", ".join(f"{k} {v:.0f}" for k, v in s["stages_s"].items()) + f"; total {s['wall_s']:.0f}")
    print(f"summary: {path}\n{line}")


if __name__ == "__main__":
    main()
