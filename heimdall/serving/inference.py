"""Any trained model behind the serving contract: a checkpoint (local or s3://, file or Ray
checkpoint folder), an exported ONNX file, or a registry reference `models:/NAME@ALIAS` (or
`models:/NAME/VERSION`). Evaluate and predict run every kind through the same inputs and outputs,
so a checkpoint and its ONNX export give the same numbers (to the export's parity tolerance)."""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from heimdall import storage
from heimdall.storage import CHECKPOINT_FILE



@dataclass
class LoadedModel:
    label: str  # what the user named, for tables and reports
    kind: str  # checkpoint | onnx | registry
    predict: Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, np.ndarray]]
    ref_lat: float
    ref_lon: float
    iq_length: int | None
    sample_rate_hz: float | None
    receivers: list[str] = field(default_factory=list)  # the training network, when recorded
    trained_on: str | None = None  # dataset URI, when recorded
    info: dict = field(default_factory=dict)  # registry name/version, sha256, ...

    @property
    def producer(self) -> str:
        """What computes the outputs: torch for a checkpoint, onnx for an export or a registry version."""
        return "torch" if self.kind == "checkpoint" else "onnx"

    def check_data(self, iq_length: int, sample_rate_hz: float, where: str) -> None:
        if self.iq_length is not None and iq_length != self.iq_length:
            raise ValueError(f"{where}: IQ length {iq_length}, but {self.label} takes {self.iq_length}")
        if self.sample_rate_hz is not None and sample_rate_hz != self.sample_rate_hz:
            raise ValueError(f"{where}: sample rate {sample_rate_hz:g} Hz, but {self.label} was trained on "
                             f"{self.sample_rate_hz:g} Hz")


def open_model(ref: str, tracking_uri: str | None = None, threads: int = 0, device: str = "cpu",
               experiment: str = "heimdall") -> LoadedModel:
    if ref.startswith("models:/"):
        return _registry(ref, tracking_uri, threads, experiment)
    if ref.endswith(".onnx"):
        path = Path(ref).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{ref}: no such ONNX file")
        return _onnx(path, ref, "onnx", threads)
    return _checkpoint(ref, device)


def _checkpoint(ref: str, device: str = "cpu") -> LoadedModel:
    from heimdall.serving.export import TorchPredictor
    from heimdall.training.module import LocalizationModule

    uri = ref
    if not ref.endswith(".ckpt"):  # a Ray checkpoint folder
        uri = storage.join(ref, CHECKPOINT_FILE)
    fs, path = storage.resolve(uri)
    if not storage.exists(fs, path):
        raise FileNotFoundError(f"{ref}: no checkpoint there (expected a .ckpt, a Ray checkpoint folder, an "
                                ".onnx file or models:/NAME@ALIAS)")
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / CHECKPOINT_FILE
        local.write_bytes(storage.read_bytes(fs, path))
        try:
            module = LocalizationModule.restore(str(local))
        except Exception as e:  # noqa: BLE001 - torch/lightning raise many kinds for a bad file
            raise ValueError(f"{ref}: not a heimdall checkpoint ({type(e).__name__}: {e})") from None
    net, data = module.model.eval(), module.hparams.get("data") or {}
    return LoadedModel(ref, "checkpoint", TorchPredictor(net, device), float(net.ref_lat), float(net.ref_lon),
                       data.get("iq_length"), data.get("sample_rate_hz"), list(data.get("receivers") or []),
                       data.get("uri"))


def _onnx(path: Path, label: str, kind: str, threads: int, info: dict | None = None) -> LoadedModel:
    from heimdall.serving.export import OnnxPredictor, metadata_of

    try:
        meta = metadata_of(path.read_bytes())
        frame, contract = json.loads(meta["heimdall.frame"]), json.loads(meta["heimdall.contract"])
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(f"{label}: not a heimdall ONNX export (no frame/contract metadata: {e})") from None
    iq = contract["inputs"]["iq"]
    return LoadedModel(label, kind, OnnxPredictor(path, threads), frame["ref_lat"], frame["ref_lon"],
                       iq["shape"][-1], iq.get("sample_rate_hz"), json.loads(meta.get("heimdall.receivers", "[]")),
                       meta.get("training.dataset_uri") or None,
                       {**(info or {}), "model_version": meta.get("model_version", "")})


def _registry(ref: str, tracking_uri: str | None, threads: int, experiment: str) -> LoadedModel:
    import mlflow

    from heimdall.registry.client import MODEL_FILE, Registry
    from heimdall.tracking import resolve_tracking_uri

    registry = Registry(resolve_tracking_uri(tracking_uri), experiment)
    body = ref[len("models:/"):]
    name, _, pick = body.partition("@") if "@" in body else body.partition("/")
    try:
        version = (registry.client.get_model_version_by_alias(name, pick) if "@" in body
                   else registry.client.get_model_version(name, pick))
    except mlflow.exceptions.MlflowException as e:
        raise ValueError(f"{ref}: not in the registry at {registry.uri} ({e.message})") from None
    with tempfile.TemporaryDirectory(prefix="heimdall-model-") as dest:  # the session holds the model in memory
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}",
                                                        dst_path=dest)) / MODEL_FILE
        return _onnx(path, ref, "registry", threads,
                     {"name": name, "version": str(version.version), "sha256": version.tags.get("sha256", "")})
