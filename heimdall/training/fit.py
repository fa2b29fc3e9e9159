"""Training parts (module, trainer, loaders, run) and the local recipe, `fit`: one device, no Ray.

The Ray Train worker (launch/worker.py) is the other recipe, built from the same parts: its own
loaders (Ray Data shards), strategy and report callback, and no local outputs (Ray Train owns the
checkpoints, the driver writes the outputs).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping

from heimdall import faults
from heimdall.config import MONITORS, FitConfig, flatten
from heimdall.data.dataset import Dataset
from heimdall.evaluation.metrics import SplitReport
from heimdall.model.normalization import fit_normalization
from heimdall.training.callbacks import (AtomicCheckpointIO, CommitCheckpoint, EpochHistory, EpochProgress,
                                        remove_partial_writes, write_atomic, write_metrics_csv)
from heimdall.training.loader import SplitStream, make_loader
from heimdall.training.module import LocalizationModule
from heimdall.training.prefetch import DevicePrefetch
from heimdall.training.run_record import RunRecord, jsonable


@dataclass
class FitResult:
    best_checkpoint: str
    last_checkpoint: str
    val_metrics: dict[str, float]
    test: SplitReport | None = None
    epochs_run: int = 0
    already_finished: bool = False


@dataclass
class Loaders:
    """Where batches come from: SplitStream DataLoaders here, Ray Data shards under Ray Train."""
    train: Iterable
    val: Iterable


# ---- the parts ------------------------------------------------------------------------------------
def use_gpu(config: FitConfig) -> bool:
    return config.trainer.accelerator == "gpu" or (config.trainer.accelerator == "auto" and torch.cuda.is_available())


def precision_for(config: FitConfig) -> str:
    if config.trainer.precision != "auto":
        return config.trainer.precision
    return "bf16-mixed" if use_gpu(config) else "32-true"


def seed_everything(config: FitConfig) -> None:
    L.seed_everything(config.trainer.seed, workers=True, verbose=False)
    if config.trainer.threads:
        torch.set_num_threads(config.trainer.threads)


def build_module(config: FitConfig, dataset: Dataset, world_size: int = 1) -> LocalizationModule:
    steps_per_epoch = max(1, dataset.count("train") // (config.data.batch_size * world_size))
    module = LocalizationModule(config.model.model_dump(), config.optim.model_dump(),
                                total_steps=steps_per_epoch * config.trainer.max_epochs, data=dataset.describe())
    fit_normalization(module.model, dataset, config.data.normalization_samples)
    return module


def local_loaders(config: FitConfig, dataset: Dataset, module: LocalizationModule) -> Loaders:
    ref = (float(module.model.ref_lat), float(module.model.ref_lon))
    train = SplitStream(dataset, "train", config.data.batch_size, *ref, shuffle_seed=config.trainer.seed)
    val = SplitStream(dataset, "val", config.data.eval_batch_size, *ref)
    return Loaders(make_loader(train, config.data.loader_workers), make_loader(val, config.data.loader_workers))


def make_trainer(config: FitConfig, callbacks: list[L.Callback], log, **overrides) -> L.Trainer:
    """The Trainer both recipes use: early stopping on trainer.monitor and per-epoch progress, no logger or
    checkpointing of Lightning's own unless a recipe turns it on."""
    settings = dict(
        max_epochs=config.trainer.max_epochs, accelerator="gpu" if use_gpu(config) else "cpu", devices=1,
        precision=precision_for(config), gradient_clip_val=config.optim.grad_clip,
        callbacks=[EarlyStopping(config.trainer.monitor, mode=MONITORS[config.trainer.monitor],
                                 patience=config.trainer.patience),
                   EpochProgress(log if config.trainer.progress else None), *callbacks],
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0, deterministic=False, log_every_n_steps=10)
    return L.Trainer(**{**settings, **overrides})


def run(trainer: L.Trainer, module: LocalizationModule, loaders: Loaders, config: FitConfig,
        ckpt_path: str | None, log) -> None:
    """Fit with batches copied to the device ahead of the step that needs them."""
    device, depth = trainer.strategy.root_device, config.data.prefetch_batches
    if ckpt_path:
        log(f"resuming from {ckpt_path}")
    trainer.fit(module, DevicePrefetch(loaders.train, device, depth), DevicePrefetch(loaders.val, device, depth),
                ckpt_path=ckpt_path)


# ---- the local recipe -----------------------------------------------------------------------------
def fit(config: FitConfig, resume: bool = False, log=print) -> FitResult:
    """Train as configured on one device: checkpoints, metrics.csv, config, test table and plots
    under trainer.out_dir. The same command continues from last.ckpt when the config is the same
    (`resume` continues with a changed one); a finished run is reported, not rerun."""
    out = Path(config.trainer.out_dir).expanduser().resolve()
    record = RunRecord.at(str(out))
    last = out / "checkpoints" / "last.ckpt"
    stored = record.check(jsonable(flatten(config)), resume, f"fit run {out}", "trainer.out_dir", progress=last.exists())
    if stored and stored["status"] == "finished":
        log(f"{out}: already finished ({stored['updated']}); best checkpoint {stored['best_checkpoint']}")
        return FitResult(stored["best_checkpoint"], stored["last_checkpoint"], stored["val_metrics"],
                         SplitReport.from_json(stored["test"]), stored["epochs_run"], already_finished=True)
    dataset = Dataset.open(config.data.uri)
    if stored:  # trained: only the final step is left
        return finish_fit(config, dataset, record, FitResult(stored["best_checkpoint"], stored["last_checkpoint"],
                                                             stored["val_metrics"], epochs_run=stored["epochs_run"]),
                          stored["history"], log)
    seed_everything(config)
    module = build_module(config, dataset)
    history = EpochHistory()
    best = CommitCheckpoint(lambda _: write_metrics_csv(history.rows, out / "metrics.csv"), dirpath=out / "checkpoints",
                            filename="best", monitor=config.trainer.monitor,
                            mode=MONITORS[config.trainer.monitor], save_top_k=1, auto_insert_metric_name=False)
    trainer = make_trainer(config, [best, history], log, enable_checkpointing=True, plugins=[AtomicCheckpointIO()],
                           default_root_dir=out)
    record.start(jsonable(flatten(config)))
    remove_partial_writes(out / "checkpoints")
    (out / "config.yaml").write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
    run(trainer, module, local_loaders(config, dataset, module), config, str(last) if last.exists() else None, log)
    result = FitResult(best_checkpoint=best.best_model_path or best.last_model_path, last_checkpoint=best.last_model_path,
                       val_metrics={k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")},
                       epochs_run=trainer.current_epoch)
    write_metrics_csv(history.rows, out / "metrics.csv")  # a resume that trained no epoch still has its file
    record.save(status="trained", best_checkpoint=result.best_checkpoint, last_checkpoint=result.last_checkpoint,
                val_metrics=result.val_metrics, epochs_run=result.epochs_run, history=history.rows)
    return finish_fit(config, dataset, record, result, history.rows, log)


def finish_fit(config: FitConfig, dataset: Dataset, record: RunRecord, result: FitResult, history: list[dict],
               log) -> FitResult:
    """The final step of a trained `fit` run: test table, plots, and the record marked finished."""
    from heimdall.evaluation.evaluate import evaluate_checkpoint
    from heimdall.evaluation import plots

    out = Path(record.folder)
    result.test = evaluate_checkpoint(result.best_checkpoint, dataset, "test", config.data.eval_batch_size,
                                      plots_dir=out / "plots", log=log)
    faults.maybe_kill("driver_final")
    (out / "test_metrics.json").write_text(json.dumps(result.test.to_json(), indent=1))
    plots.training_curves(history, out / "plots" / "training_curves.png")
    # The same summary as `heimdall train` writes: the input of `heimdall export --from OUT_DIR`.
    summary = {"run_name": out.name, "best_checkpoint_uri": str(Path(result.best_checkpoint).resolve()),
               "best_val": result.val_metrics, "test": result.test.to_json(), "mlflow_run_id": None}
    write_atomic(out / "train_summary.json", json.dumps(summary, indent=1).encode())
    record.save(status="finished", test=result.test.to_json())
    return result
