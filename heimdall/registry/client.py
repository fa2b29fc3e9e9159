"""The MLflow model registry side of an export: versions, aliases, and the champion gate.

Aliases, not stages: `candidate` is the latest validated export, `champion` the one serving uses.
A version takes `champion` only when its test P68 beats the current champion's on the same test
split (or when forced). Every alias change is recorded on the registered model as an `audit.*` tag
saying who, when, from which version to which, and why, so a rollback knows where to go.
"""
from __future__ import annotations

import getpass
import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from heimdall.tracking import TrackingError, bound_retries, check_reachable, redact

CANDIDATE, CHAMPION = "candidate", "champion"
MODEL_FILE = "model.onnx"  # inside an MLflow ONNX-flavour model
AUDIT_PREFIX = "audit."
SPLIT_TAG, P68_TAG, DATA_TAG = "test_split", "test_p68_m", "test_data_uri"


@dataclass
class Decision:
    promote: bool
    reason: str


def champion_decision(new_p68: float, split: str, champion: dict | None, champion_p68_here: float | None,
                      force: bool) -> Decision:
    """Whether a new version takes `champion`. `champion`: the current holder's tags (or None);
    `champion_p68_here`: its test P68 on this version's test split, when it could be measured."""
    if champion is None:
        return Decision(True, "there is no champion yet")
    holder = f"version {champion['version']}"
    if champion_p68_here is None:
        if force:
            return Decision(True, f"--force (no comparable test P68 for {holder})")
        return Decision(False, f"{holder} has no test P68 on test split {split}; use --force to promote anyway")
    if new_p68 < champion_p68_here:
        return Decision(True, f"test P68 {new_p68:,.0f} m beats {holder}'s {champion_p68_here:,.0f} m on the same test split")
    if force:
        return Decision(True, f"--force (test P68 {new_p68:,.0f} m does not beat {holder}'s {champion_p68_here:,.0f} m)")
    return Decision(False, f"test P68 {new_p68:,.0f} m does not beat {holder}'s {champion_p68_here:,.0f} m on the "
                           "same test split; use --force to promote anyway")


def actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = os.environ.get("USER", "unknown")
    return f"{user}@{socket.gethostname()}"


def signature(iq_length: int):
    """MLflow signature of the serving graph (-1 = dynamic: batch and receiver count)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    f64, f32 = np.dtype(np.float64), np.dtype(np.float32)
    inputs = Schema([TensorSpec(np.dtype(np.int16), (-1, -1, 2, iq_length), "iq"),
                     TensorSpec(f64, (-1, -1, 3), "rx_pos"), TensorSpec(np.dtype(np.int8), (-1, -1), "rx_state")])
    outputs = Schema([TensorSpec(f64, (-1,), "latitude"), TensorSpec(f64, (-1,), "longitude"),
                      TensorSpec(f32, (-1, 2), "east_north_m"), TensorSpec(f32, (-1, 2), "ellipse_semi_axes_m"),
                      TensorSpec(f32, (-1,), "ellipse_orientation_deg")])
    return ModelSignature(inputs=inputs, outputs=outputs)


class Registry:
    """One tracking server's registry (and the experiment exports without a training run log to)."""

    def __init__(self, tracking_uri: str, experiment: str):
        import mlflow
        from mlflow.tracking import MlflowClient

        bound_retries()
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        check_reachable(tracking_uri)
        mlflow.set_tracking_uri(tracking_uri)
        self.uri, self.client, self.experiment = tracking_uri, MlflowClient(tracking_uri), experiment
        try:
            self.client.search_registered_models(max_results=1)
        except mlflow.exceptions.MlflowException as e:
            raise TrackingError(f"MLflow registry at {redact(tracking_uri)}: {redact(e)}") from None

    # ---- runs --------------------------------------------------------------------------------
    def experiment_id(self) -> str:
        from heimdall.tracking import experiment_id

        return experiment_id(self.client, self.experiment)

    def find_run(self, tag: str, value: str) -> str | None:
        experiments = [e.experiment_id for e in self.client.search_experiments()]
        found = self.client.search_runs(experiments, f"tags.{tag} = '{value}'", max_results=1)
        return found[0].info.run_id if found else None

    # ---- versions ----------------------------------------------------------------------------
    def version_with_sha(self, name: str, sha256: str):
        if not self.exists(name):
            return None
        found = self.client.search_model_versions(f"name = '{name}' and tags.sha256 = '{sha256}'")
        return min(found, key=lambda v: int(v.version), default=None)

    def by_alias(self, name: str, alias: str):
        # MLflow gives a version number as int or str depending on the store and the call: compare str().
        import mlflow

        if not self.exists(name):
            return None
        try:
            return self.client.get_model_version_by_alias(name, alias)
        except mlflow.exceptions.MlflowException:
            return None

    def exists(self, name: str) -> bool:
        return bool(self.client.search_registered_models(f"name = '{name}'", max_results=1))

    def log_onnx(self, onnx_path: Path, run_id: str, sig, example: dict, metadata: dict):
        """Log the ONNX flavour into a run; returns (ModelInfo, sha256 of the file MLflow stored)."""
        import logging
        import tempfile

        import mlflow
        import onnx

        from heimdall.registry.store import file_sha256

        logging.getLogger("mlflow.onnx").setLevel(logging.ERROR)  # "CUDA provider unavailable" on CPU hosts
        # log_model files the logged model under mlflow's active experiment: make it the run's, whatever
        # an earlier call in this process (another store, another experiment) left active.
        mlflow.set_experiment(experiment_id=self.client.get_run(run_id).info.experiment_id)
        info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="model", signature=sig, input_example=example,
                                     save_as_external_data=False, run_id=run_id, metadata=metadata,
                                     pip_requirements=["onnxruntime>=1.18", "numpy"])
        location = self.client.get_logged_model(info.model_id).artifact_location
        with tempfile.TemporaryDirectory() as tmp:
            stored = mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/{MODEL_FILE}", dst_path=tmp)
            return info, file_sha256(stored)

    def register(self, name: str, model_uri: str, tags: dict[str, str]):
        import mlflow

        version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
        return self.client.get_model_version(name, version.version)

    def set_alias(self, name: str, alias: str, version: str | int, reason: str, action: str = "export") -> None:
        """Move an alias and record it. `action`: export | promote | rollback (rollback replays the trail)."""
        previous = self.by_alias(name, alias)
        self.client.set_registered_model_alias(name, alias, str(version))
        now = datetime.now(timezone.utc)
        record = {"alias": alias, "from": str(previous.version) if previous else None, "to": str(version),
                  "by": actor(), "at": now.isoformat(timespec="seconds"), "reason": reason, "action": action}
        # Microseconds of the same clock: tag keys sort in the order the changes were made.
        stamp = now.strftime("%Y%m%dT%H%M%S.%f")
        self.client.set_registered_model_tag(name, f"{AUDIT_PREFIX}{stamp}.{alias}", json.dumps(record))

    def audit(self, name: str) -> list[dict]:
        model = self.client.get_registered_model(name)
        return [json.loads(v) for k, v in sorted(model.tags.items()) if k.startswith(AUDIT_PREFIX)]

    def download_version(self, name: str, version: str, dest: Path) -> Path:
        import mlflow

        return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dest))) / MODEL_FILE
