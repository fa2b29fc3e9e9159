"""What a run (`fit`, `train`, `tune`) was started with, and whether it finished.

One JSON file beside the run's checkpoints. Starting a run again continues it only with the same
config; a changed config is refused with the changed keys listed unless `--resume` asks for it, and
a finished run is reported as finished instead of being trained or reported again.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from heimdall import storage
from heimdall.config import ConfigError

RECORD = "heimdall_run.json"
# How a run is executed or reported, not what it trains: these may change on resume.
HOW = ("trainer.progress", "trainer.threads", "trainer.accelerator", "trainer.out_dir", "data.loader_workers",
       "data.prefetch_batches", "data.eval_batch_size", "ray.use_gpu", "ray.check_resources", "ray.data_cpus",
       "ray.cpus_per_worker", "ray.resize_interval_s", "run.shared_storage", "run.max_failures", "run.keep_checkpoints",
       "tune.max_concurrent_trials", "tune.time_budget_s", "mlflow.")


@dataclass
class RunRecord:
    fs: object
    folder: str  # inside fs

    @classmethod
    def at(cls, uri: str) -> "RunRecord":
        fs, folder = storage.resolve(uri)
        return cls(fs, folder)

    @property
    def path(self) -> str:
        return storage.join(self.folder, RECORD)

    def load(self) -> dict | None:
        if not storage.exists(self.fs, self.path):
            return None
        return json.loads(storage.read_bytes(self.fs, self.path))

    def save(self, **fields) -> dict:
        record = {**(self.load() or {}), **fields, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        storage.write_bytes_atomic(self.fs, self.path, json.dumps(record, indent=1, default=str).encode())
        return record

    def check(self, config: dict, resume: bool, what: str, rename_key: str, progress: bool) -> dict | None:
        """Check the new config against the stored one, before any work. `progress`: the run has a
        checkpoint to continue from (a start that failed before one was written binds nothing).
        Returns the stored record when the run with this config is past training ("trained": only
        its final step is left; "finished": nothing is), else None; `start` records the start."""
        stored = self.load()
        if stored is not None and (progress or stored.get("status") != "running"):
            changed = changed_keys(stored["config"], config)
            if changed and not resume:
                raise ConfigError(f"{what} exists with another config ({'; '.join(changed)}): pass --resume to "
                                  f"continue it with the new config, or choose a new {rename_key}")
            if not changed and stored.get("status") in ("trained", "finished"):
                return stored
        return None

    def start(self, config: dict) -> None:
        self.save(config=config, status="running")


def changed_keys(old: dict, new: dict) -> list[str]:
    def counts(key: str) -> bool:
        return not any(key == h or (h.endswith(".") and key.startswith(h)) for h in HOW)
    keys = sorted(k for k in set(old) | set(new) if counts(k) and old.get(k) != new.get(k))
    return [f"{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in keys]


def jsonable(flat: dict) -> dict:
    """Config values as they read back from JSON (tuples become lists), so equal configs compare equal."""
    return json.loads(json.dumps(flat, default=str))
