"""Lightning callbacks shared by `fit` and the Ray Train worker.

EpochProgress: console progress per epoch: loss, validation P68, samples/s and ETA (readable in job
logs). samples/s counts training only (first batch to last batch of the epoch, all ranks), not
validation; it is also logged as the metric `train_samples_per_s` so benchmarks and MLflow see it,
beside `epoch_samples_per_s`: the same samples over the whole epoch's wall time (training,
validation and the previous epoch's checkpoint).

EpochHistory: the record of which epochs happened. Each epoch's metrics go into the checkpoint, and
every sink (fit's metrics.csv, the MLflow run) is written from a committed checkpoint's history,
never before the commit: a kill anywhere leaves each epoch in the sinks once or not yet.
"""
from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from heimdall import faults


class EpochProgress(L.Callback):
    def __init__(self, log=print):
        """`log=None`: the metrics only, no console lines."""
        self.emit = log
        self._start = self._epoch_start = self._last_end = 0.0
        self._first_epoch = 0
        self._samples = 0
        self._in_epoch = False

    def on_train_start(self, trainer, module):
        self._start, self._first_epoch = time.perf_counter(), trainer.current_epoch  # > 0 when resumed
        self._last_end = self._start

    def on_train_epoch_start(self, trainer, module):
        self._epoch_start, self._samples = time.perf_counter(), 0
        self._train_end, self._in_epoch = self._epoch_start, True

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self._samples == 0 and os.environ.get("HEIMDALL_MARK_FIRST_STEP") and trainer.is_global_zero and self.emit:
            self.emit(f"HEIMDALL_FIRST_STEP {time.time():.3f}")  # bench/startup.py measures launch -> here
        self._samples += len(batch["rx_state"]) * trainer.world_size
        self._train_end = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):  # runs after the epoch's validation
        if not self._in_epoch:  # resumed from a checkpoint taken after this epoch's validation
            return
        self._in_epoch = False
        now = time.perf_counter()
        rate = self._samples / max(self._train_end - self._epoch_start, 1e-9)
        module.log("train_samples_per_s", rate, rank_zero_only=True)
        module.log("epoch_samples_per_s", self._samples / max(now - self._last_end, 1e-9), rank_zero_only=True)
        module.log("epoch_workers", float(trainer.world_size), rank_zero_only=True)  # elastic runs change it
        self._last_end = now
        if not trainer.is_global_zero or self.emit is None:
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


class EpochHistory(L.Callback):
    """Per-epoch metrics, saved in (and restored from) every checkpoint.

    `fresh` is True between recording an epoch and the next epoch's start: an epoch end that Lightning
    replays when it resumes from a checkpoint taken at that epoch's end records nothing."""

    def __init__(self):
        self.rows: list[dict] = []
        self.fresh = self._in_epoch = False

    def on_train_epoch_start(self, trainer, module):
        self._in_epoch, self.fresh = True, False

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0 and not trainer.sanity_checking:
            faults.maybe_kill("validation", trainer.current_epoch)

    def on_train_epoch_end(self, trainer, module):  # after the epoch's validation, before any checkpoint
        if not self._in_epoch:
            return
        self._in_epoch = False
        m = trainer.callback_metrics
        kept = ("val_", "train_", "epoch_")
        row = {"epoch": trainer.current_epoch, "step": trainer.global_step,
               **{k: float(v) for k, v in sorted(m.items()) if k.startswith(kept) and not k.endswith("_step")},
               "lr": trainer.optimizers[0].param_groups[0]["lr"]}
        self.rows = [r for r in self.rows if r["epoch"] < row["epoch"]] + [row]
        self.fresh = True
        faults.maybe_kill("before_report", trainer.current_epoch)

    @property
    def last(self) -> dict:
        return self.rows[-1]

    def state_dict(self):
        return {"rows": self.rows}

    def load_state_dict(self, state):
        self.rows = list(state["rows"])


def write_metrics_csv(rows: list[dict], path: Path) -> None:
    """One row per epoch, written whole and renamed into place (a reader never sees half a file)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    write_atomic(path, buf.getvalue().encode())


def write_atomic(path: Path, data: bytes, fault_point: str = "", epoch: int | None = None) -> None:
    """Temp file, fsync, rename. With `fault_point`, the fault hook may kill half-way through."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            faults.write_halves(f, data, fault_point, epoch)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_partial_writes(folder: Path) -> None:
    """What a killed write_atomic left (a dot-file nobody reads): removed when the run starts again."""
    for tmp in folder.glob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints that exist whole or not at all (a kill mid-write leaves the previous one intact)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        write_atomic(Path(path), buf.getvalue(), "checkpoint_upload", checkpoint.get("epoch"))


class CommitCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose last.ckpt is the commit point of an epoch; `on_commit` runs after it."""

    def __init__(self, on_commit, **kwargs):
        super().__init__(save_last=True, save_on_train_epoch_end=True, **kwargs)
        self.on_commit = on_commit

    def _save_last_checkpoint(self, trainer, monitor_candidates):
        super()._save_last_checkpoint(trainer, monitor_candidates)
        faults.maybe_kill("after_commit", trainer.current_epoch)
        self.on_commit(trainer)
