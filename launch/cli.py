"""`heimdall` command line: the launcher's entry point (`heimdall ...`, or `python -m launch.cli ...`
under `ray job submit`). Importing this module loads neither torch nor Ray: each command imports
what it needs when it runs, so `heimdall --help` is instant."""
from __future__ import annotations

import argparse
import sys

from heimdall.data.world import WORLD_PRESETS  # noqa: F401 - light import (no torch); also used by tests and benches

DESCRIPTION = """\
Heimdall training launcher: locate radio transmitters from the IQ that several WebSDR
receivers hear at once.

commands:
  data synth   generate a synthetic dataset (Parquet shards + manifest) locally or on s3://
  data import  recordings (SigMF capture folders, legacy *_iq.npy sessions) -> a dataset
  data info    counts per split, receivers, activity, SNR;   data validate: read every shard, check it
  fit          train on one device without Ray and print the test table beside the physics baseline
  train        train under Ray Train (local Ray, or the cluster in RAY_ADDRESS / a submitted job),
               checkpoints to run.storage_path (local or s3://), metrics to MLflow; resumable
  tune         hyperparameter sweep with Ray Tune; every trial is a Ray Train run (ASHA by default)
  export       best checkpoint -> ONNX (validated against PyTorch) -> S3/folder -> MLflow registry
  pipeline     the main job: dataset (if missing) -> sweep -> export and register the best model
  evaluate     any model (checkpoint, .onnx, models:/NAME@ALIAS) on a dataset: per split and per number
               of receivers that hear beside the physics baseline; Markdown/HTML report, MLflow optional
  predict      recorded IQ -> coordinates with uncertainty ellipses (CSV, JSON, GeoJSON)
  models       registry: `list NAME`, `promote NAME VERSION`, `rollback NAME` of the champion alias

typical first run (embedded defaults: local Ray, sqlite MLflow, local model store, synthetic data):
  heimdall pipeline
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="heimdall", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    data = sub.add_parser("data", help="dataset commands").add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    s = data.add_parser("synth", help="generate a synthetic dataset",
                        description="Generate a synthetic dataset. Same arguments and seed give the same "
                                    "data whatever --workers is. The manifest is written last.")
    s.add_argument("--out", help="output folder or s3://bucket/prefix (default: the config's data.uri)")
    s.add_argument("--samples", type=int, help="number of samples (default: the config's synth.samples)")
    s.add_argument("--seed", type=int, help="world and sample seed (default: synth.seed, else 0)")
    s.add_argument("--iq-length", type=int, help="IQ samples per receiver (default: synth.iq_length, else 1024)")
    s.add_argument("--sample-rate", type=float, default=48_000.0, help="sample rate in Hz (default 48000)")
    s.add_argument("--workers", type=int, help="generator processes (default: synth.workers, else 1)")
    s.add_argument("--shard-size", type=int, default=2048, help="sample ids per generation chunk (default 2048)")
    s.add_argument("--receivers", help="receiver CSV (name,latitude,longitude,altitude_m); default: packaged network")
    s.add_argument("--world-preset", choices=sorted(WORLD_PRESETS),
                   help="world physics preset (low-noise: easier world for quick runs and CI; default: "
                        "synth.world_preset, else default)")
    s.add_argument("--world", action="append", default=[], metavar="KEY=VALUE",
                   help="override a world parameter, e.g. --world terrain_std_db=4 --world band=70cm")
    s.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")

    i = data.add_parser("import", help="recordings -> dataset", formatter_class=argparse.RawDescriptionHelpFormatter,
                        description=IMPORT_HELP)
    i.add_argument("src", help="folder of recordings (searched recursively), one capture folder or one *_iq.npy")
    i.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    i.add_argument("--receivers", help="receiver CSV (name,latitude,longitude,altitude_m); default: packaged network")
    i.add_argument("--iq-length", type=int, help="use the first N samples of every recording (default: all, equal)")
    i.add_argument("--sample-rate", type=float, help="sample rate of legacy sessions without metadata (Hz)")
    i.add_argument("--shard-size", type=int, default=1024, help="captures per shard (default 1024)")
    i.add_argument("--path-loss-exponent", type=float, default=3.0, help="for the physics baseline (default 3.0)")
    i.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    n = data.add_parser("info", help="counts per split, receivers, activity per receiver, SNR distribution")
    n.add_argument("uri", help="dataset folder or s3:// URI")
    n.add_argument("--max-rows", type=int, default=20_000, help="captures read for activity and SNR (default 20000)")
    n.add_argument("--json", action="store_true", help="print JSON instead of the summary")
    v = data.add_parser("validate", help="read every shard; report corrupt or inconsistent ones by name (exit 1)")
    v.add_argument("uri", help="dataset folder or s3:// URI")

    f = sub.add_parser("fit", help="train on one device (no Ray)",
                       description="Train LocalizationNet on one device. Config is YAML; dotted key=value "
                                   "overrides follow, e.g. `heimdall fit --config c.yaml optim.lr=1e-3`. "
                                   "Re-running with the same trainer.out_dir and config continues from its last "
                                   "checkpoint (a finished run is reported, not retrained).")
    f.add_argument("--config", help="YAML config (default: embedded defaults)")
    f.add_argument("--resume", action="store_true", help=RESUME_HELP.format(key="trainer.out_dir"))
    f.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")

    t = sub.add_parser("train", help="train under Ray Train (DDP over workers, resumable, MLflow)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=TRAIN_HELP)
    t.add_argument("--config", help="YAML config (default: embedded defaults)")
    t.add_argument("--resume", action="store_true", help=RESUME_HELP.format(key="run.name"))
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. ray.num_workers=2")

    w = sub.add_parser("tune", help="hyperparameter sweep (Ray Tune over Ray Train)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=TUNE_HELP)
    w.add_argument("--config", help="YAML config with a `tune` section (default: embedded defaults)")
    w.add_argument("--resume", action="store_true", help=RESUME_HELP.format(key="tune.name"))
    w.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. tune.num_samples=4")

    e = sub.add_parser("export", help="export the best model to ONNX, upload it, register it in MLflow",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=EXPORT_HELP)
    e.add_argument("--from", dest="source", help="sweep_summary.json, train output folder, checkpoint or runs:/<id>")
    e.add_argument("--force", action="store_true", help="take the champion alias even without beating it")
    e.add_argument("--config", help="YAML config with `export` and `mlflow` sections (default: embedded defaults)")
    e.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. export.models_uri=s3://models/heimdall")

    ev = sub.add_parser("evaluate", help="evaluate any model on a dataset beside the physics baseline",
                        formatter_class=argparse.RawDescriptionHelpFormatter, description=EVALUATE_HELP)
    ev.add_argument("--model", required=True, help="checkpoint (.ckpt or Ray checkpoint folder, local or s3://), "
                                                   ".onnx file, or models:/NAME@ALIAS | models:/NAME/VERSION")
    ev.add_argument("--data", help="dataset folder or s3:// URI (default: the one the model was trained on)")
    ev.add_argument("--splits", default="train,val,test", help="comma-separated (default train,val,test)")
    ev.add_argument("--out", help="report folder (default runs/evaluate/<model>)")
    ev.add_argument("--format", choices=("md", "html"), default="md", help="report format (default md)")
    ev.add_argument("--mlflow", action="store_true", help="log metrics and the report to an MLflow run")
    ev.add_argument("--batch-size", type=int, default=256)
    pr = sub.add_parser("predict", help="recorded IQ -> coordinates with uncertainty ellipses",
                        formatter_class=argparse.RawDescriptionHelpFormatter, description=PREDICT_HELP)
    pr.add_argument("--model", required=True, help="checkpoint, .onnx file or models:/NAME@ALIAS")
    pr.add_argument("--data", help="recordings (folder, capture folder, *_iq.npy) or a dataset")
    pr.add_argument("--out", help="output file (default predictions.<format>)")
    pr.add_argument("--format", choices=("csv", "json", "geojson"), help="default: from --out's suffix, else csv")
    pr.add_argument("--receivers", help="receiver CSV giving positions the recordings lack (default: packaged network)")
    deprecated(pr, "--input", "--data")
    deprecated(pr, "--output", "--out")

    q = sub.add_parser("pipeline", help="dataset -> sweep -> export and register the best model (the main job)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=PIPELINE_HELP)
    q.add_argument("--config", help="YAML merged over the embedded pipeline defaults")
    q.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. tune.num_samples=8")

    models = sub.add_parser("models", help="registry: list versions, promote or roll back the champion",
                            formatter_class=argparse.RawDescriptionHelpFormatter, description=MODELS_HELP)
    m = models.add_subparsers(dest="models_command", metavar="MODELS_COMMAND")
    ml = m.add_parser("list", help="versions with metrics, aliases, serving copies and hashes; alias history")
    mp = m.add_parser("promote", help="move `champion` to a version (same gate as export unless --force)")
    mr = m.add_parser("rollback", help="move `champion` back to its previous holder")
    for c in (ml, mp, mr):
        c.add_argument("name", help="registered model name, e.g. heimdall-localizer")
    mp.add_argument("version", help="the version number to promote")
    mp.add_argument("--force", action="store_true", help="take `champion` even without beating the current holder")
    mp.add_argument("--data", metavar="URI", help="dataset to compare both versions on when their test splits differ")
    for c in (mp, mr):
        c.add_argument("--reason", default="", metavar="TEXT", help="why, recorded in the audit tag")
    for c in (s, i, n, v, ev, pr, ml, mp, mr):  # one grammar: every command takes a config and overrides
        c.add_argument("--config", help="YAML config: any heimdall config file works; the sections this command uses apply")
        c.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="config overrides, e.g. mlflow.tracking_uri=http://mlflow:5000 mlflow.experiment=field")
    for c in (ev, pr, ml, mp, mr):
        deprecated(c, "--tracking-uri", "mlflow.tracking_uri=URI")
    return p


def deprecated(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """An old spelling still accepted (hidden from --help); `command_config` maps it and says so."""
    parser.add_argument(old, dest=f"old_{old.lstrip('-').replace('-', '_')}", help=argparse.SUPPRESS,
                        metavar=new)


def command_config(args, command: str):
    """The config of a command without a schema of its own: any heimdall config file, overrides on
    top. Old spellings are mapped with a one-line notice on stderr."""
    from heimdall.config import PipelineConfig, load_config

    overrides = list(getattr(args, "overrides", []) or [])
    for old, new in (("input", "data"), ("output", "out")):
        value = getattr(args, f"old_{old}", None)
        if value is not None:
            print(f"heimdall {command}: --{old} is deprecated, use --{new}", file=sys.stderr)
            if getattr(args, new, None) is None:
                setattr(args, new, value)
    if getattr(args, "old_tracking_uri", None):
        print(f"heimdall {command}: --tracking-uri is deprecated, use mlflow.tracking_uri=URI", file=sys.stderr)
        overrides.insert(0, f"mlflow.tracking_uri={args.old_tracking_uri}")
    return load_config(args.config, overrides, schema=PipelineConfig)


RESUME_HELP = ("continue the run stored under this {key} although its config differs (without it a changed "
               "config is refused, listing the changed keys)")


PIPELINE_HELP = """\
The main job, end to end on embedded defaults (nothing needs to run beforehand):
  1. dataset: synthesise `synth.samples` at data.uri unless a dataset is there (quick preset: 12k
     samples x 512 IQ of the small low-noise world, so a tiny model learns in CPU minutes)
  2. sweep: `heimdall tune` (Ray Tune over Ray Train; local Ray unless RAY_ADDRESS / ray job submit)
  3. export: `heimdall export` of the best trial: ONNX validated against PyTorch, serving copy to
     export.models_uri (runs/models or s3://...), MLflow registry version with aliases
Prints where everything went (MLflow runs, registered version and aliases, serving copy, local
outputs) and the test table from the exported model beside the physics baseline. Every stage
resumes: run it again after an interruption. Sections: synth, data, model, optim, trainer, ray,
run, mlflow, tune, export (see `heimdall tune --help`, `heimdall export --help`); the embedded
defaults are heimdall/resources/pipeline.yaml.

examples:
  heimdall pipeline
  heimdall pipeline tune.num_samples=8 trainer.max_epochs=10 export.models_uri=s3://models/heimdall
"""


MODELS_HELP = """\
The MLflow registry of exported models. `champion` is what serving loads, `candidate` the latest
validated export.
  list NAME                 versions newest first: aliases, test P50/P68/P95 (metres), coverage,
                            baseline P68, sha256, serving copy, training run; the alias history
  promote NAME VERSION      move `champion` to VERSION if its test P68 beats the holder's on the
                            same test split (their tags, else both measured on VERSION's test
                            dataset or --data URI); --force skips the comparison, never the check
                            that the version's MLflow model and serving copy read back intact
  rollback NAME             move `champion` back to the holder before the current one (replays the
                            audit trail: two rollbacks go back two holders)
Every change is recorded on the registered model as an `audit.<time>.<alias>` tag: who, when, from,
to, action and reason. A refusal exits 1 and changes nothing.

examples:
  heimdall models list heimdall-localizer
  heimdall models promote heimdall-localizer 7 --reason "better on the March captures"
  heimdall models rollback heimdall-localizer --reason "bad fixes near the coast"
"""


IMPORT_HELP = """\
Turn recordings with known transmitter positions into a dataset (Parquet shards + manifest).
Layouts (documented in heimdall/data/recordings.py and docs/data.md):
  SigMF: SRC/<capture>/<receiver>.sigmf-data (ci16_le or cf32_le IQ) + <receiver>.sigmf-meta with
         core:sample_rate, core:geolocation (receiver), heimdall:receiver, heimdall:transmitter,
         captures[0].core:frequency / core:datetime
  legacy (earlier Heimdall service): {session}_iq.npy (R x L complex or R x 2 x L),
         {session}_label.npy [lat, lon], optional {session}_metadata.json
Checks before writing anything: one sample rate, equal lengths (or --iq-length), receivers known to
the network, transmitter positions present. Errors name the file. The manifest is written last and
a failure removes what was written. A capture keeps its split across re-imports (hash of its id).

example:
  heimdall data import recordings/ --out data/field-2026-05
"""


EVALUATE_HELP = """\
Evaluate a model on a dataset, through the serving contract (so a checkpoint and its ONNX export
give the same numbers). For every split: P50/P68/P95 error (haversine metres), 1/2-sigma coverage
and NLL beside the physics baseline and the centroid, then the same per number of receivers that
hear. Writes report.md (or .html), metrics.json and plots (error CDF, map of predictions
with ellipses vs truth) to --out; --mlflow logs them to a run.

examples:
  heimdall evaluate --model runs/pipeline/export/<sha12>/model.onnx
  heimdall evaluate --model models:/heimdall-localizer@champion --data data/field-2026-05 --format html --mlflow
"""


PREDICT_HELP = """\
Locate transmitters in recordings: one row per capture with latitude/longitude, east/north metres,
the 1-sigma ellipse (semi-axes in metres, bearing of the major axis) and the receivers used; with
the truth known (sidecar or label), also the error in metres. Output: CSV, JSON, or GeoJSON (a
point per capture and its ellipse as a polygon).

example:
  heimdall predict --model models:/heimdall-localizer@champion --data recordings/ --out fixes.geojson
"""


EXPORT_HELP = """\
Export a trained model for serving. One ONNX graph takes what the receiver network delivers (int16
IQ, receiver lat/lon/alt, receiver states) and returns latitude/longitude (float64), east/north metres
and the 1-sigma uncertainty ellipse; feature extraction and normalisation are inside the graph.

Steps, each of which must pass before the next:
  1. MLflow and the model store answer (fails in seconds otherwise)
  2. export (opset >= 17, dynamic batch and receiver count), onnx.checker full check
  3. ONNX Runtime vs PyTorch on the whole test split and on random inputs (receiver subsets,
     batch 1 and odd sizes): east/north and lat/lon under export.parity_tolerance_m (1 m) or under
     export.ellipse_rtol of the smaller semi-axis, ellipse within export.ellipse_rtol (1e-3); the
     test table is recomputed from the ONNX outputs
  4. upload to export.models_uri under <sha256>.onnx (S3: multipart, verified by size and hash)
  5. log to MLflow (in the training run), check its bytes equal the serving copy, register a version
     of export.model_name; alias `candidate` always, `champion` only if its test P68 beats the
     current champion's on the same test split (or --force)
Any failure exits non-zero with nothing uploaded and nothing registered. Re-running is idempotent.

Sources (--from): a sweep_summary.json (best trial's best checkpoint), a `heimdall train` output
folder (train_summary.json), a checkpoint file or Ray checkpoint folder (local or s3://), runs:/<id>.
Config: export.models_uri=runs/models (or s3://bucket/prefix; endpoint from export.s3_endpoint or
AWS_ENDPOINT_URL_S3), export.model_name=heimdall-localizer, export.data_uri (default: the training
dataset), mlflow.tracking_uri (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).

example:
  heimdall export --from runs/sweep/sweep_summary.json export.models_uri=s3://models/heimdall
"""


TUNE_HELP = """\
Search hyperparameters with Ray Tune. Every trial is a Ray Train run of `heimdall train` (so a
trial can itself be multi-GPU), reporting every epoch to the scheduler. Config: everything of
`heimdall train`, plus a `tune` section:
  tune.name=heimdall-sweep   the same name again resumes the sweep (finished trials are not rerun)
  tune.num_samples=8         trials
  tune.metric=val_p68_m      tune.mode=min
  tune.scheduler=asha        asha | median | fifo
  tune.search=random         random | optuna (TPE)
  tune.grace_period=1        epochs every trial gets before it may be stopped
  tune.max_concurrent_trials derived from the cluster's GPUs (or CPUs) and ray.num_workers
  tune.time_budget_s         wall-clock budget of the sweep
  tune.space                 in the YAML: dotted config key -> one distribution, e.g.
                               optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
                               data.batch_size: {choice: [32, 64, 128]}
                               optim.warmup_steps: {randint: [0, 200]}
                               model.dropout: {uniform: [0.0, 0.2]}
Writes trials.csv, sweep_summary.json (best trial, metric, best checkpoint URI: the input of
`heimdall export`) and plots to trainer.out_dir; MLflow: one parent run, a child run per trial.

example:
  heimdall tune --config configs/sweep.yaml tune.num_samples=4
"""


TRAIN_HELP = """\
Train LocalizationNet with Ray Train's TorchTrainer: each worker runs the same Lightning fit as
`heimdall fit` under Ray's DDP strategy, reading its share of the data through Ray Data.

Ray: with RAY_ADDRESS (or under `ray job submit`) the run uses that cluster; otherwise it starts a
private local Ray. Config sections beyond `heimdall fit`'s:
  ray.num_workers=1          data-parallel workers
  ray.use_gpu=null           null: one GPU per worker when the cluster has GPUs
  ray.cpus_per_worker=null   null: the cluster's CPUs minus ray.data_cpus, shared (torch threads follow)
  ray.data_cpus=1            CPUs kept free for Ray Data read tasks
  run.name, run.storage_path checkpoints live in STORAGE/NAME (local folder or s3://bucket/prefix);
                             starting the same name and config again continues from its latest
                             checkpoint; a changed config needs --resume; a finished run is reported
  run.keep_checkpoints=2     best K by trainer.monitor (val_p68_m), plus the latest
  run.max_failures=2         restarts of the worker group from the latest checkpoint
  mlflow.tracking_uri=null   null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here
  mlflow.experiment=heimdall

Prints one line per epoch, then the test table beside the physics baseline and the URI of the best
checkpoint. Local outputs (config, test table, plots) go to trainer.out_dir.

example:
  heimdall train --config configs/quick.yaml ray.num_workers=2 run.name=quick-ddp
"""


SYNTH_DEFAULTS = {"seed": 0, "iq_length": 1024, "workers": 1, "world_preset": "default"}


def cmd_synth(args) -> int:
    from heimdall.config import ConfigError, parse_overrides
    from heimdall.data.synth import SynthSpec, synthesize

    config = command_config(args, "data synth")
    given = config.synth.model_fields_set  # a flag wins, then the config, then the command's own default

    def pick(key: str):
        flag = getattr(args, key)
        return flag if flag is not None else getattr(config.synth, key) if key in given else SYNTH_DEFAULTS.get(key)
    out = args.out or (config.data.uri if "uri" in config.data.model_fields_set else None)
    if not out or pick("samples") is None:
        raise ConfigError("data synth needs --out (or data.uri) and --samples (or synth.samples)")
    preset = pick("world_preset")
    if preset not in WORLD_PRESETS:
        raise ConfigError(f"world preset {preset!r} is not one of {sorted(WORLD_PRESETS)}")
    world = {**WORLD_PRESETS[preset], **parse_overrides(args.world)}
    try:
        spec = SynthSpec(out=out, samples=pick("samples"), seed=pick("seed"), iq_length=pick("iq_length"),
                         sample_rate_hz=args.sample_rate, shard_size=args.shard_size,
                         receivers=args.receivers, world=world)
        spec.world_params()
    except ValueError as e:
        raise ConfigError(f"world parameters: {e}") from None
    if preset != "default":
        print(f"world preset {preset}: {WORLD_PRESETS[preset]}")
    manifest = synthesize(spec, workers=pick("workers") or 1, overwrite=args.overwrite)
    print(written(manifest, "samples", out))
    return 0


def written(manifest: dict, what: str, out: str) -> str:
    c = manifest["counts"]
    return (f"wrote {c['total']} {what} (train {c['train']}, val {c['val']}, test {c['test']}) "
            f"in {len(manifest['shards'])} shards to {out}")


def cmd_fit(args) -> int:
    from heimdall.config import load_config
    from heimdall.training.fit import fit

    config = load_config(args.config, args.overrides)
    result = fit(config, resume=args.resume)
    print(f"best checkpoint: {result.best_checkpoint}")
    return 0


def cmd_train(args) -> int:
    from heimdall.config import TrainConfig, load_config

    config = load_config(args.config, args.overrides, schema=TrainConfig)
    from launch.train import train  # imports Ray: only after the config is known to be valid

    train(config, resume=args.resume)
    return 0


def cmd_tune(args) -> int:
    from heimdall.config import TuneConfig, load_config

    config = load_config(args.config, args.overrides, schema=TuneConfig)
    from launch.tune import tune_sweep

    tune_sweep(config, resume=args.resume)
    return 0


def cmd_export(args) -> int:
    from heimdall.config import ExportConfig, load_config

    overrides = list(args.overrides)
    if args.source:
        overrides.append(f"export.source={args.source}")
    if args.force:
        overrides.append("export.force_champion=true")
    config = load_config(args.config, overrides, schema=ExportConfig)
    from launch.export import export_model

    export_model(config)
    return 0


def cmd_pipeline(args) -> int:
    from importlib import resources

    import yaml

    from heimdall.config import PipelineConfig, load_config

    defaults = yaml.safe_load(resources.files("heimdall").joinpath("resources/pipeline.yaml").read_text())
    config = load_config(args.config, args.overrides, schema=PipelineConfig, base=defaults)
    from launch.pipeline import run_pipeline

    run_pipeline(config)
    return 0


def cmd_import(args) -> int:
    from heimdall.data.importer import import_recordings

    command_config(args, "data import")
    m = import_recordings(args.src, args.out, args.receivers, args.iq_length, args.sample_rate, args.shard_size,
                          args.overwrite, args.path_loss_exponent)
    print(written(m, "captures", args.out))
    return 0


def cmd_info(args) -> int:
    import json

    from heimdall.data.quality import format_info, info

    command_config(args, "data info")
    d = info(args.uri, args.max_rows)
    print(json.dumps(d, indent=1) if args.json else format_info(d))
    return 0


def cmd_validate(args) -> int:
    from heimdall.data.quality import validate

    command_config(args, "data validate")
    print(f"validating {args.uri}")
    problems = validate(args.uri)
    for p in problems:
        print(f"PROBLEM {p}")
    print(f"{args.uri}: " + (f"{len(problems)} problem(s)" if problems else "every shard matches the manifest"))
    return 1 if problems else 0


def cmd_evaluate(args) -> int:
    from pathlib import Path

    from heimdall.data.dataset import Dataset
    from heimdall.evaluation.evaluate import evaluate_splits
    from heimdall.serving.inference import open_model
    from heimdall.evaluation.metrics import text_table
    from heimdall.evaluation.report import log_to_mlflow, receivers_table, write_report
    from heimdall.tracking import resolve_tracking_uri

    config = command_config(args, "evaluate")
    model = open_model(args.model, config.mlflow.tracking_uri, experiment=config.mlflow.experiment)
    uri = args.data or model.trained_on
    if not uri:
        raise ValueError(f"{args.model} does not record its dataset: give --data")
    dataset = Dataset.open(uri)
    evaluation = evaluate_splits(model, dataset, [x.strip() for x in args.splits.split(",") if x.strip()], args.batch_size)
    for split, e in evaluation.items():
        print(e["report"].table(f"\n{split} split: {e['report'].count:,} captures of {uri}, {args.model}"))
        print(text_table(receivers_table(e)))
    tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in args.model.rstrip("/").split("/")[-1])
    report = write_report(evaluation, model, dataset, Path(args.out or f"runs/evaluate/{tag}"), args.format)
    print(f"\nreport: {report}")
    if args.mlflow:
        run_id = log_to_mlflow(evaluation, model, dataset, report, resolve_tracking_uri(config.mlflow.tracking_uri),
                               config.mlflow.experiment)
        print(f"MLflow run: {run_id}")
    return 0


def cmd_predict(args) -> int:
    from pathlib import Path

    from heimdall.serving.inference import open_model
    from heimdall.serving.predict import FORMATS, predict, write

    config = command_config(args, "predict")
    if not args.data:
        raise ValueError("predict needs --data RECORDINGS (a folder, capture folder, *_iq.npy or dataset)")
    suffix = Path(args.out).suffix.lstrip(".").lower() if args.out else ""
    fmt = args.format or (suffix if suffix in FORMATS else "csv")
    model = open_model(args.model, config.mlflow.tracking_uri, experiment=config.mlflow.experiment)
    rows = predict(model, args.data, args.receivers, log=lambda line: print(line, file=sys.stderr))
    out = write(rows, Path(args.out or f"predictions.{fmt}"), fmt, model)
    errors = [r["error_m"] for r in rows if "error_m" in r]
    print(f"{len(rows)} captures -> {out} ({fmt})"
          + (f"; where the truth is known ({len(errors)}): median error {sorted(errors)[len(errors) // 2]:,.0f} m" if errors else ""))
    return 0


def cmd_models(args) -> int:
    import mlflow

    from heimdall.registry import promotion
    from heimdall.registry.client import Registry
    from heimdall.tracking import redact, resolve_tracking_uri

    config = command_config(args, f"models {args.models_command}")
    registry = Registry(resolve_tracking_uri(config.mlflow.tracking_uri), config.mlflow.experiment)
    try:
        if args.models_command == "list":
            print(promotion.format_versions(registry, args.name))
        elif args.models_command == "promote":
            promotion.promote(registry, args.name, args.version, args.force, args.data, args.reason)
        else:
            promotion.rollback(registry, args.name, args.reason)
    except mlflow.exceptions.MlflowException as e:
        raise RuntimeError(f"MLflow at {redact(registry.uri)}: {redact(e)}") from None
    return 0


def one_line(e: BaseException) -> str:
    """pyarrow's S3 errors span lines (the AWS detail on the next); an operator wants the first."""
    from heimdall.storage import first_line
    from heimdall.tracking import redact

    return redact(first_line(e) if isinstance(e, OSError) else str(e))


EXTRAS = {"ray": "ray", "optuna": "ray", "mlflow": "mlflow", "boto3": "mlflow", "onnx": "export",
          "onnxruntime": "export", "onnxscript": "export"}  # optional module -> the pyproject extra that has it


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # argparse takes positional overrides only before the first option that follows them: the rest
    # come back here ("promote NAME 2 --force mlflow.tracking_uri=...").
    overrides = [x for x in extra if "=" in x and not x.startswith("-")]
    if len(overrides) != len(extra) or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(x for x in extra if x not in overrides or not hasattr(args, 'overrides'))}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    handlers = {("data", "synth"): cmd_synth, ("fit", None): cmd_fit, ("train", None): cmd_train, ("tune", None): cmd_tune,
                ("export", None): cmd_export, ("pipeline", None): cmd_pipeline, ("data", "import"): cmd_import,
                ("data", "info"): cmd_info, ("data", "validate"): cmd_validate, ("evaluate", None): cmd_evaluate,
                ("predict", None): cmd_predict,
                **{("models", c): cmd_models for c in ("list", "promote", "rollback")}}
    handler = handlers.get((args.command, getattr(args, "data_command", None) or getattr(args, "models_command", None)))
    if handler is None:
        parser.print_help()
        return 0 if args.command is None else 2
    name = " ".join(x for x in (args.command, getattr(args, "data_command", None),
                                 getattr(args, "models_command", None)) if x)
    try:
        return handler(args)
    except ModuleNotFoundError as e:
        extra = EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"heimdall {name}: error: needs the '{extra}' extra ({e.name} is not installed): "
              f"pip install 'heimdall[{extra}]'", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        # Config, dataset, storage and input errors: one clear line, no traceback.
        print(f"heimdall {name}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a run that started and failed (e.g. Ray Train gave up)
        print(f"heimdall {name}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
