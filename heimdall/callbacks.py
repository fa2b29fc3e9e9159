"""Console progress per epoch: loss, validation P68, samples/s and ETA (readable in job logs).

samples/s counts training only (first batch to last batch of the epoch, all ranks), not validation;
it is also logged as the metric `train_samples_per_s` so benchmarks and MLflow see it."""
from __future__ import annotations

import os
import time

import lightning as L


class EpochProgress(L.Callback):
    def __init__(self, log=print):
        self.emit = log
        self._start = self._epoch_start = 0.0
        self._first_epoch = 0
        self._samples = 0
        self._in_epoch = False

    def on_train_start(self, trainer, module):
        self._start, self._first_epoch = time.perf_counter(), trainer.current_epoch  # > 0 when resumed

    def on_train_epoch_start(self, trainer, module):
        self._epoch_start, self._samples = time.perf_counter(), 0
        self._train_end, self._in_epoch = self._epoch_start, True

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self._samples == 0 and os.environ.get("HEIMDALL_MARK_FIRST_STEP") and trainer.is_global_zero:
            self.emit(f"HEIMDALL_FIRST_STEP {time.time():.3f}")  # bench/startup.py measures launch -> here
        self._samples += len(batch["mask"]) * trainer.world_size
        self._train_end = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):  # runs after the epoch's validation
        if not self._in_epoch:  # resumed from a checkpoint taken after this epoch's validation
            return
        self._in_epoch = False
        rate = self._samples / max(self._train_end - self._epoch_start, 1e-9)
        module.log("train_samples_per_s", rate, rank_zero_only=True)
        if not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        done = trainer.current_epoch + 1
        per_epoch = (time.perf_counter() - self._start) / (done - self._first_epoch)
        eta = per_epoch * (trainer.max_epochs - done)

        def get(key):
            return f"{float(m[key]):,.0f}" if key in m else "-"
        loss = f"{float(m['train_loss_epoch']):.3f}" if "train_loss_epoch" in m else "-"
        self.emit(f"epoch {done}/{trainer.max_epochs}  train_loss {loss}  val_p50_m {get('val_p50_m')}  "
                 f"val_p68_m {get('val_p68_m')}  {rate:,.0f} samples/s  "
                 f"ETA {eta:,.0f} s")


class EpochMetricsLogger(L.Callback):
    """Rank 0 logs each epoch's train/val metrics to the driver's MLflow run (step = epoch, 0-based)."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self._client = None
        self._in_epoch = False

    def on_train_epoch_start(self, trainer, module):
        self._in_epoch = True

    def on_train_epoch_end(self, trainer, module):  # after the epoch's validation
        if not (trainer.is_global_zero and self._in_epoch):  # not: an epoch finished before a resume
            return
        self._in_epoch = False
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        from heimdall.tracking import bound_retries

        bound_retries()
        self._client = self._client or MlflowClient(self.tracking_uri)
        now = int(time.time() * 1000)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith(("val_", "train_")) and not k.endswith("_step")}
        metrics["lr"] = trainer.optimizers[0].param_groups[0]["lr"]
        self._client.log_batch(self.run_id, metrics=[Metric(k, v, now, trainer.current_epoch)
                                                     for k, v in metrics.items()])
