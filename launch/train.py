"""`heimdall train`: the Lightning fit of heimdall.training.fit under Ray Train's TorchTrainer (Train V2).

Driver: check everything that can fail fast (config, dataset, storage, MLflow, resources) before a
worker starts, then fit, then evaluate the best checkpoint on the test split. Workers run
launch.worker: the parts of `heimdall fit`'s recipe, with Ray's DDP strategy, Ray Data batches and a
report callback.

Exactly once: an epoch is committed when Ray Train has recorded its checkpoint. Its metrics reach
MLflow only after that, from the controller (`EpochsToMLflow`), and the driver sends whatever the
latest checkpoint holds that MLflow lacks at the end. A kill before the commit reruns the epoch,
which nobody has seen yet; a kill after it never reruns it.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import ray
import ray.train
import yaml
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchTrainer

from heimdall import faults, storage
from heimdall.config import MONITORS, ConfigError, TrainConfig, flatten
from heimdall.data.dataset import Dataset
from heimdall.storage import CHECKPOINT_FILE
from heimdall.evaluation.metrics import SplitReport
from heimdall.training.run_record import RunRecord, jsonable
from heimdall.tracking import EpochLog, RunTracker, git_commit, redact, resolve_tracking_uri, run_key
from launch.cluster import (Cluster, WorkerPlan, check_shared_storage, connect, describe_plan, joining,
                            plan_workers)
from launch.ingest import TrainSplit, split_dataset

EPOCHS_DONE = "epochs_done"  # reported to Tune beside the epoch's metrics: schedulers count model epochs
EPOCHS_FILE = "epochs.json"  # beside it: every epoch's metrics up to this one
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's committed checkpoints


@dataclass
class TrainOutcome:
    best_checkpoint_uri: str
    best_val: dict[str, float]
    test: SplitReport | None = None
    mlflow_run_id: str | None = None
    resumed: bool = False
    out_dir: str = ""
    already_finished: bool = False


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
    epochs_to_mlflow = [EpochsToMLflow(mlflow["uri"], mlflow["run_id"], faults.settings())] if mlflow else []
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": c.model_dump(), "faults": faults.settings()},
        scaling_config=ScalingConfig(num_workers=(plan.min_workers, plan.num_workers) if plan.elastic else plan.num_workers,
                                     elastic_resize_monitor_interval_s=plan.resize_interval_s, use_gpu=plan.use_gpu,
                                     resources_per_worker={"CPU": plan.cpus_per_worker}),
        run_config=RunConfig(
            name=c.run.name, storage_path=p.root,
            storage_filesystem=p.fs if c.run.storage_path.startswith("s3://") else None,
            checkpoint_config=CheckpointConfig(num_to_keep=c.run.keep_checkpoints,
                                               checkpoint_score_attribute=c.trainer.monitor,
                                            checkpoint_score_order=MONITORS[c.trainer.monitor]),
            failure_config=FailureConfig(max_failures=c.run.max_failures),
            callbacks=[*epochs_to_mlflow, *callbacks]),
        datasets=datasets(p, plan.read_cpus),
        dataset_config=DataConfig(datasets_to_split=["train", "val"]),
    ).fit()


def datasets(p: Prepared, read_cpus: float) -> dict:
    """Ray Train's datasets. The train split is a factory, which Ray Train calls at every worker-group
    start, so that a restarted group reads epoch k in epoch k's order (launch.ingest.split_dataset)."""
    folder = storage.join(p.root, p.config.run.name)
    return {"train": TrainSplit(p.dataset, p.config.trainer.seed, read_cpus, partial(committed_epochs, p.fs, folder)),
            "val": split_dataset(p.dataset, "val", None, read_cpus)}


def committed_epochs(fs, folder: str) -> int:
    """Epochs whose checkpoint Ray Train has committed in a run folder: where its next worker group starts."""
    if not storage.exists(fs, storage.join(folder, SNAPSHOT)):
        return 0
    metrics = ray.train.Result.from_path(folder, storage_filesystem=fs).metrics
    return int(metrics[EPOCHS_DONE]) if metrics else 0


def fit_or_fail(p: Prepared, plan: WorkerPlan, mlflow: dict | None):
    try:
        return fit_on_ray(p, plan, mlflow)
    except (ray.train.TrainingFailedError, ray.exceptions.RayError) as e:
        restarts = f" after run.max_failures={p.config.run.max_failures} restart(s)" \
            if isinstance(e, ray.train.TrainingFailedError) else ""
        raise RuntimeError(f"training failed{restarts} ({cause(e)}); run the same command again to continue from "
                           "the latest checkpoint") from None


def cause(e: BaseException) -> str:
    """The line of a Ray failure that says what happened (the full report is in the log above)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    said = [ln for ln in lines if not ln.endswith(":") and not ln.startswith(("Worker info", "actor=", "["))]
    return redact(f"{type(e).__name__}: {(said or lines or [''])[0]}")


def train(config: TrainConfig, log=print, resume: bool = False) -> TrainOutcome:
    check_shared_storage(absolute(config), Cluster({}, joined=joining()))  # before anything is read or written
    p = prepare(config)
    config = p.config
    record = RunRecord(p.fs, storage.join(p.root, config.run.name))
    stored = record.check(jsonable(flatten(config)), resume,
                          f"run {config.run.name} in {redact(config.run.storage_path)}", "run.name",
                          progress=storage.exists(p.fs, storage.join(record.folder, SNAPSHOT)))
    if stored and stored["status"] == "finished":
        return already_finished(config, stored, log)
    cluster = connect(log)
    check_shared_storage(config, cluster)
    plan = plan_workers(config.ray, cluster)
    tracker = RunTracker(resolve_tracking_uri(config.mlflow.tracking_uri), config.mlflow.experiment) \
        if config.mlflow.enabled else None
    if not stored:
        record.start(jsonable(flatten(config)))
    apply_plan(config, plan)  # MLflow params show the resolved threads and accelerator
    log(describe_plan(plan))
    resumed = False
    if tracker:
        resumed = tracker.open(run_key(config.run.storage_path, config.run.name), config.run.name,
                               params=flatten(config), tags=run_tags(config, p.dataset))
        log(f"MLflow run {tracker.run_id} at {redact(tracker.uri)}{' (resumed)' if resumed else ''}")
    mlflow = {"uri": tracker.uri, "run_id": tracker.run_id} if tracker else None
    if stored:  # trained before: only the final step is left
        log(f"run {config.run.name}: training finished before; completing its final step")
        result = ray.train.Result.from_path(record.folder, storage_filesystem=p.fs)
    else:
        try:
            result = fit_or_fail(p, plan, mlflow)
        except RuntimeError:
            if tracker:
                tracker.finish("FAILED")
            raise
        record.save(status="trained")
    outcome = finish(config, p.dataset, plan, result, tracker, record, log)
    outcome.resumed = resumed
    return outcome


def already_finished(config: TrainConfig, stored: dict, log) -> TrainOutcome:
    s = stored["summary"]
    log(f"run {config.run.name} already finished ({stored['updated']}): best checkpoint {s['best_checkpoint_uri']}, "
        f"test P68 {s['test']['rows']['model']['p68_m']:,.0f} m. "
        "Choose a new run.name to train again.")
    return TrainOutcome(best_checkpoint_uri=s["best_checkpoint_uri"], best_val=s["best_val"],
                        test=SplitReport.from_json(s["test"]),
                        mlflow_run_id=s["mlflow_run_id"], out_dir=config.trainer.out_dir, already_finished=True)


def epochs_of(checkpoint: ray.train.Checkpoint) -> list[dict]:
    """Every epoch's metrics up to a checkpoint's, as its worker wrote them beside it."""
    with checkpoint.filesystem.open_input_stream(storage.join(checkpoint.path, EPOCHS_FILE)) as f:
        return json.loads(f.read())


class EpochsToMLflow(UserCallback):
    """Ray Train controller: each committed epoch's metrics to the MLflow run.

    Ray calls this after it has recorded the epoch's checkpoint, so an epoch is sent only once it can
    no longer run again. While MLflow is unreachable, epochs wait here and go with the next report
    (one warning line); what is still waiting when training ends, the driver sends from the latest
    checkpoint."""

    def __init__(self, tracking_uri: str, run_id: str, fault_settings: dict):
        self.tracking_uri, self.run_id, self.fault_settings = tracking_uri, run_id, fault_settings
        self.pending: list[dict] = []
        self.log: EpochLog | None = None
        self.down = False

    def after_report(self, run_context, metrics, checkpoint):
        if checkpoint is None:
            return
        faults.install(self.fault_settings)
        faults.maybe_kill("after_commit", int(metrics[0]["epoch"]))
        self.pending.append({k: v for k, v in metrics[0].items() if k != EPOCHS_DONE})
        try:
            self.log = self.log or EpochLog(self.tracking_uri, self.run_id)
            sent = self.log.send(self.pending)
        except Exception as e:  # noqa: BLE001 - an outage must not end training
            if not self.down:
                print(f"warning: MLflow is unreachable ({type(e).__name__}); epoch metrics wait and are sent "
                      "when it answers", flush=True)
            self.down = True
            return
        if self.down:
            print(f"MLflow answers again: sent {sent} waiting epoch(s)", flush=True)
        self.pending, self.down = [], False


def run_tags(config: TrainConfig, dataset: Dataset) -> dict[str, str]:
    import heimdall

    return {"heimdall.version": heimdall.__version__, "git_commit": git_commit(),
            "dataset.manifest_sha256": dataset.manifest_sha256, "dataset.uri": config.data.uri,
            "ray.run_name": config.run.name, "ray.storage_path": config.run.storage_path}


def finish(config: TrainConfig, dataset: Dataset, plan: WorkerPlan, result, tracker: RunTracker | None,
           record: RunRecord, log) -> TrainOutcome:
    """The driver's final step: test table, outputs, every epoch in MLflow, the record finished."""
    if not result.best_checkpoints:
        raise RuntimeError(f"run {config.run.name} reported no checkpoint (no epoch finished?)")
    monitor = config.trainer.monitor
    best, best_metrics = (min if MONITORS[monitor] == "min" else max)(result.best_checkpoints, key=lambda cm: cm[1][monitor])
    uri = checkpoint_uri(best, config.run.storage_path)
    report, pngs = ray.get(evaluate_best.options(num_cpus=plan.cpus_per_worker, num_gpus=int(plan.use_gpu)).remote(
        best, config.data.uri, config.data.eval_batch_size))
    faults.maybe_kill("driver_final")
    epochs = epochs_of(result.checkpoint)
    out = Path(config.trainer.out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
    (out / "test_metrics.json").write_text(json.dumps(report.to_json(), indent=1))
    for name, data in pngs.items():
        (out / "plots" / name).write_bytes(data)
    log(report.table(f"test split ({report.count} samples), best checkpoint (epoch "
                     f"{int(best_metrics['epoch']) + 1}, {monitor} {best_metrics[monitor]:,.0f})"))
    log(f"best checkpoint: {uri}/{CHECKPOINT_FILE}")
    outcome = TrainOutcome(best_checkpoint_uri=f"{uri}/{CHECKPOINT_FILE}", test=report, out_dir=str(out),
                           best_val={k: v for k, v in best_metrics.items() if k.startswith("val_")})
    summary = {"run_name": config.run.name, "best_checkpoint_uri": outcome.best_checkpoint_uri,
               "best_val": outcome.best_val, "test": report.to_json(), "mlflow_run_id": tracker.run_id if tracker else None}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1))  # the input of `heimdall export`
    if has_matplotlib():
        from heimdall.evaluation import plots

        plots.training_curves(epochs, out / "plots" / "training_curves.png")
    if tracker:
        EpochLog(tracker.uri, tracker.run_id).send_patiently(epochs, log)
        tracker.log_metrics(report.named())
        tracker.client.set_tag(tracker.run_id, "best_checkpoint", redact(outcome.best_checkpoint_uri))
        tracker.log_artifacts([out / "config.yaml", out / "test_metrics.json", out / "train_summary.json"])
        tracker.log_artifacts(sorted((out / "plots").glob("*.png")), "plots")
        tracker.finish()
        outcome.mlflow_run_id = tracker.run_id
    record.save(status="finished", summary=summary)
    log(f"outputs: {out}")
    return outcome


@ray.remote
def evaluate_best(checkpoint: ray.train.Checkpoint | str, data_uri: str, batch_size: int):
    """Test-split report and plots of a checkpoint (a Ray Checkpoint or a .ckpt URI), on a
    worker-sized slot (GPU if training had one)."""
    import torch

    from heimdall.evaluation.evaluate import evaluate_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint if isinstance(checkpoint, str) else f"{checkpoint.to_directory(f'{tmp}/ckpt')}/{CHECKPOINT_FILE}"
        device = "cuda" if torch.cuda.is_available() else "cpu"
        report = evaluate_checkpoint(path, Dataset.open(data_uri), "test", batch_size,
                                     plots_dir=Path(tmp) / "plots" if has_matplotlib() else None, device=device,
                                     log=lambda *_: None)
        return report, {p.name: p.read_bytes() for p in (Path(tmp) / "plots").glob("*.png")}


def has_matplotlib() -> bool:
    """Plots are optional here: lean GPU images have no matplotlib, and the test table still comes back."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's train function: the worker recipe, imported only where it runs (launch.worker)."""
    from launch.worker import train_loop

    train_loop(loop_config)
