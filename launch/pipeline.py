"""`heimdall pipeline`: the main job. Dataset (synthesised if missing) -> Ray Tune sweep of Ray
Train runs -> export of the best trial (ONNX, validated) -> serving copy -> MLflow registry.

Every stage is the same code as its own command and every stage resumes: an existing dataset is
reused, the sweep of the same name is restored (finished trials are not rerun), and the export is
content-addressed (the same model is not uploaded or registered twice). Running it again after an
interruption picks up where it stopped.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from heimdall.config import ExportConfig, PipelineConfig, TuneConfig
from heimdall.tracking import redact, resolve_tracking_uri


@dataclass
class PipelineOutcome:
    sweep: object
    export: object
    seconds: float


def ensure_dataset(config: PipelineConfig, log) -> None:
    import json

    from heimdall import storage
    from heimdall.data.dataset import MANIFEST, SCHEMA_VERSION, Dataset
    from heimdall.data.synth import SynthSpec, synthesize
    from heimdall.data.world import WORLD_PRESETS

    fs, root = storage.resolve(config.data.uri)
    s, old = config.synth, None
    if storage.exists(fs, storage.join(root, MANIFEST)):
        try:
            old = json.loads(storage.read_bytes(fs, storage.join(root, MANIFEST)))
        except ValueError:
            old = {}
        made_here = (old.get("source") == "synthetic" and old.get("iq_length") == s.iq_length
                     and (old.get("world") or {}).get("seed") == s.seed and old.get("counts", {}).get("total") == s.samples)
        if old.get("schema_version") == SCHEMA_VERSION or not made_here:
            Dataset.open(config.data.uri, check_files=False)  # refuses, naming what is wrong, unless it is current
            log(f"dataset: {config.data.uri} (exists: reused)")
            return
        # This pipeline's own dataset (same synth settings), written by an older heimdall: make it again.
        log(f"dataset: {config.data.uri} is schema version {old.get('schema_version')}; this heimdall reads version "
            f"{SCHEMA_VERSION}: synthesising it again")
    if s.world_preset not in WORLD_PRESETS:
        raise ValueError(f"config key 'synth.world_preset': {s.world_preset!r} is not one of {sorted(WORLD_PRESETS)}")
    log(f"dataset: synthesising {s.samples} samples x {s.iq_length} IQ, world preset {s.world_preset} "
        f"-> {config.data.uri}")
    synthesize(SynthSpec(out=config.data.uri, samples=s.samples, seed=s.seed, iq_length=s.iq_length,
                         world=WORLD_PRESETS[s.world_preset]), workers=s.workers or os.cpu_count() or 1,
               overwrite=old is not None, log=lambda *_: None)


def run_pipeline(config: PipelineConfig, log=print) -> PipelineOutcome:
    from launch.cluster import check_shared_storage, connect
    from launch.export import export_model
    from launch.tune import tune_sweep

    started = time.perf_counter()
    tune_config = TuneConfig.model_validate(config.model_dump(exclude={"synth", "export"}))
    check_shared_storage(tune_config, connect(log))  # before a dataset is written where workers cannot read it
    ensure_dataset(config, log)
    sweep = tune_sweep(tune_config, log)
    summary = Path(sweep.out_dir) / "sweep_summary.json"
    export = config.export.model_copy(update={"source": str(summary)})
    exported = export_model(ExportConfig(export=export, mlflow=config.mlflow), log)
    outcome = PipelineOutcome(sweep, exported, time.perf_counter() - started)
    log(report(config, outcome))
    return outcome


def report(config: PipelineConfig, o: PipelineOutcome) -> str:
    e, test = o.export, o.export.test
    model = test.model.p68_m
    ratios = [f"{model / test[row].p68_m:.2f} of the {row}'s" for row in ("reference", "physics baseline", "centroid")
              if row in test]
    lines = ["", "=" * 78, f"pipeline finished in {o.seconds / 60:.1f} min", "",
             test.table("test split, from the exported ONNX model's own outputs"), "",
             f"test P68 {model:,.0f} m = {', '.join(ratios)}", "",
             f"dataset          {config.data.uri}",
             f"sweep            {o.sweep.out_dir} (best trial {o.sweep.summary['best_trial']}, "
             f"{o.sweep.summary['trials']} trials, {o.sweep.summary['trial_epochs']} trial-epochs)",
             f"best checkpoint  {redact(o.sweep.summary['best_checkpoint_uri'])}",
             f"ONNX model       {e.out_dir}/model.onnx (sha256 {e.sha256[:12]})",
             f"serving copy     {redact(e.serving_uri)}"]
    if config.mlflow.enabled and e.version:
        lines += [f"MLflow           {redact(resolve_tracking_uri(config.mlflow.tracking_uri))}, experiment "
                  f"{config.mlflow.experiment}: sweep run {o.sweep.mlflow_run_id}, training run {e.training_run_id}",
                  f"registry         {e.model_name} version {e.version}, aliases {', '.join(e.aliases)} "
                  f"({e.champion_reason})",
                  f"                 load it: mlflow.onnx.load_model('models:/{e.model_name}@{e.aliases[-1]}')"]
    lines += ["", "next:", f"  heimdall evaluate --model {e.out_dir}/model.onnx --format html   # report per split and receiver count",
              f"  heimdall predict --model {e.out_dir}/model.onnx --data RECORDINGS --out fixes.geojson"]
    if config.mlflow.enabled and e.version:
        lines.append(f"  heimdall models list {e.model_name}")
    lines.append("=" * 78)
    return "\n".join(lines)
