"""`heimdall export`: best checkpoint -> validated ONNX -> serving copy (S3 or a folder) -> MLflow
registry version with aliases.

Order matters: everything that can be checked is checked before anything leaves the machine
(MLflow and the model store reachable, graph checked, ONNX Runtime held to PyTorch on the whole
test split and on random inputs). Then the serving copy is uploaded and verified, the model is
logged to MLflow and its stored bytes compared with the serving copy, and only then is a version
registered. A failure after the upload removes an object this run created. No Ray needed: under
`ray job submit` this runs in the job's driver.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from heimdall import storage
from heimdall.storage import CHECKPOINT_FILE
from heimdall.config import ConfigError, ExportConfig, ExportSettings
from heimdall.data.dataset import Dataset
from heimdall.evaluation.metrics import SplitReport
from heimdall.tracking import RUN_KEY_TAG, redact, resolve_tracking_uri, run_key

SUMMARIES = ("sweep_summary.json", "train_summary.json")


@dataclass
class Source:
    checkpoint_uri: str
    summary: dict | None = None  # the sweep or train summary it came from


@dataclass
class ExportOutcome:
    sha256: str
    onnx_path: str
    serving_uri: str
    uploaded: bool
    test: SplitReport
    parity: list[dict]
    metadata: dict
    export_s: float
    model_name: str | None = None
    version: str | None = None
    aliases: list[str] = field(default_factory=list)
    champion_reason: str = ""
    training_run_id: str | None = None
    out_dir: str = ""


# ---- where the checkpoint comes from -----------------------------------------------------------
def resolve_source(source: str, registry=None) -> Source:
    """A sweep/train summary (or its folder), a checkpoint file or Ray checkpoint folder (local or
    s3://), or an MLflow training run `runs:/<run id>` (its best_checkpoint tag)."""
    if source.startswith("runs:/"):
        if registry is None:
            raise ConfigError("a runs:/ source needs MLflow (mlflow.enabled=true, export.register_model=true)")
        run = registry.client.get_run(source[len("runs:/"):].strip("/"))
        if "best_checkpoint" not in run.data.tags:
            raise ConfigError(f"MLflow run {run.info.run_id} has no best_checkpoint tag (did it finish?)")
        return Source(run.data.tags["best_checkpoint"], {"mlflow_run_id": run.info.run_id})
    if source.startswith("s3://"):
        return Source(source if source.endswith(".ckpt") else storage.join(source, CHECKPOINT_FILE))
    path = Path(source).expanduser()
    if path.is_dir():
        found = [path / n for n in (*SUMMARIES, CHECKPOINT_FILE) if (path / n).exists()]
        if not found:
            raise ConfigError(f"export.source {source}: no {', '.join(SUMMARIES)} or {CHECKPOINT_FILE} in that folder")
        path = found[0]
    if not path.exists():
        raise ConfigError(f"export.source {source}: no such file")
    if path.suffix == ".json":
        summary = json.loads(path.read_text())
        if "best_checkpoint_uri" not in summary:
            raise ConfigError(f"export.source {source}: not a sweep or train summary (no best_checkpoint_uri)")
        return Source(summary["best_checkpoint_uri"], summary)
    return Source(str(path.resolve()))


def training_run_id(source: Source, registry) -> str | None:
    """The MLflow run that trained the checkpoint: named by the summary, or found by the run key
    of its Ray run (STORAGE/NAME/epoch_NNNN/checkpoint.ckpt, or Ray's default checkpoint_* folders)."""
    if source.summary and source.summary.get("mlflow_run_id"):
        return source.summary["mlflow_run_id"]
    parts = source.checkpoint_uri.rstrip("/").split("/")
    if registry is None or len(parts) < 4 or not parts[-2].startswith(("epoch_", "checkpoint_")):
        return None
    return registry.find_run(RUN_KEY_TAG, run_key("/".join(parts[:-3]), parts[-3]))


def fetch(uri: str, dest: Path) -> Path:
    fs, path = storage.resolve(uri)
    try:
        dest.write_bytes(storage.read_bytes(fs, path))
    except (OSError, FileNotFoundError) as e:
        raise ConfigError(f"checkpoint {redact(uri)} is not readable: {redact(e)}") from None
    return dest


# ---- the export ----------------------------------------------------------------------------------
def export_model(config: ExportConfig, log=print) -> ExportOutcome:
    from heimdall.serving.export import ExportError
    from heimdall.registry.store import open_store
    from heimdall.registry.client import Registry

    s = config.export
    if not s.source:
        raise ConfigError("nothing to export: give --from (a sweep_summary.json, train output folder, checkpoint "
                          "or runs:/<id>) or export.source")
    # Fail fast: both destinations must answer before minutes of export and validation.
    # mlflow.enabled=false means no MLflow anywhere: validate and upload, register nothing.
    registry = Registry(resolve_tracking_uri(config.mlflow.tracking_uri), config.mlflow.experiment) \
        if s.register_model and config.mlflow.enabled else None
    store = open_store(s.models_uri, s.s3_endpoint, s.multipart_threshold_mb, s.multipart_chunk_mb)
    store.check()
    source = resolve_source(s.source, registry)
    run_id = training_run_id(source, registry)
    log(f"exporting {redact(source.checkpoint_uri)}" + (f" (MLflow training run {run_id})" if run_id else ""))
    with tempfile.TemporaryDirectory(prefix="heimdall-export-") as tmp:
        tmp = Path(tmp)
        built = build_and_validate(s, fetch(source.checkpoint_uri, tmp / CHECKPOINT_FILE), source, run_id, tmp, log)
        stored = store.put(built.path, built.sha256)
        log(f"serving copy: {redact(stored.uri)} ({stored.size:,} bytes, sha256 verified"
            f"{'' if stored.created else ', already there: not uploaded again'})")
        outcome = built.outcome(stored)
        if registry is None:
            log("not registered: " + ("mlflow.enabled=false" if not config.mlflow.enabled else "export.register_model=false"))
        else:
            import mlflow

            try:
                register(registry, s, built, outcome, log, store)
            except BaseException as e:
                # No version points at it: leave no orphan, unless a concurrent export of the same model
                # registered it meanwhile (the object is content-addressed: theirs is the same bytes).
                if stored.created and outcome.version is None and not holds_sha(registry, s.model_name, built.sha256):
                    store.delete(stored.uri)
                    log(f"removed {redact(stored.uri)}: registration did not complete")
                if isinstance(e, mlflow.exceptions.MlflowException):
                    raise ExportError(f"MLflow at {redact(registry.uri)} failed during registration: {redact(e)}") from None
                raise
        outcome.out_dir = write_outputs(Path(s.out_dir), built, outcome)
    log(f"outputs: {outcome.out_dir}")
    return outcome


@dataclass
class Built:
    path: Path
    sha256: str
    report: SplitReport
    parity: list
    metadata: dict
    export_s: float
    dataset: Dataset
    example: dict
    run_id: str | None
    checkpoint_uri: str
    plot: Path

    def outcome(self, stored) -> ExportOutcome:
        from heimdall.serving.export import parity_dicts

        return ExportOutcome(self.sha256, str(self.path), stored.uri, stored.created, self.report,
                             parity_dicts(self.parity), self.metadata, self.export_s, training_run_id=self.run_id)


def build_and_validate(s: ExportSettings, checkpoint: Path, source: Source, run_id: str | None, tmp: Path, log) -> Built:
    import heimdall
    from heimdall.evaluation import plots
    from heimdall.evaluation.evaluate import predict, row_errors, split_report
    from heimdall.serving.export import (OnnxPredictor, TorchPredictor, check_graph, check_parity, export_graph,
                                 format_parity, sha256_of, weights_sha256, with_metadata)
    from heimdall.training.module import LocalizationModule
    from heimdall.serving.graph import contract

    module = LocalizationModule.restore(str(checkpoint))
    net = module.model.eval()
    trained_on = module.hparams.get("data") or {}
    dataset = open_dataset(s, trained_on)
    ref = (float(net.ref_lat), float(net.ref_lon))
    started = time.perf_counter()
    receivers = len(trained_on.get("receivers") or []) or dataset.num_receivers  # the example's size, not a limit
    proto = export_graph(net, receivers, dataset.iq_length, s.opset)
    export_s = time.perf_counter() - started
    # What the file holds depends on the checkpoint alone, so the same weights exported again give the
    # same bytes and sha256; where it came from and how it measured are registry tags (register()).
    metadata = {
        "heimdall.version": heimdall.__version__, "model_version": f"{heimdall.__version__}+{weights_sha256(net)[:12]}",
        "heimdall.weights_sha256": weights_sha256(net), "heimdall.model_config": json.dumps(module.hparams["model"]),
        "heimdall.frame": json.dumps({"ref_lat": ref[0], "ref_lon": ref[1]}),
        "heimdall.contract": json.dumps(contract(dataset.iq_length, dataset.sample_rate_hz, trained_on.get(
            "center_frequency_hz", dataset.manifest.get("center_frequency_hz")), *ref, net.receiver_states)),
        "training.dataset_uri": redact(trained_on.get("uri", "")),  # evaluate's default data
        "training.dataset_manifest_sha256": trained_on.get("manifest_sha256", ""),
        "heimdall.receivers": json.dumps(trained_on.get("receivers") or []),
    }
    check_graph(with_metadata(proto, metadata))
    onnx_model, torch_model = OnnxPredictor(proto.SerializeToString()), TorchPredictor(net)
    log(f"exported opset {s.opset} in {export_s:.1f} s; validating ONNX Runtime against PyTorch on the test split "
        f"({dataset.count('test')} samples) and {s.random_batches + 2} random input batches")
    pred = predict({"pytorch": torch_model, "onnx": onnx_model}, dataset, "test", s.batch_size)
    pool = next(dataset.iter_shards("test", columns=["iq", "rx_pos", "rx_state"]))
    parity = check_parity(torch_model, onnx_model, (pred["pytorch"], pred["onnx"]), pool, s.parity_tolerance_m,
                          s.ellipse_rtol, s.seed, s.random_batches)
    log(format_parity(parity))
    report = split_report(pred, "onnx", *ref, "test", producer="onnx")
    log(report.table(f"test split ({report.count} samples), computed from the ONNX outputs"))
    data = with_metadata(proto, metadata).SerializeToString()
    # The final bytes (metadata added) are what ships: check them once more, graph and numbers.
    final = OnnxPredictor(data)
    check_parity(torch_model, final, None, pool, s.parity_tolerance_m, s.ellipse_rtol, s.seed + 1, 2)
    path = tmp / "model.onnx"
    path.write_bytes(data)
    example = {"iq": pool["iq"][:2].copy(), "rx_pos": pool["rx_pos"][:2].copy(), "rx_state": pool["rx_state"][:2].copy()}
    plot = plots.error_cdf(row_errors(pred, "onnx", *ref), tmp / "onnx_test_error_cdf.png")
    return Built(path, sha256_of(data), report, parity, metadata, export_s, dataset, example, run_id,
                 source.checkpoint_uri, plot)


def open_dataset(s: ExportSettings, trained_on: dict) -> Dataset:
    uri = s.data_uri or trained_on.get("uri")
    if not uri:
        raise ConfigError("this checkpoint does not record its dataset: give export.data_uri=<dataset>")
    dataset = Dataset.open(uri)
    for key, have in (("iq_length", dataset.iq_length), ("sample_rate_hz", dataset.sample_rate_hz)):
        if key in trained_on and trained_on[key] != have:
            raise ConfigError(f"dataset {uri} has {key}={have}, but the model was trained on {trained_on[key]}")
    return dataset


# ---- registry -----------------------------------------------------------------------------------
def register(registry, s: ExportSettings, built: Built, outcome: ExportOutcome, log, store) -> None:
    from heimdall.serving.export import ExportError
    from heimdall.registry.promotion import PromotionError, check_artifacts, data_ref, gate
    from heimdall.registry.client import CANDIDATE, CHAMPION, DATA_TAG, SPLIT_TAG, signature

    name, split = s.model_name, f"{built.dataset.manifest_sha256}:test"
    version = registry.version_with_sha(name, built.sha256)
    if version is not None:
        try:  # its aliases may move below: the registered artifact must be what we just validated
            check_artifacts(registry, name, version)
        except PromotionError as e:
            raise ExportError(f"{name} version {version.version} holds this model's sha256 but {e}; no alias "
                              "moved") from None
        log(f"{name} version {version.version} already holds sha256 {built.sha256[:12]} (its artifacts verified): "
            "not registered again")
    else:
        export_run = new_export_run(registry, built, parent=built.run_id)
        run_id = built.run_id or export_run  # the version links to its training run when known
        info, logged_sha = registry.log_onnx(built.path, run_id, signature(built.dataset.iq_length), built.example,
                                             {k: v for k, v in built.metadata.items() if k != "heimdall.contract"})
        if logged_sha != built.sha256:
            raise ExportError(f"MLflow stored different bytes (sha256 {logged_sha}) than the serving copy "
                              f"({built.sha256}); nothing registered")
        tags = {"sha256": built.sha256, "serving_uri": outcome.serving_uri, "onnx_opset": s.opset,
                SPLIT_TAG: split, DATA_TAG: redact(data_ref(built.dataset.uri)), "training_run_id": built.run_id or "",
                "checkpoint": redact(built.checkpoint_uri), "model_version": built.metadata["model_version"],
                "heimdall.producer": built.report.producer, **{k: f"{v:.6g}" for k, v in built.report.named().items()}}
        log_export_artifacts(registry, export_run, built)
        version = registry.register(name, info.model_uri, tags)
        log(f"registered {name} version {version.version} (MLflow run {run_id}, model {info.model_id})")
        version = first_of_twins(registry, name, built.sha256, version, log)
        # A twin whose registration failed may have removed the serving copy between our upload and our
        # registration (it saw no version yet): put it back, verified, before any alias can move here.
        store.put(built.path, built.sha256)
    outcome.model_name, outcome.version, outcome.training_run_id = name, str(version.version), built.run_id
    current = registry.by_alias(name, CANDIDATE)
    if current is None or str(current.version) != str(version.version):
        registry.set_alias(name, CANDIDATE, version.version, "latest validated export")
    outcome.aliases = [CANDIDATE]
    champion = registry.by_alias(name, CHAMPION)
    if champion is not None and str(champion.version) == str(version.version):
        outcome.aliases.append(CHAMPION)
        outcome.champion_reason = f"version {version.version} is already the champion"
    else:
        decision = gate(registry, name, version, s.force_champion, dataset=built.dataset)
        outcome.champion_reason = decision.reason
        if decision.promote:
            registry.set_alias(name, CHAMPION, version.version, decision.reason)
            outcome.aliases.append(CHAMPION)
    log(f"aliases: {name}@{CANDIDATE} -> version {version.version}; "
        + (f"@{CHAMPION} -> version {version.version}" if CHAMPION in outcome.aliases
           else f"@{CHAMPION} stays version {champion.version}") + f" ({outcome.champion_reason})")


def holds_sha(registry, name: str, sha256: str) -> bool:
    try:
        return registry.version_with_sha(name, sha256) is not None
    except Exception:  # noqa: BLE001 - the registry failing is why we are here: keep the object
        return True


def first_of_twins(registry, name: str, sha256: str, mine, log):
    """Two exports of one model started together may both register it. Each looks after registering:
    the lowest version of this sha256 was registered first, so every later one sees it and steps
    aside; all converge on it and one version remains."""
    twins = registry.client.search_model_versions(f"name = '{name}' and tags.sha256 = '{sha256}'")
    first = min(twins, key=lambda v: int(v.version), default=mine)
    if int(first.version) < int(mine.version):
        registry.client.delete_model_version(name, str(mine.version))
        log(f"another export registered this model first as version {first.version}: version {mine.version} removed")
        return first
    return mine


def log_export_artifacts(registry, run_id: str, built: Built) -> None:
    """The ONNX model's test metrics (the same names as training's, producer onnx), the parity table
    and the error CDF, in the export run (nested under the training run when there is one)."""
    from mlflow.entities import Metric

    from heimdall.serving.export import parity_dicts

    now = int(time.time() * 1000)
    registry.client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in built.report.named().items()])
    (built.path.parent / "parity.json").write_text(json.dumps(parity_dicts(built.parity), indent=1))
    for path in (built.path.parent / "parity.json", built.plot):
        registry.client.log_artifact(run_id, str(path), f"export/{built.sha256[:12]}")


def new_export_run(registry, built: Built, parent: str | None = None) -> str:
    """The run of one export; without a training run (e.g. a `heimdall fit` checkpoint) the model
    itself is logged in it."""
    tags = {"heimdall.kind": "export", "heimdall.producer": "onnx", "checkpoint": redact(built.checkpoint_uri)}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = registry.client.create_run(registry.experiment_id(), run_name=f"export-{built.sha256[:12]}", tags=tags)
    registry.client.set_terminated(run.info.run_id)
    return run.info.run_id


# ---- local outputs --------------------------------------------------------------------------------
def write_outputs(root: Path, built: Built, outcome: ExportOutcome) -> str:
    """OUT/<sha256[:12]>/: model.onnx, export_report.json, plots. Written to a temp folder and renamed,
    so a folder that exists is complete."""
    final = root.expanduser().resolve() / built.sha256[:12]
    staging = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "plots").mkdir(parents=True)
    shutil.copyfile(built.path, staging / "model.onnx")
    shutil.copyfile(built.plot, staging / "plots" / built.plot.name)
    report = {**{k: v for k, v in outcome.__dict__.items() if k not in ("out_dir",)}, "test": outcome.test.to_json()}
    (staging / "export_report.json").write_text(json.dumps(report, indent=1, default=str))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    return str(final)
