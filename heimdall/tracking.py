"""MLflow bookkeeping for a training run: one run per (storage, name), found again on resume.

Only the driver opens runs and logs params, tags and artifacts. Per-epoch metrics go through
`EpochLog`, only for epochs whose checkpoint is committed, each epoch once (an epoch already in the
run is not sent again). Nothing here logs credentials: URIs are redacted.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from pathlib import Path

import heimdall

RUN_KEY_TAG = "heimdall_run_key"
STARTS_TAG = "heimdall.starts"


class TrackingError(ValueError):
    """MLflow is unreachable or refused a request; the message says which server."""


def redact(text: str) -> str:
    """Drop user:password@ from any URI inside text."""
    return re.sub(r"(//)[^/@\s]+@", r"\1***@", str(text))


def resolve_tracking_uri(configured: str | None) -> str:
    """Config, else $MLFLOW_TRACKING_URI, else a local sqlite store; local paths made absolute so
    workers on the same host write to the same place whatever their working directory."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if uri.startswith("file:") or "://" not in uri:
        path = uri[len("file://"):] if uri.startswith("file://") else uri.removeprefix("file:")
        return Path(path).resolve().as_uri()
    return uri


def bound_retries() -> None:
    """MLflow's HTTP defaults retry for minutes; a training driver should fail in seconds."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    url = re.sub(r"(//)[^/@\s]+@", r"\1", uri).rstrip("/") + "/health"
    try:
        requests.get(url, timeout=timeout_s).raise_for_status()
    except requests.RequestException as e:
        raise TrackingError(f"MLflow tracking server {redact(uri)} is unreachable ({type(e).__name__}); "
                            "start it, fix MLFLOW_TRACKING_URI, or set mlflow.enabled=false") from None


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(heimdall.__file__).resolve().parents[1])
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_key(storage_path: str, name: str) -> str:
    return hashlib.sha256(f"{storage_path.rstrip('/')}/{name}".encode()).hexdigest()[:32]


def experiment_id(client, name: str) -> str:
    """The experiment of this name, created when missing (a concurrent creator wins: read it back)."""
    import mlflow

    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except mlflow.exceptions.MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


class RunTracker:
    """The MLflow run of one training run (driver side)."""

    def __init__(self, tracking_uri: str, experiment: str):
        import mlflow
        from mlflow.tracking import MlflowClient

        bound_retries()
        check_reachable(tracking_uri)
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        try:
            self.experiment_id = experiment_id(self.client, experiment)
        except mlflow.exceptions.MlflowException as e:
            raise TrackingError(f"MLflow at {redact(tracking_uri)}: {redact(e)}") from None
        self.run_id: str | None = None

    def open(self, key: str, run_name: str, params: dict, tags: dict) -> bool:
        """Find the run with this key (resume) or create it; returns True when resumed."""
        found = self.client.search_runs([self.experiment_id], f"tags.{RUN_KEY_TAG} = '{key}'", max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            starts = int(found[0].data.tags.get(STARTS_TAG, "1")) + 1
            old = found[0].data.params
            changed = sorted(k for k, v in params.items() if k in old and old[k] != _param(v))
            new = {k: v for k, v in params.items() if k not in old}
            if changed:
                self.client.set_tag(self.run_id, "heimdall.changed_on_resume", ",".join(changed))
        else:
            self.run_id = self.client.create_run(self.experiment_id, run_name=run_name,
                                                 tags={RUN_KEY_TAG: key}).info.run_id
            new, starts = params, 1
        self.client.set_tag(self.run_id, STARTS_TAG, str(starts))  # > 1: resumed (a sweep's paused trial too)
        self._log_params(new)
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, redact(v))
        return bool(found)

    def _log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])

    def log_artifacts(self, paths: list[Path], artifact_path: str | None = None) -> None:
        for p in paths:
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


class EpochLog:
    """Per-epoch metrics of one MLflow run (step = epoch, 0-based), each epoch sent once.

    Which epochs the run holds is read from MLflow once (the `lr` metric: every epoch row has it),
    then kept: one writer sends a run's epochs at a time (the Ray Train controller during training,
    the driver at the end, `fit`'s process), and a restarted writer reads it again."""

    MARK = "lr"

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        bound_retries()
        self.client, self.run_id = MlflowClient(tracking_uri), run_id
        self.logged: set[int] | None = None

    def send(self, rows: list[dict]) -> int:
        """Send the rows whose epoch the run lacks; returns how many were sent. Raises on MLflow errors."""
        from mlflow.entities import Metric

        if self.logged is None:
            self.logged = {m.step for m in self.client.get_metric_history(self.run_id, self.MARK)}
        new = [r for r in rows if int(r["epoch"]) not in self.logged]
        now = int(time.time() * 1000)
        for i in range(0, len(new), 50):  # MLflow takes at most 1000 metrics per batch
            chunk = new[i:i + 50]
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, int(r["epoch"])) for r in chunk
                                                        for k, v in r.items() if k not in ("epoch", "step")])
            self.logged |= {int(r["epoch"]) for r in chunk}
        return len(new)

    def send_patiently(self, rows: list[dict], log, patience_s: float = 90.0) -> None:
        """At the end of a run: retry through a short outage, then fail with one line."""
        deadline, warned = time.monotonic() + patience_s, False
        while True:
            try:
                self.send(rows)
                return
            except Exception as e:  # noqa: BLE001 - MLflow raises several kinds for the same outage
                if time.monotonic() > deadline:
                    raise TrackingError(f"MLflow is unreachable ({type(e).__name__}); the epochs are kept in the "
                                        "checkpoint: run the same command again to send them") from None
                if not warned:
                    log(f"MLflow is unreachable ({type(e).__name__}); retrying for up to {patience_s:.0f} s")
                    warned = True
                time.sleep(3)


def _param(v) -> str:
    return redact(v)[:6000]
