"""`heimdall train`: the Lightning fit of heimdall.fit under Ray Train's TorchTrainer (Train V2).

Driver: check everything that can fail fast (config, dataset, storage, MLflow, resources) before a
worker starts, then fit, then evaluate the best checkpoint on the test split. Workers: the same
`heimdall.fit.fit` as `heimdall fit`, with Ray's DDP strategy, Ray Data batches and a report callback.
"""
from __future__ import annotations

import json
import logging
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import ray
import ray.train
import yaml
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from heimdall import storage
from heimdall.config import ConfigError, TrainConfig, flatten
from heimdall.dataset import Dataset
from heimdall.metrics import MONITOR, format_table
from heimdall.tracking import RunTracker, git_commit, redact, resolve_tracking_uri, run_key
from launch.cluster import WorkerPlan, connect, plan_workers
from launch.ingest import train_val_datasets

CHECKPOINT_FILE = "checkpoint.ckpt"  # what RayTrainReportCallback writes inside each Ray checkpoint


@dataclass
class TrainOutcome:
    best_checkpoint_uri: str
    best_val: dict[str, float]
    test_rows: dict[str, dict[str, float]] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    resumed: bool = False
    out_dir: str = ""


def absolute(config: TrainConfig) -> TrainConfig:
    """Workers may run in another directory: local paths become absolute before they start."""
    def fix(uri: str) -> str:
        return uri if "://" in uri else str(Path(uri).expanduser().resolve())
    c = config.model_copy(deep=True)
    c.data.uri, c.run.storage_path, c.trainer.out_dir = fix(c.data.uri), fix(c.run.storage_path), fix(c.trainer.out_dir)
    return c


def check_storage(uri: str):
    """Run storage must be writable now, not after the first epoch: probe it (seconds, bounded)."""
    fs, root = storage.resolve(uri)
    try:
        storage.write_bytes_atomic(fs, storage.join(root, ".heimdall-write-probe"), b"ok")
        fs.delete_file(storage.join(root, ".heimdall-write-probe"))
    except OSError as e:
        raise ConfigError(f"run.storage_path {redact(uri)} is not writable: {redact(e)}") from None
    return fs, root


def checkpoint_uri(checkpoint: ray.train.Checkpoint, storage_path: str) -> str:
    return f"s3://{checkpoint.path}" if storage_path.startswith("s3://") else checkpoint.path


@dataclass
class Prepared:
    """A run's config with absolute paths, its opened dataset and its checked storage."""
    config: TrainConfig
    dataset: Dataset
    fs: object
    root: str


def prepare(config: TrainConfig) -> Prepared:
    config = absolute(config)
    dataset = Dataset.open(config.data.uri)
    fs, root = check_storage(config.run.storage_path)
    return Prepared(config, dataset, fs, root)


def apply_plan(config: TrainConfig, plan: WorkerPlan) -> None:
    config.trainer.threads = plan.threads
    config.trainer.accelerator = "gpu" if plan.use_gpu else "cpu"


def fit_on_ray(p: Prepared, plan: WorkerPlan, mlflow: dict | None, callbacks: list = ()):
    """Build and fit the TorchTrainer; returns Ray's Result (raises TrainingFailedError)."""
    c = p.config
    apply_plan(c, plan)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": c.model_dump(), "mlflow": mlflow},
        scaling_config=ScalingConfig(num_workers=plan.num_workers, use_gpu=plan.use_gpu,
                                     resources_per_worker={"CPU": plan.cpus_per_worker}),
        run_config=RunConfig(
            name=c.run.name, storage_path=p.root,
            storage_filesystem=p.fs if c.run.storage_path.startswith("s3://") else None,
            checkpoint_config=CheckpointConfig(num_to_keep=c.run.keep_checkpoints,
                                               checkpoint_score_attribute=MONITOR, checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=c.run.max_failures), callbacks=list(callbacks)),
        datasets=train_val_datasets(p.dataset, c.trainer.seed, plan.read_cpus),
        dataset_config=DataConfig(datasets_to_split=["train", "val"]),
    ).fit()


def train(config: TrainConfig, log=print) -> TrainOutcome:
    p = prepare(config)
    config = p.config
    tracker = RunTracker(resolve_tracking_uri(config.mlflow.tracking_uri), config.mlflow.experiment) \
        if config.mlflow.enabled else None
    connect(log)
    plan = plan_workers(config.ray, ray.cluster_resources())
    apply_plan(config, plan)  # MLflow params show the resolved threads and accelerator
    log(f"{plan.num_workers} worker(s), {'1 GPU' if plan.use_gpu else 'no GPU'} and {plan.cpus_per_worker:g} CPU each "
        f"({plan.threads} torch thread(s)); Ray Data read tasks {plan.read_cpus:g} CPU")
    resumed = False
    if tracker:
        resumed = tracker.open(run_key(config.run.storage_path, config.run.name), config.run.name,
                               params=flatten(config), tags=run_tags(config, p.dataset))
        log(f"MLflow run {tracker.run_id} at {redact(tracker.uri)}{' (resumed)' if resumed else ''}")
    try:
        result = fit_on_ray(p, plan, {"uri": tracker.uri, "run_id": tracker.run_id} if tracker else None)
    except ray.train.TrainingFailedError as e:
        if tracker:
            tracker.finish("FAILED")
        raise RuntimeError(f"training failed: {redact(e)}") from None
    outcome = finish(config, p.dataset, plan, result, tracker, log)
    outcome.resumed = resumed
    return outcome


def run_tags(config: TrainConfig, dataset: Dataset) -> dict[str, str]:
    import heimdall

    return {"heimdall.version": heimdall.__version__, "git_commit": git_commit(),
            "dataset.manifest_sha256": dataset.manifest_sha256, "dataset.uri": config.data.uri,
            "ray.run_name": config.run.name, "ray.storage_path": config.run.storage_path}


def finish(config: TrainConfig, dataset: Dataset, plan: WorkerPlan, result, tracker: RunTracker | None,
           log) -> TrainOutcome:
    if not result.best_checkpoints:
        raise RuntimeError(f"run {config.run.name} reported no checkpoint (no epoch finished?)")
    best, best_metrics = min(result.best_checkpoints, key=lambda cm: cm[1][MONITOR])
    uri = checkpoint_uri(best, config.run.storage_path)
    rows, pngs = ray.get(evaluate_best.options(num_cpus=plan.cpus_per_worker, num_gpus=int(plan.use_gpu)).remote(
        best, config.data.uri, config.data.eval_batch_size))
    out = Path(config.trainer.out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
    (out / "test_metrics.json").write_text(json.dumps(rows, indent=1))
    for name, data in pngs.items():
        (out / "plots" / name).write_bytes(data)
    log(format_table(rows, title=f"test split ({dataset.count('test')} samples), best checkpoint (epoch "
                                 f"{int(best_metrics['epoch']) + 1}, {MONITOR} {best_metrics[MONITOR]:,.0f})"))
    log(f"best checkpoint: {uri}/{CHECKPOINT_FILE}")
    outcome = TrainOutcome(best_checkpoint_uri=f"{uri}/{CHECKPOINT_FILE}", test_rows=rows, out_dir=str(out),
                           best_val={k: v for k, v in best_metrics.items() if k.startswith("val_")})
    summary = {"run_name": config.run.name, "best_checkpoint_uri": outcome.best_checkpoint_uri,
               "best_val": outcome.best_val, "test": rows, "mlflow_run_id": tracker.run_id if tracker else None}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1))  # the input of `heimdall export`
    if tracker:
        from heimdall import plots

        plots.training_curves(tracker.epoch_rows(), out / "plots" / "training_curves.png")
        tracker.log_metrics({f"test_{k}": v for k, v in rows["model"].items()})
        tracker.client.set_tag(tracker.run_id, "best_checkpoint", redact(outcome.best_checkpoint_uri))
        tracker.log_artifacts([out / "config.yaml", out / "test_metrics.json", out / "train_summary.json"])
        tracker.log_artifacts(sorted((out / "plots").glob("*.png")), "plots")
        tracker.finish()
        outcome.mlflow_run_id = tracker.run_id
    log(f"outputs: {out}")
    return outcome


@ray.remote
def evaluate_best(checkpoint: ray.train.Checkpoint, data_uri: str, batch_size: int):
    """Test-split table and plots of a checkpoint, on a worker-sized slot (GPU if training had one)."""
    import torch

    from heimdall.fit import evaluate_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint.to_directory(f"{tmp}/ckpt")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        rows = evaluate_checkpoint(f"{path}/{CHECKPOINT_FILE}", Dataset.open(data_uri), "test", batch_size,
                                   plots_dir=Path(tmp) / "plots" if has_matplotlib() else None, device=device,
                                   log=lambda *_: None)
        return rows, {p.name: p.read_bytes() for p in (Path(tmp) / "plots").glob("*.png")}


def has_matplotlib() -> bool:
    """Plots are optional here: lean GPU images have no matplotlib, and the test table still comes back."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, RayTrainReportCallback, prepare_trainer

    from heimdall.fit import Loaders, fit
    from heimdall.callbacks import EpochMetricsLogger
    from launch.ingest import ShardBatches

    quiet_worker()
    config = TrainConfig.model_validate(loop_config["config"])
    world = ray.train.get_context().get_world_size()

    def loaders(cfg, dataset, module):
        ref = (float(module.model.ref_lat), float(module.model.ref_lon))
        train = ShardBatches(ray.train.get_dataset_shard("train"), dataset, "train", cfg.data.batch_size, *ref,
                             drop_last=True, prestart=True)
        val = ShardBatches(ray.train.get_dataset_shard("val"), dataset, "val", cfg.data.eval_batch_size, *ref,
                           drop_last=False)
        return Loaders(train, val)

    callbacks = [RayTrainReportCallback()]
    if loop_config["mlflow"]:
        callbacks.insert(0, EpochMetricsLogger(loop_config["mlflow"]["uri"], loop_config["mlflow"]["run_id"]))
    checkpoint = ray.train.get_checkpoint()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_path = f"{checkpoint.to_directory(tmp)}/{CHECKPOINT_FILE}" if checkpoint else None
        fit(config, loaders=loaders, world_size=world, callbacks=callbacks, local_outputs=False, ckpt_path=ckpt_path,
            trainer_kwargs=dict(strategy=RayDDPStrategy(), plugins=[RayLightningEnvironment()], devices="auto"),
            prepare=prepare_trainer, log=worker_log)


def worker_log(message: str) -> None:
    # Ray Train patches print() to log *and* echo (every line twice in the driver's console).
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def quiet_worker() -> None:
    """Per-report INFO lines and library deprecation notices drown the per-epoch progress."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for pattern in (".*LeafSpec.*", ".*all_gather is deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern)
