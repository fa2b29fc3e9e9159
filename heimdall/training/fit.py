"""One fit function on one device, no Ray. The Ray Train worker calls this same function with
its strategy, environment, callbacks and loaders, so the two paths cannot drift."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping

from heimdall import faults
from heimdall.training.callbacks import (AtomicCheckpointIO, CommitCheckpoint, EpochHistory, EpochProgress,
                               remove_partial_writes, write_atomic, write_metrics_csv)
from heimdall.config import FitConfig, flatten
from heimdall.data.dataset import Dataset
from heimdall.evaluation.evaluate import comparison_rows, predict_split
from heimdall.training.module import LocalizationModule
from heimdall.training.loader import SplitStream, make_loader
from heimdall.evaluation.metrics import MONITOR, format_table
from heimdall.model.normalization import fit_normalization
from heimdall.training.prefetch import DevicePrefetch
from heimdall.training.run_record import RunRecord, jsonable


@dataclass
class FitResult:
    best_checkpoint: str
    last_checkpoint: str
    val_metrics: dict[str, float]
    test_rows: dict[str, dict[str, float]] = field(default_factory=dict)
    epochs_run: int = 0
    already_finished: bool = False


@dataclass
class Loaders:
    """Where batches come from: SplitStream DataLoaders here, Ray Data iterators under Ray Train."""
    train: Iterable
    val: Iterable


def precision_for(config: FitConfig) -> str:
    if config.trainer.precision != "auto":
        return config.trainer.precision
    return "bf16-mixed" if _use_gpu(config) else "32-true"


def _use_gpu(config: FitConfig) -> bool:
    return config.trainer.accelerator == "gpu" or (config.trainer.accelerator == "auto" and torch.cuda.is_available())


def local_loaders(config: FitConfig, dataset: Dataset, module: LocalizationModule) -> Loaders:
    ref = (float(module.model.ref_lat), float(module.model.ref_lon))
    train = SplitStream(dataset, "train", config.data.batch_size, *ref, shuffle_seed=config.trainer.seed)
    val = SplitStream(dataset, "val", config.data.eval_batch_size, *ref)
    return Loaders(make_loader(train, config.data.loader_workers), make_loader(val, config.data.loader_workers))


def build_module(config: FitConfig, dataset: Dataset, world_size: int = 1) -> LocalizationModule:
    steps_per_epoch = max(1, dataset.count("train") // (config.data.batch_size * world_size))
    module = LocalizationModule(config.model.model_dump(), config.optim.model_dump(),
                                total_steps=steps_per_epoch * config.trainer.max_epochs, data=dataset.describe())
    fit_normalization(module.model, dataset, config.data.normalization_samples)
    return module


def fit(config: FitConfig, *, loaders: Callable[[FitConfig, Dataset, LocalizationModule], Loaders] = local_loaders,
        world_size: int = 1, trainer_kwargs: dict[str, Any] | None = None, callbacks: list[L.Callback] = (),
        local_outputs: bool = True, ckpt_path: str | None = None, prepare: Callable[[L.Trainer], L.Trainer] = None,
        resume: bool = False, log=print) -> FitResult:
    """Train LocalizationNet as configured; returns checkpoints and metrics.

    With the defaults this is the plain single-device run: checkpoints, metrics.csv, config, test
    table and plots under trainer.out_dir, continuing from its last.ckpt when the config is the
    same (`resume` continues with a changed one). The Ray worker passes its loaders, strategy
    (`trainer_kwargs`), report callback and checkpoint, and `local_outputs=False`: Ray Train owns
    checkpoints and the driver writes the outputs.
    """
    out = Path(config.trainer.out_dir).expanduser().resolve()
    record = RunRecord.at(str(out)) if local_outputs else None
    if record:
        stored = record.check(jsonable(flatten(config)), resume, f"fit run {out}", "trainer.out_dir",
                              progress=(out / "checkpoints" / "last.ckpt").exists())
        if stored and stored["status"] == "finished":
            log(f"{out}: already finished ({stored['updated']}); best checkpoint {stored['best_checkpoint']}")
            return FitResult(stored["best_checkpoint"], stored["last_checkpoint"], stored["val_metrics"],
                             stored["test_rows"], stored["epochs_run"], already_finished=True)
        if stored:  # trained: only the final step is left
            return finish_fit(config, Dataset.open(config.data.uri), record, FitResult(
                stored["best_checkpoint"], stored["last_checkpoint"], stored["val_metrics"],
                epochs_run=stored["epochs_run"]), stored["history"], log)
    L.seed_everything(config.trainer.seed, workers=True, verbose=False)
    if config.trainer.threads:
        torch.set_num_threads(config.trainer.threads)
    dataset = Dataset.open(config.data.uri)
    module = build_module(config, dataset, world_size)
    data = loaders(config, dataset, module)
    history = EpochHistory()
    own = [CommitCheckpoint(lambda _: write_metrics_csv(history.rows, out / "metrics.csv"),
                            dirpath=out / "checkpoints", filename="best", monitor=MONITOR, mode="min", save_top_k=1,
                            auto_insert_metric_name=False)] if local_outputs else []
    kwargs = dict(
        max_epochs=config.trainer.max_epochs, accelerator="gpu" if _use_gpu(config) else "cpu", devices=1,
        precision=precision_for(config), gradient_clip_val=config.optim.grad_clip,
        callbacks=[*own, EarlyStopping(MONITOR, mode="min", patience=config.trainer.patience),
                   EpochProgress(log if config.trainer.progress else None), history, *callbacks],
        plugins=[AtomicCheckpointIO()] if local_outputs else None, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=local_outputs,
        num_sanity_val_steps=0, deterministic=False, default_root_dir=out, log_every_n_steps=10,
    )
    kwargs.update(trainer_kwargs or {})
    trainer = L.Trainer(**kwargs)
    if prepare is not None:
        trainer = prepare(trainer)
    device, depth = trainer.strategy.root_device, config.data.prefetch_batches
    data = Loaders(DevicePrefetch(data.train, device, depth), DevicePrefetch(data.val, device, depth))
    if local_outputs and ckpt_path is None and (out / "checkpoints" / "last.ckpt").exists():
        ckpt_path = str(out / "checkpoints" / "last.ckpt")
    if ckpt_path:
        log(f"resuming from {ckpt_path}")
    if record:
        record.start(jsonable(flatten(config)))
        remove_partial_writes(out / "checkpoints")
        (out / "config.yaml").write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
    trainer.fit(module, data.train, data.val, ckpt_path=ckpt_path)
    best = own[0] if own else None
    result = FitResult(best_checkpoint=(best.best_model_path or best.last_model_path) if best else "",
                       last_checkpoint=best.last_model_path if best else "",
                       val_metrics={k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")},
                       epochs_run=trainer.current_epoch)
    if not record:
        return result
    write_metrics_csv(history.rows, out / "metrics.csv")  # a resume that trained no epoch still has its file
    record.save(status="trained", best_checkpoint=result.best_checkpoint, last_checkpoint=result.last_checkpoint,
                val_metrics=result.val_metrics, epochs_run=result.epochs_run, history=history.rows)
    return finish_fit(config, dataset, record, result, history.rows, log)


def finish_fit(config: FitConfig, dataset: Dataset, record: RunRecord, result: FitResult, history: list[dict],
               log) -> FitResult:
    """The final step of a trained `fit` run: test table, plots, and the record marked finished."""
    out = Path(record.folder)
    result.test_rows = evaluate_checkpoint(result.best_checkpoint, dataset, "test", config.data.eval_batch_size,
                                           plots_dir=out / "plots", log=log)
    faults.maybe_kill("driver_final")
    (out / "test_metrics.json").write_text(json.dumps(result.test_rows, indent=1))
    from heimdall.evaluation import plots

    plots.training_curves(history, out / "plots" / "training_curves.png")
    # The same summary as `heimdall train` writes: the input of `heimdall export --from OUT_DIR`.
    summary = {"run_name": out.name, "best_checkpoint_uri": str(Path(result.best_checkpoint).resolve()),
               "best_val": result.val_metrics, "test": result.test_rows, "mlflow_run_id": None}
    write_atomic(out / "train_summary.json", json.dumps(summary, indent=1).encode())
    record.save(status="finished", test_rows=result.test_rows)
    return result


def evaluate_checkpoint(path: str, dataset: Dataset, split: str, batch_size: int, plots_dir: Path | None = None,
                        device: str = "cpu", log=print) -> dict[str, dict[str, float]]:
    module = LocalizationModule.load_from_checkpoint(path, map_location="cpu")
    pred = predict_split(module.model, dataset, split, batch_size, device=device)
    rows = comparison_rows(pred)
    log(format_table(rows, title=f"{split} split ({len(pred['error_m'])} samples), checkpoint {path}"))
    if plots_dir is not None:
        from heimdall.evaluation import plots  # matplotlib only when plotting: lean GPU images lack it

        errors = {"model": pred["error_m"], "centroid": pred["centroid_error_m"]}
        if "baseline_error_m" in pred:
            errors["physics baseline"] = pred["baseline_error_m"]
        plots.error_cdf(errors, plots_dir / f"{split}_error_cdf.png")
        pred["ref"] = (float(module.model.ref_lat), float(module.model.ref_lon))
        plots.prediction_map(pred, dataset.manifest["receivers"], plots_dir / f"{split}_prediction_map.png")
    return rows
