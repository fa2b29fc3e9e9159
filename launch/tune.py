"""`heimdall tune`: a Ray Tune sweep whose every trial is a Ray Train run (Train V2 over Tune).

Each trial is a function trainable that builds and fits a TorchTrainer (launch.train.fit_on_ray)
with a deterministic run name per trial and Ray's TuneReportCallback, so the scheduler sees every
epoch. Trial drivers take no CPU but one `driver_slot` (a custom resource): with Ray's default of
1 CPU per driver, drivers take every CPU of a small cluster and the trials' workers wait forever.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
from ray import tune

from heimdall import faults, storage
from heimdall.config import ConfigError, TrainConfig, TuneConfig, flatten, merge
from heimdall.evaluation.metrics import SplitReport
from heimdall.storage import CHECKPOINT_FILE
from heimdall.training.run_record import RunRecord, jsonable
from heimdall.training.search_space import Dimension, apply, check_space, parse_space
from heimdall.tracking import EpochLog, RunTracker, redact, resolve_tracking_uri, run_key
from launch.cluster import (DRIVER_RESOURCE, Cluster, WorkerPlan, check_shared_storage, connect, joining,
                            node_cpus, plan_workers, resolve_gpu)
from launch.train import EPOCHS_DONE, absolute, apply_plan, epochs_of, evaluate_best, fit_on_ray, prepare, run_tags

EPOCH = EPOCHS_DONE  # the model's epochs: unlike training_iteration it continues when a killed sweep resumes


@dataclass
class SweepOutcome:
    summary: dict
    table: list[dict]
    out_dir: str
    curves: dict  # trial -> (epochs, metric per epoch)
    mlflow_run_id: str | None = None  # the sweep's parent run
    already_finished: bool = False


def domains(dims: list[Dimension]) -> dict:
    make = {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}
    lists = {"choice": tune.choice, "grid": tune.grid_search}
    return {d.key: lists[d.kind](list(d.args)) if d.kind in lists else make[d.kind](*d.args) for d in dims}


def scheduler(config: TuneConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    s, epochs = config.tune, config.trainer.max_epochs
    return {
        "asha": lambda: ASHAScheduler(time_attr=EPOCH, max_t=epochs, grace_period=s.grace_period,
                                      reduction_factor=s.reduction_factor),
        "median": lambda: MedianStoppingRule(time_attr=EPOCH, grace_period=s.grace_period, min_samples_required=2),
        "fifo": FIFOScheduler,
    }[s.scheduler]()


def rungs(config: TuneConfig) -> list[int]:
    """The epochs at which ASHA compares trials (grace period x reduction factor^k); none for the others."""
    s, out = config.tune, []
    if s.scheduler == "asha":
        rung = s.grace_period
        while rung < config.trainer.max_epochs:
            out.append(rung)
            rung *= s.reduction_factor
    return out


def searcher(config: TuneConfig, concurrent: int):
    if config.tune.search == "random":
        from ray.tune.search import BasicVariantGenerator

        # Tune applies max_concurrent_trials only to the generator it makes itself: pass it here.
        return BasicVariantGenerator(random_state=config.tune.seed, max_concurrent=concurrent)
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(metric=config.tune.metric, mode=config.tune.mode, seed=config.tune.seed)


def plan_sweep(config: TuneConfig, cluster: Cluster) -> tuple[WorkerPlan, int]:
    """Per-trial workers and how many trials run at once, or a clear refusal. On a joined cluster
    (autoscaling: its GPU nodes may not exist yet) concurrency is what was asked, capped by the
    drivers' slots, not what fits now."""
    s, scale = config.tune, config.ray
    slots = int(cluster.resources.get(DRIVER_RESOURCE, 0))
    if slots < 1:
        raise ConfigError(f"this Ray cluster offers no '{DRIVER_RESOURCE}' resource for trial drivers; start its "
                          f"head with --resources='{{\"{DRIVER_RESOURCE}\": 4}}' (cluster.yaml does)")
    cpus, gpus, n = cluster.resources.get("CPU", 0.0), cluster.resources.get("GPU", 0.0), scale.max_workers
    use_gpu = resolve_gpu(scale, cluster)
    cpw = scale.cpus_per_worker or (node_cpus(cluster, use_gpu, scale.data_cpus) if cluster.joined else None) or 1.0
    fits = math.floor(gpus / n) if use_gpu else math.floor((cpus - scale.data_cpus) / (n * cpw) + 1e-9)
    wanted = s.max_concurrent_trials or (slots if cluster.joined else fits)
    concurrent = min(wanted, s.num_samples, slots)
    if scale.check_resources and not cluster.joined and (fits < 1 or concurrent > fits):
        what = f"{n} GPU(s)" if use_gpu else f"{n} x {cpw:g} CPU + ray.data_cpus={scale.data_cpus:g}"
        raise ConfigError(f"tune.max_concurrent_trials={concurrent} trials of ray.num_workers={n} need {what} each; "
                          f"the cluster has {cpus:g} CPU and {gpus:g} GPU")
    plan = plan_workers(scale.model_copy(update={"cpus_per_worker": cpw, "use_gpu": use_gpu}), cluster)
    return plan, max(1, concurrent)


def check_state_api() -> None:
    """Tune over Train needs Ray's state API (the dashboard) to release finished trials' workers."""
    from ray.util.state import list_placement_groups

    try:
        list_placement_groups(limit=1, timeout=10)
    except Exception as e:  # noqa: BLE001 - any failure means the same thing here
        raise ConfigError("this Ray cluster has no state API (dashboard): Ray 2.60 could not release finished "
                          "trials' placement groups and later trials would wait forever. Start Ray with "
                          f"ray[default] and its dashboard. ({type(e).__name__})") from None


def check_single_instance() -> None:
    """Ray Train 2.60 releases a finished trial's workers from a helper actor that finds its cluster
    by auto-detection; with two Ray instances on this host that fails ("Found multiple active Ray
    instances"), the workers stay reserved and the next trial waits forever. Refuse instead."""
    from ray._private.services import find_gcs_addresses

    others = set(find_gcs_addresses())
    env = (ray.get_runtime_context().runtime_env or {}).get("env_vars", {})
    if len(others) > 1 and "RAY_ADDRESS" not in env:
        raise ConfigError(f"more than one Ray instance runs on this host ({', '.join(sorted(others))}): Ray Train "
                          "could not release finished trials' workers and the sweep would hang. Stop the other "
                          "instance, or submit the sweep as a job whose runtime env sets RAY_ADDRESS to its cluster.")


def run_trial(params: dict, base: dict, sweep: dict) -> None:
    """One trial = one Ray Train run (runs in the trial's driver actor)."""
    from ray.data import DataContext
    from ray.tune.integration.ray_train import TuneReportCallback

    DataContext.get_current().enable_progress_bars = False  # trial drivers plan reads too: keep logs readable
    faults.install(sweep["faults"])  # a trial driver does not inherit the command's environment
    trial_id = tune.get_context().get_trial_id()
    config = TrainConfig.model_validate(apply(base, params))
    config.run.name = f"{sweep['name']}-{trial_id}"  # deterministic: a resumed sweep resumes the same Train run
    config.run.storage_path = sweep["trials_storage"]
    config.trainer.out_dir = f"{sweep['out_dir']}/trials/{trial_id}"
    p = prepare(config)
    plan = WorkerPlan(**sweep["plan"])
    apply_plan(p.config, plan)
    mlflow = None
    if sweep["mlflow"]:
        tracker = RunTracker(sweep["mlflow"]["uri"], config.mlflow.experiment)
        tracker.open(run_key(config.run.storage_path, config.run.name), config.run.name, params=flatten(p.config),
                     tags={**run_tags(config, p.dataset), "mlflow.parentRunId": sweep["mlflow"]["parent"],
                           "tune.trial_id": trial_id})
        mlflow = {"uri": tracker.uri, "run_id": tracker.run_id}
    try:
        result = fit_on_ray(p, plan, mlflow, callbacks=[TuneReportCallback()])
        if mlflow:
            EpochLog(tracker.uri, tracker.run_id).send_patiently(epochs_of(result.checkpoint), print)
    except Exception:
        if mlflow:
            tracker.finish("FAILED")
        raise  # Tune records the trial as errored and the sweep goes on
    if mlflow:
        tracker.finish()


def tune_sweep(config: TuneConfig, log=print, resume: bool = False) -> SweepOutcome:
    config = absolute(config)
    s = config.tune
    dims = parse_space(s.space)
    # A trial stops early, keeps checkpoints and is ranked by what the sweep ranks it by.
    base = merge(config.model_dump(exclude={"tune"}), {"trainer": {"monitor": s.metric}})
    check_space(dims, base, TrainConfig)
    sched = scheduler(config)
    check_shared_storage(config, Cluster({}, joined=joining()))
    checked = prepare(TrainConfig.model_validate(base))  # dataset readable, storage writable
    fs, root = checked.fs, checked.root
    is_s3 = config.run.storage_path.startswith("s3://")
    path = storage.join(root, s.name)
    record = RunRecord(fs, path)
    stored = record.check(jsonable(flatten(config)), resume, f"sweep {s.name} in {redact(config.run.storage_path)}",
                          "tune.name", progress=tune.Tuner.can_restore(path, storage_filesystem=fs if is_s3 else None))
    if stored:  # a sweep has no final step apart from its summary: "trained" does not occur
        log(f"sweep {s.name} already finished ({stored['updated']}): best trial {stored['summary']['best_trial']}, "
            f"{s.metric} {stored['summary']['best_metric']:,.0f}; best checkpoint "
            f"{stored['summary']['best_checkpoint_uri']}. Choose a new tune.name to sweep again.")
        return SweepOutcome(stored["summary"], stored["table"], stored["out_dir"], stored["curves"],
                            stored["mlflow_run_id"], already_finished=True)
    cluster = connect(log)
    check_shared_storage(config, cluster)
    check_single_instance()  # first: with two instances the state API is unreachable too, for this reason
    check_state_api()
    plan, concurrent = plan_sweep(config, cluster)
    tracker = RunTracker(resolve_tracking_uri(config.mlflow.tracking_uri), config.mlflow.experiment) \
        if config.mlflow.enabled else None
    record.start(jsonable(flatten(config)))
    log(f"sweep {s.name}: {s.num_samples} trials, {s.scheduler} scheduler, {s.search} search, {concurrent} at once; "
        f"each trial {plan.workers} worker(s) x {plan.cpus_per_worker:g} CPU{', 1 GPU' if plan.use_gpu else ''}")
    if plan.waits:
        log(f"waiting for the autoscaler: {plan.waits} now (trials start as nodes join)")
    parent = None
    if tracker:
        tracker.open(run_key(config.run.storage_path, s.name), s.name, params=flatten(config),
                     tags={"heimdall.kind": "sweep"})
        parent = tracker.run_id
    out = Path(config.trainer.out_dir)
    sweep = {"name": s.name, "trials_storage": storage.join(config.run.storage_path, f"{s.name}-trials"),
             "faults": faults.settings(),
             "out_dir": str(out), "plan": asdict(plan),
             "mlflow": {"uri": tracker.uri, "parent": parent} if tracker else None}
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base, sweep=sweep),
                                    {"CPU": 0, DRIVER_RESOURCE: 1})
    if tune.Tuner.can_restore(path, storage_filesystem=fs if is_s3 else None):
        log(f"resuming sweep {s.name} from {storage.join(config.run.storage_path, s.name)}")
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs if is_s3 else None)
    else:
        tuner = tune.Tuner(
            trainable, param_space=domains(dims),
            tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, scheduler=sched, search_alg=searcher(config, concurrent),
                                        num_samples=s.num_samples, max_concurrent_trials=concurrent,
                                        time_budget_s=s.time_budget_s),
            run_config=tune.RunConfig(name=s.name, storage_path=root, storage_filesystem=fs if is_s3 else None,
                                      verbose=1))
    grid = tuner.fit()
    outcome = summarize(config, grid, dims, out, log)
    test = test_best(config, plan, outcome, out, log)
    if tracker:
        tracker.log_metrics({f"best_{s.metric}": outcome.summary["best_metric"], **test.named()})
        tracker.client.set_tag(tracker.run_id, "best_checkpoint", redact(outcome.summary["best_checkpoint_uri"]))
        tracker.log_artifacts([out / "sweep_summary.json", out / "trials.csv"])
        tracker.log_artifacts(sorted((out / "plots").glob("*.png")), "plots")
        tracker.finish()
        outcome.mlflow_run_id = parent
    record.save(status="finished", summary=outcome.summary, table=outcome.table, out_dir=outcome.out_dir,
                curves=outcome.curves, mlflow_run_id=outcome.mlflow_run_id)
    return outcome


def summarize(config: TuneConfig, grid, dims: list[Dimension], out: Path, log) -> SweepOutcome:
    s = config.tune
    better = min if s.mode == "min" else max
    rows, curves, startups = [], {}, []
    for result in grid:
        df = result.metrics_dataframe
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name[:40]
        row = {"trial": trial_id, **{d.key: result.config.get(d.key) for d in dims},
               "best": None, "epochs": 0, "checkpoint": None,
               "status": "error" if result.error else "completed"}
        if df is not None and s.metric in df:
            df = df.dropna(subset=[s.metric])
            best_i = df[s.metric].idxmin() if s.mode == "min" else df[s.metric].idxmax()
            epoch = df[EPOCH]  # the model's epochs, whatever pauses and resumes happened
            row.update(best=float(df[s.metric][best_i]), epochs=int(epoch.max()),
                       checkpoint=f"{storage_uri(config, df['checkpoint_path'][best_i])}/{CHECKPOINT_FILE}")
            if not result.error and row["epochs"] < config.trainer.max_epochs:
                row["status"] = "stopped early"
            curves[trial_id] = (epoch.tolist(), df[s.metric].tolist())
            startups += trial_startup(df)
        rows.append(row)
    done = [r for r in rows if r["best"] is not None]
    if not done:
        raise RuntimeError(f"sweep {s.name}: no trial reported {s.metric}; see the trial errors above")
    best = better(done, key=lambda r: r["best"])
    summary = {"sweep": s.name, "metric": s.metric, "mode": s.mode, "best_trial": best["trial"],
               "best_metric": best["best"], "best_checkpoint_uri": best["checkpoint"],
               "best_params": {d.key: best[d.key] for d in dims}, "trials": len(rows),
               "trial_epochs": sum(r["epochs"] for r in rows), "scheduler": s.scheduler, "search": s.search,
               "trial_startup_s": statistics.median(startups) if startups else None}
    out.mkdir(parents=True, exist_ok=True)
    write_table(rows, out / "trials.csv")
    (out / "sweep_summary.json").write_text(json.dumps(summary, indent=1))
    from heimdall.evaluation import plots

    plots.sweep_curves(curves, s.metric, out / "plots" / "sweep_curves.png")
    plots.param_vs_metric(done, [d.key for d in dims], s.metric, out / "plots" / "params_vs_metric.png")
    plots.trial_stops(rows, rungs(config), config.trainer.max_epochs, out / "plots" / "trial_stops.png")
    log(format_trials(rows, dims, s.metric))
    log(f"best trial {best['trial']}: {s.metric} {best['best']:,.0f} (median of trials "
        f"{statistics.median(r['best'] for r in done):,.0f}); best checkpoint: {best['checkpoint']}")
    if startups:
        log(f"trial start-up (start to first epoch, less one epoch; median of {len(startups)} trials): "
            f"{summary['trial_startup_s']:.1f} s")
    log(f"sweep summary: {out / 'sweep_summary.json'}")
    return SweepOutcome(summary, rows, str(out), curves)


def trial_startup(df) -> list[float]:
    """A trial's start-up: the time to its first report (set-up plus one epoch) less the median of its
    later epochs; none for a trial that reported once, or that resumed (its first report is not its start)."""
    times = df["time_this_iter_s"].tolist() if "time_this_iter_s" in df else []
    if len(times) < 2 or int(df[EPOCH].iloc[0]) != 1:
        return []
    return [max(0.0, times[0] - statistics.median(times[1:]))]


def test_best(config: TuneConfig, plan: WorkerPlan, outcome: SweepOutcome, out: Path, log) -> SplitReport:
    """The best trial's checkpoint on the test split, beside the reference rows: into the summary."""
    report, pngs = ray.get(evaluate_best.options(num_cpus=plan.cpus_per_worker, num_gpus=int(plan.use_gpu)).remote(
        outcome.summary["best_checkpoint_uri"], config.data.uri, config.data.eval_batch_size))
    log(report.table(f"test split ({report.count} samples), best trial {outcome.summary['best_trial']}"))
    for name, data in pngs.items():
        (out / "plots" / name).write_bytes(data)
    outcome.summary["test"] = report.to_json()
    (out / "sweep_summary.json").write_text(json.dumps(outcome.summary, indent=1))
    return report


def storage_uri(config: TuneConfig, path: str) -> str:
    return f"s3://{path}" if config.run.storage_path.startswith("s3://") else path


def write_table(rows: list[dict], path: Path) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def format_trials(rows: list[dict], dims: list[Dimension], metric: str) -> str:
    keys = [d.key for d in dims]
    head = f"{'trial':>12}  " + "  ".join(f"{k:>18}" for k in keys) + f"  {metric:>12}  epochs  status"
    lines = [head]
    for r in sorted(rows, key=lambda r: (r["best"] is None, r["best"] or 0)):
        vals = "  ".join(f"{_fmt(r[k]):>18}" for k in keys)
        best = f"{r['best']:,.0f}" if r["best"] is not None else "-"
        lines.append(f"{r['trial']:>12}  {vals}  {best:>12}  {r['epochs']:>6}  {r['status']}")
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
