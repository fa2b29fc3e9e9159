"""The GPU check (run it through bench/gpu_check.sh): in one command on one GPU, in at most 6 minutes,

1. synthesise a dataset (`heimdall data synth`, every core),
2. time a bare PyTorch step loop of the model (batches already on the device: the limit),
3. time Ray Data ingest alone (read -> decoded batches on the device, as bench/ingest.py),
4. profile a training step of `heimdall fit` on the old data path (data.prefetch_batches=0) and the
   new one: milliseconds per step by Lightning action, GPU kernel time (bench/profile_step.py),
5. train with plain Lightning (`heimdall.training.fit.fit`, default config) and under Ray Train (1 worker,
   MLflow off), each on the new and the old data path, for a few epochs: `train_samples_per_s`
   (training window) and `epoch_samples_per_s` (whole epochs: validation and checkpoints too),
   medians of epochs 2..N, as fractions of the bare loop,
6. evaluate the Ray Train run's best checkpoint on the test split beside the physics baseline and
   the centroid,

and print one summary (also JSON). Steps 2 and 3 run as Ray tasks holding what a training worker
holds (its CPUs, its GPU). --cpu-smoke runs the same steps with tiny sizes, fp32, on CPU.
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

import lightning as L
import ray
import torch

from heimdall.config import FitConfig, TrainConfig, load_config
from heimdall.data.dataset import Dataset
from heimdall.evaluation.metrics import SplitReport
from launch.cluster import connect, plan_workers
from launch.train import EPOCHS_FILE, apply_plan, fit_on_ray, prepare, train

sys.path.insert(0, str(Path(__file__).parent))
import bare_loop as _bare  # noqa: E402
import profile_step  # noqa: E402

ray.cloudpickle.register_pickle_by_value(_bare)  # Ray workers do not have bench/ on their path
bare_loop = _bare.bare_loop

GPU = dict(samples=60_000, size="base", batch=256, precision="bf16-mixed", bare_s=10.0, epochs=4, profile_steps=60)
SMOKE = dict(samples=600, size="base", batch=64, precision="32-true", bare_s=3.0, epochs=2, profile_steps=6)
TARGET_STEP, TARGET_WALL = 0.90, 0.80  # of the bare loop: training window, whole epochs


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
            n += len(b["rx_state"])
    if device == "cuda":
        torch.cuda.synchronize()
    return {"samples_per_s": n / (time.perf_counter() - first), "first_batch_s": first - start}


def steady(rows: list[dict], key: str) -> float | None:
    """Median of epochs 2..N (epoch 1 holds start-up: first batches, cuDNN autotuning)."""
    rates = [r[key] for r in rows if key in r]
    return statistics.median(rates[1:] if len(rates) > 1 else rates) if rates else None


def rates(rows: list[dict], bare: float) -> dict:
    out = {"epochs": len(rows), "per_epoch_samples_per_s": [round(r.get("train_samples_per_s", 0)) for r in rows]}
    for key, name in (("train_samples_per_s", "samples_per_s"), ("epoch_samples_per_s", "wall_samples_per_s")):
        out[name] = steady(rows, key)
        out[name.replace("samples_per_s", "over_bare")] = out[name] / bare if out[name] else None
    return out


class Epochs(L.Callback):
    """Each epoch's metrics as `fit` logged them (this callback runs after heimdall's own)."""

    def __init__(self):
        self.rows: list[dict] = []

    def on_train_epoch_end(self, trainer, module):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def plain_fit(config: FitConfig, epochs: int, out: Path) -> list[dict]:
    """`heimdall fit` as configured, checkpoint every epoch, without its final test table (the Ray
    Train run's is the one reported)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from heimdall.data.dataset import Dataset
    from heimdall.training.fit import build_module, local_loaders, make_trainer, run, seed_everything

    c = config.model_copy(deep=True)
    c.trainer.max_epochs = c.trainer.patience = epochs
    c.trainer.out_dir, c.trainer.progress = str(out), False
    seen, quiet = Epochs(), (lambda *_: None)
    seed_everything(c)
    dataset = Dataset.open(c.data.uri)
    module = build_module(c, dataset)
    trainer = make_trainer(c, [seen, ModelCheckpoint(dirpath=out, save_last=True, save_on_train_epoch_end=True)],
                           quiet, enable_checkpointing=True, default_root_dir=out)
    run(trainer, module, local_loaders(c, dataset, module), c, None, quiet)
    return seen.rows


def ray_epochs(storage: Path) -> list[dict]:
    last = sorted(storage.glob(f"epoch_*/{EPOCHS_FILE}"))
    return json.loads(last[-1].read_text()) if last else []


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes, fp32, CPU: the same steps in a few minutes")
    p.add_argument("--samples", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--iq-length", type=int, default=1024)
    p.add_argument("--world-preset", default="default")
    p.add_argument("--out", default="runs/gpu_check")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training config overrides (data.batch_size=128)")
    args = p.parse_args()
    t0 = time.time()
    s = dict(SMOKE if args.cpu_smoke else GPU)
    samples, epochs = args.samples or s["samples"], args.epochs or s["epochs"]
    out = Path(args.out).resolve()
    summary_path = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else out / "summary.json"
    stages: dict[str, float] = {}
    if os.environ.get("GPU_CHECK_WHEELS_S"):
        stages["wheels"] = float(os.environ["GPU_CHECK_WHEELS_S"])
    summary = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu", "complete": False, "stages_s": stages,
               "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
               "lightning": version("lightning"), "commit": git_commit(), "date": time.strftime("%Y-%m-%d")}

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
        for old in (out / "ray", out / "train", out / "fit"):  # a fresh run each time; the dataset is reused
            shutil.rmtree(old, ignore_errors=True)
        cluster = stage("ray_start", connect)
        # SIGTERM from the outer `timeout`: unwind, so Ray is shut down and the partial summary written. Set after
        # ray.init, whose own handler dumps a stack trace and exits, leaving the local Ray running.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
        if os.environ.get("GPU_CHECK_SESSION_FILE"):  # for gpu_check.sh, should this process be killed outright
            session = ray._private.worker._global_node.get_session_dir_path()
            Path(os.environ["GPU_CHECK_SESSION_FILE"]).write_text(session)
        if not args.cpu_smoke and ray.cluster_resources().get("GPU", 0) < 1:
            raise SystemExit("no GPU in the local Ray: run the CPU smoke mode instead (GPU_CHECK_CPU=1)")
        if not (data / "manifest.json").exists():
            cmd = [sys.executable, "-m", "launch.cli", "data", "synth", "--out", str(data), "--samples", str(samples),
                   "--iq-length", str(args.iq_length), "--workers", str(int(ray.cluster_resources()["CPU"])),
                   "--world-preset", args.world_preset, "--overwrite"]
            stage("synth", lambda: subprocess.run(cmd, check=True))
        dataset = Dataset.open(str(data))
        counts = {k: dataset.count(k) for k in ("train", "val", "test")}
        summary["dataset"] = {"uri": str(data), "samples": samples, "receivers": dataset.num_receivers,
                              "iq_length": dataset.iq_length, "world_preset": args.world_preset, **counts}
        common = [f"data.uri={data}", f"model.size={s['size']}", f"data.batch_size={s['batch']}",
                  f"trainer.precision={s['precision']}", f"trainer.max_epochs={epochs}", f"trainer.patience={epochs}",
                  f"run.storage_path={out / 'ray'}", "mlflow.enabled=false",
                  *(["ray.use_gpu=false", "trainer.accelerator=cpu"] if args.cpu_smoke else []), *args.overrides]
        config = load_config(None, [*common, f"trainer.out_dir={out / 'train'}", "run.name=new"], TrainConfig)
        plan = plan_workers(config.ray, cluster)
        apply_plan(config, plan)
        summary["setup"] = {"model": config.model.size, "batch_size": config.data.batch_size,
                            "precision": config.trainer.precision, "epochs": epochs, "workers": plan.workers,
                            "use_gpu": plan.use_gpu, "cpus_per_worker": plan.cpus_per_worker, "threads": plan.threads,
                            "cluster_cpus": ray.cluster_resources().get("CPU"),
                            "prefetch_batches": config.data.prefetch_batches}
        slot = dict(num_cpus=plan.cpus_per_worker, num_gpus=int(plan.use_gpu))  # what one training worker holds
        bare = stage("bare_loop", lambda: ray.get(ray.remote(bare_loop).options(**slot).remote(
            config.model_dump(), s["bare_s"])))
        summary["device"] = bare.pop("device")
        summary["bare_loop"] = bare
        summary["ingest"] = stage("ingest", lambda: ray.get(ray.remote(ingest).options(**slot).remote(
            config.model_dump(), plan.read_cpus)))
        rate = bare["samples_per_s"]

        # Plain Lightning in this process (it holds no GPU while no Ray task runs).
        fit_config = FitConfig.model_validate(config.model_dump(include={"data", "model", "optim", "trainer"}))
        fit_config.trainer.accelerator = "cpu" if args.cpu_smoke else "gpu"
        old = fit_config.model_copy(deep=True)
        old.data.prefetch_batches = 0
        summary["profile_ms_per_step"] = stage("profile", lambda: {
            "old": profile_step.profile(old, s["profile_steps"]),
            "new": profile_step.profile(fit_config, s["profile_steps"])})
        summary["fit"] = rates(stage("fit", plain_fit, fit_config, epochs, out / "fit" / "new"), rate)
        summary["fit_old_path"] = rates(stage("fit_old_path", plain_fit, old, epochs, out / "fit" / "old"), rate)

        # Ray Train, 1 worker: the old path for throughput only, then the new one with its test table.
        old_train = load_config(None, [*common, f"trainer.out_dir={out / 'train-old'}", "run.name=old",
                                       "data.prefetch_batches=0"], TrainConfig)
        stage("ray_train_old_path", lambda: fit_on_ray(prepare(old_train), plan, None))
        summary["ray_train_old_path"] = rates(ray_epochs(out / "ray" / "old"), rate)
        outcome = stage("ray_train", train, config)
        summary["ray_train"] = rates(ray_epochs(out / "ray" / "new"), rate)
        summary["ray_train"].update(best_val=outcome.best_val, best_checkpoint=outcome.best_checkpoint_uri)
        summary["test"] = outcome.test.to_json()
        summary["complete"] = True
    finally:
        ray.shutdown()
        save()
        if "bare_loop" in summary:  # also after a stop part-way: what was measured
            report(summary, summary_path)


def git_commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                       cwd=Path(__file__).parent)
    return r.stdout.strip() or "unknown (no git here)"


def report(s: dict, path: Path) -> None:
    d, st = s["dataset"], s["setup"]
    line = "=" * 100
    print(f"\n{line}\nGPU check ({s['mode']}) finished in {s['wall_s'] / 60:.1f} min on {s['device']}, "
          f"commit {s['commit']}, {s['date']}")
    print(f"python {s['python']}, torch {s['torch']}, lightning {s['lightning']}, ray {s['ray']}")
    print(f"dataset {d['samples']:,} x {d['receivers']} receivers x {d['iq_length']} IQ ({d['world_preset']} world): "
          f"train {d['train']:,}, val {d['val']:,}, test {d['test']:,}")
    print(f"model {st['model']}, batch {st['batch_size']}, {st['precision']}, {st['epochs']} epochs; Ray Train: "
          f"{st['workers']} worker ({'1 GPU, ' if st['use_gpu'] else ''}{st['cpus_per_worker']:g} of "
          f"{st['cluster_cpus']:g} CPUs, {st['threads']} torch threads)\n")
    bare = s["bare_loop"]["samples_per_s"]
    print(f"training samples/s (median of epochs 2..N)   training window          whole epochs")
    print(f"  bare PyTorch step loop (the limit)    {bare:10,.0f}")
    for key, name in (("fit", "plain fit (heimdall fit)"), ("ray_train", "Ray Train, 1 worker"),
                      ("fit_old_path", "plain fit, old data path"), ("ray_train_old_path", "Ray Train, old data path")):
        r = s.get(key)
        if r and r.get("samples_per_s"):
            wall = f"{r['wall_samples_per_s']:10,.0f} {r['wall_over_bare']:6.3f}" if r.get("wall_samples_per_s") else ""
            print(f"  {name:36s}  {r['samples_per_s']:10,.0f} {r['over_bare']:6.3f}   {wall}")
    print(f"  targets: training window >= {TARGET_STEP} of the bare loop, whole epochs >= {TARGET_WALL}")
    if "ingest" in s:
        print(f"  ingest alone (Ray Data -> batches)    {s['ingest']['samples_per_s']:10,.0f}   "
              f"{s['ingest']['samples_per_s'] / bare:.2f}x the bare loop\n")
    if "profile_ms_per_step" in s:
        p = s["profile_ms_per_step"]
        print(profile_step.table({"old: data.prefetch_batches=0": p["old"], "new": p["new"]}) + "\n")
    if s.get("test"):
        test = SplitReport.from_json(s["test"])
        print(test.table(f"test split ({d['test']:,} samples), Ray Train run's best checkpoint"))
        m = test.model.p68_m
        ratios = ", ".join(f"{m / test[k].p68_m:.2f} of the {k}'s" for k in ("reference", "physics baseline", "centroid")
                           if k in test)
        print(f"test P68 {m:,.0f} m = {ratios}\n")
    print("stages (s): " + ", ".join(f"{k} {v:.0f}" for k, v in s["stages_s"].items()) + f"; total {s['wall_s']:.0f}")
    print(f"summary: {path}\n{line}")


if __name__ == "__main__":
    main()
