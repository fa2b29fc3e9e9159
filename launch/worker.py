"""The Ray Train recipe on every worker: the local recipe's parts (heimdall.training.fit) over this
worker's Ray Data shards, with Ray's DDP strategy and a report callback per epoch.

Only workers import this module (and with it Lightning): the driver, the trial drivers of a sweep
and Ray Train's controller start without it, so a run reaches its first step seconds sooner.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import ray
import ray.train

from heimdall import faults, storage
from heimdall.config import TrainConfig
from heimdall.data.dataset import Dataset
from heimdall.storage import CHECKPOINT_FILE
from heimdall.training.callbacks import EpochHistory
from launch.train import EPOCHS_DONE, EPOCHS_FILE


class ReportEpoch(L.Callback):
    """Worker side: each epoch's checkpoint (rank 0's) and metrics to Ray Train.

    Checkpoint folders are named by epoch, so an epoch rerun after a kill before its commit
    overwrites what it left. The upload is Ray's `checkpoint_upload_fn` hook, ours only so that the
    fault point `checkpoint_upload` can fall half-way through it."""

    def __init__(self, storage_path: str, run_name: str):
        self.storage_path, self.run_name = storage_path, run_name

    def on_train_epoch_end(self, trainer, module):  # after EpochHistory recorded the epoch
        history = next(c for c in trainer.callbacks if isinstance(c, EpochHistory))
        if not history.fresh:  # Lightning replays the end of the epoch it resumed from
            return
        epoch = trainer.current_epoch
        with tempfile.TemporaryDirectory() as tmp:
            trainer.save_checkpoint(f"{tmp}/{CHECKPOINT_FILE}")  # on every rank: it is a barrier
            checkpoint = None
            if trainer.is_global_zero:
                Path(tmp, EPOCHS_FILE).write_text(json.dumps(history.rows))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**history.last, EPOCHS_DONE: epoch + 1}, checkpoint=checkpoint,
                             checkpoint_dir_name=f"epoch_{epoch:04d}",
                             checkpoint_upload_fn=partial(upload, self.storage_path, self.run_name, epoch))


def upload(storage_path: str, run_name: str, epoch: int, checkpoint: ray.train.Checkpoint,
           dir_name: str) -> ray.train.Checkpoint:
    fs, root = storage.resolve(storage_path)
    dest = storage.join(root, run_name, dir_name)
    fs.create_dir(dest, recursive=True)
    for f in sorted(Path(checkpoint.path).iterdir()):
        with fs.open_output_stream(storage.join(dest, f.name)) as out:
            faults.write_halves(out, f.read_bytes(), "checkpoint_upload" if f.name == CHECKPOINT_FILE else "", epoch)
    return ray.train.Checkpoint(dest, filesystem=fs)


def train_loop(loop_config: dict) -> None:
    """The Ray Train recipe, on every worker: the local recipe's parts over this worker's shards."""
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer

    from heimdall.training.fit import Loaders, build_module, make_trainer, run, seed_everything
    from launch.ingest import ShardBatches

    quiet_worker()
    faults.install(loop_config["faults"])
    config = TrainConfig.model_validate(loop_config["config"])
    context = ray.train.get_context()
    world, rank = context.get_world_size(), context.get_world_rank()
    worker_log(placement(rank, world))
    if config.ray.elastic:
        config = elastic_batch(config, world, rank == 0)
    seed_everything(config)
    dataset = Dataset.open(config.data.uri)
    module = build_module(config, dataset, world)
    ref = (float(module.model.ref_lat), float(module.model.ref_lon))
    loaders = Loaders(ShardBatches(ray.train.get_dataset_shard("train"), dataset, "train", config.data.batch_size, *ref,
                                   drop_last=True, prestart=True),
                      ShardBatches(ray.train.get_dataset_shard("val"), dataset, "val", config.data.eval_batch_size, *ref,
                                   drop_last=False))
    # One worker needs no DDP: its gradient hooks and all-reduce would only add to every step.
    ddp = dict(strategy=RayDDPStrategy(), plugins=[RayLightningEnvironment()]) if world > 1 else {}
    trainer = make_trainer(config, [EpochHistory(), ReportEpoch(config.run.storage_path, config.run.name)], worker_log,
                           devices="auto", **ddp)
    if world > 1:
        trainer = prepare_trainer(trainer)
    checkpoint = ray.train.get_checkpoint()
    with tempfile.TemporaryDirectory() as tmp:
        run(trainer, module, loaders, config, f"{checkpoint.to_directory(tmp)}/{CHECKPOINT_FILE}" if checkpoint else None,
            worker_log)


def elastic_batch(config: TrainConfig, world: int, say: bool) -> TrainConfig:
    """An elastic run keeps its global batch (data.batch_size x the most workers) whatever the
    worker count: each worker takes its share, so steps per epoch, the learning-rate schedule and
    the learning rate itself stay as planned when the run shrinks or grows."""
    scale = config.ray
    per_worker = math.ceil(config.data.batch_size * scale.max_workers / world)
    if say:
        worker_log(f"elastic: {world} of {scale.num_workers} workers; per-worker batch {per_worker}, "
                   f"global batch {per_worker * world}")
    return config.model_copy(update={"data": config.data.model_copy(update={"batch_size": per_worker})})


def placement(rank: int, world: int) -> str:
    """Where a worker runs and on what: the job log's proof that a cluster run uses its GPUs."""
    import torch
    from ray.train.torch import get_device

    device = get_device()
    what = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"
    runtime = ray.get_runtime_context()
    return f"worker {rank}/{world} on node {runtime.get_node_id()[:12]} ({ray.util.get_node_ip_address()}): {what}"


def worker_log(message: str) -> None:
    # Ray Train patches print() to log *and* echo (every line twice in the driver's console).
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def quiet_worker() -> None:
    """Per-report INFO lines and library deprecation notices drown the per-epoch progress."""
    from ray.train.v2._internal.execution import context

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger(context.__file__).setLevel(logging.WARNING)  # "Reporting training result" per rank
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for pattern in (".*LeafSpec.*", ".*all_gather is deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern)
