"""`heimdall tune`: Ray Tune over Ray Train on the 2-CPU local Ray of the test session."""
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from heimdall.config import ConfigError, TrainConfig, TuneConfig, load_config
from heimdall.training.search_space import check_space, parse_space
from helpers import HEIMDALL_BIN, sweep_config
from helpers import SWEEP_EPOCHS as EPOCHS


def test_search_space_errors_name_the_key():
    base = TrainConfig().model_dump()
    with pytest.raises(ConfigError, match=r"tune.space.optim.lrr: .*unknown config key 'optim.lrr'"):
        check_space(parse_space({"optim.lrr": {"loguniform": [1e-4, 1e-2]}}), base, TrainConfig)
    with pytest.raises(ConfigError, match="tune.space.optim.lr: unknown distribution 'logunif'"):
        parse_space({"optim.lr": {"logunif": [1e-4, 1e-2]}})
    with pytest.raises(ConfigError, match="tune.space.model.dropout: value 1.5 is not valid"):
        check_space(parse_space({"model.dropout": {"uniform": [0.0, 1.5]}}), base, TrainConfig)


def test_sweep_settings_that_cannot_work_are_refused_before_any_trial():
    with pytest.raises(ConfigError, match="pbt is not offered.*no weights would transfer"):
        load_config(None, ["tune.scheduler=pbt"], schema=TuneConfig)
    with pytest.raises(ConfigError, match="hyperband is not offered: .* a bracket never fills"):
        load_config(None, ["tune.scheduler=hyperband"], schema=TuneConfig)
    with pytest.raises(ConfigError, match="tune.metric='val_p68' is not a metric the trials report"):
        load_config(None, ["tune.metric=val_p68"], schema=TuneConfig)
    with pytest.raises(ConfigError, match="tune.mode=max ranks val_p68_m the wrong way"):
        load_config(None, ["tune.mode=max"], schema=TuneConfig)
    with pytest.raises(ConfigError, match="optuna cannot search a grid \\(optim.lr\\)"):
        load_config(None, ["tune.search=optuna", "tune.space={optim.lr: {grid: [0.001, 0.01]}}"], schema=TuneConfig)
    config = load_config(None, ["tune.metric=val_p95_m"], schema=TuneConfig)
    assert config.tune.metric == "val_p95_m" and config.trainer.monitor == "val_p68_m"  # a trial gets tune.metric


def test_sweep_planning_on_small_clusters():
    from launch.cluster import Cluster
    from launch.tune import plan_sweep

    plan, concurrent = plan_sweep(TuneConfig(), Cluster({"CPU": 2, "driver_slot": 4}))
    assert concurrent == 1 and plan.cpus_per_worker == 1  # 1 worker CPU + 1 for Ray Data
    plan, concurrent = plan_sweep(TuneConfig.model_validate({"ray": {"cpus_per_worker": 0.5}}),
                                  Cluster({"CPU": 2, "driver_slot": 4}))
    assert concurrent == 2
    with pytest.raises(ConfigError, match="no 'driver_slot' resource"):
        plan_sweep(TuneConfig(), Cluster({"CPU": 64}))
    with pytest.raises(ConfigError, match="tune.max_concurrent_trials=4 trials of ray.num_workers=1 need"):
        plan_sweep(TuneConfig.model_validate({"tune": {"max_concurrent_trials": 4}}), Cluster({"CPU": 2, "driver_slot": 4}))
    with pytest.raises(ConfigError, match="need 2 GPU"):
        plan_sweep(TuneConfig.model_validate({"ray": {"num_workers": 2, "use_gpu": True}}),
                   Cluster({"CPU": 8, "GPU": 1, "driver_slot": 4}))


@pytest.mark.timeout(900)
def test_asha_sweep_on_two_cpus_stops_the_worse_trials(asha_sweep):
    config, outcome, console = asha_sweep
    rows = {r["trial"]: r for r in outcome.table}
    assert len(rows) == 4 and all(r["status"] != "error" for r in rows.values()), outcome.table
    stopped = [r for r in rows.values() if r["status"] == "stopped early"]
    assert {r["optim.lr"] for r in stopped} >= {1e-6, 2e-6}, f"ASHA did not stop the hopeless trials: {outcome.table}"
    at = {t: dict(zip(*curve)) for t, curve in outcome.curves.items()}  # trial -> {epoch: metric}
    for r in stopped:  # each ranked worse than another trial at the rung where it stopped
        rung = r["epochs"]
        assert any(at[o][rung] < at[r["trial"]][rung] for o in at if o != r["trial"] and rung in at[o]), r
    assert rows[outcome.summary["best_trial"]]["epochs"] == EPOCHS
    assert outcome.summary["best_params"]["optim.lr"] >= 1e-3
    assert outcome.summary["trial_epochs"] < 4 * EPOCHS
    out = Path(outcome.out_dir)
    assert json.loads((out / "sweep_summary.json").read_text()) == outcome.summary
    assert (out / "trials.csv").read_text().count("\n") == 5
    for png in ("sweep_curves.png", "params_vs_metric.png", "trial_stops.png", "test_error_cdf.png", "test_map.png"):
        assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    assert "best trial" in console and "stopped early" in console
    assert 0 < outcome.summary["trial_startup_s"] < 120 and "trial start-up" in console


def trial_runs(mlflow_uri: str, sweep: str) -> list:
    """The MLflow child run of every trial of a sweep."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("heimdall")
    parent = client.search_runs([exp.experiment_id], f"attributes.run_name = '{sweep}'")[0]
    return client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")


@pytest.mark.timeout(900)
def test_median_stopping_stops_a_trial_worse_than_the_median(train_dataset, tmp_path, ray_session, mlflow_server):
    from launch.tune import tune_sweep

    config, _ = sweep_config(train_dataset, tmp_path, "median", mlflow_server, "tune.scheduler=median",
                             "tune.max_concurrent_trials=1", space={"optim.lr": {"grid": [3.0e-3, 1.0e-3, 1.0e-6]}})
    outcome = tune_sweep(config, log=lambda *_: None)
    rows = {r["optim.lr"]: r for r in outcome.table}
    assert rows[3e-3]["status"] == rows[1e-3]["status"] == "completed", outcome.table
    hopeless = rows[1e-6]
    assert hopeless["status"] == "stopped early" and hopeless["epochs"] < EPOCHS, outcome.table
    at = {t: dict(zip(*curve)) for t, curve in outcome.curves.items()}
    stop = hopeless["epochs"]
    others = sorted(at[rows[lr]["trial"]][stop] for lr in (3e-3, 1e-3))
    assert at[hopeless["trial"]][stop] > others[0], (stop, at)  # worse than the other trials there


@pytest.mark.timeout(900)
def test_optuna_sweep_whose_worker_is_killed_resumes_the_trial_from_its_checkpoint(train_dataset, tmp_path, ray_session,
                                                                                   mlflow_server, monkeypatch):
    """One sweep shows two things: Optuna's suggestions follow its seeded sampler, and a trial whose
    worker is killed restarts from its last checkpoint while the sweep completes."""
    import optuna
    from mlflow.tracking import MlflowClient

    from launch.tune import tune_sweep

    markers = tmp_path / "faults"
    monkeypatch.setenv("HEIMDALL_FAULT", "validation@1")  # SIGKILL a worker of the first trial there, once
    monkeypatch.setenv("HEIMDALL_FAULT_MARKER", str(markers))
    config, _ = sweep_config(train_dataset, tmp_path, "killed", mlflow_server, "tune.scheduler=fifo",
                             "tune.search=optuna", "tune.num_samples=2", "tune.seed=5", "trainer.max_epochs=2",
                             space={"optim.lr": {"loguniform": [1.0e-4, 3.0e-3]}})
    outcome = tune_sweep(config, log=lambda *_: None)
    assert (markers / "validation").exists(), "no worker was killed"
    assert [r["status"] for r in outcome.table] == ["completed", "completed"], outcome.table
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=5))
    space = {"optim.lr": optuna.distributions.FloatDistribution(1e-4, 3e-3, log=True)}
    asked = sorted(study.ask(space).params["optim.lr"] for _ in range(2))
    assert sorted(r["optim.lr"] for r in outcome.table) == pytest.approx(asked, rel=1e-9), outcome.table
    client = MlflowClient(mlflow_server)
    for run in trial_runs(mlflow_server, "killed"):  # the killed trial too: epochs 0-1, each once
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_p68_m")) == [0, 1]


def test_asha_rungs():
    from launch.tune import rungs

    config = load_config(None, ["trainer.max_epochs=8", "tune.grace_period=1", "tune.reduction_factor=2"],
                         schema=TuneConfig)
    assert rungs(config) == [1, 2, 4]
    assert rungs(config.model_copy(update={"tune": config.tune.model_copy(update={"scheduler": "fifo"})})) == []


def test_trial_startup_is_the_first_report_less_an_epoch():
    import pandas as pd

    from launch.tune import EPOCH, trial_startup

    df = pd.DataFrame({"time_this_iter_s": [14.0, 3.0, 2.0, 4.0], EPOCH: [1, 2, 3, 4]})
    assert trial_startup(df) == [11.0]
    assert trial_startup(df.iloc[:1]) == []  # one report: no epoch to take away
    assert trial_startup(df.assign(**{EPOCH: [3, 4, 5, 6]})) == []  # resumed: its first report is not its start


@pytest.mark.timeout(120)
def test_sweep_leaves_no_placement_groups(asha_sweep):
    from ray.util.state import list_placement_groups

    deadline = time.time() + 60
    while (left := list_placement_groups(filters=[("state", "=", "CREATED")])) and time.time() < deadline:
        time.sleep(1)
    assert not left, left


@pytest.mark.timeout(300)
def test_best_checkpoint_reproduces_its_metric(asha_sweep, train_dataset):
    from heimdall.data.dataset import Dataset
    from heimdall.evaluation.evaluate import evaluate_checkpoint

    _, outcome, _ = asha_sweep
    p68 = evaluate_checkpoint(outcome.summary["best_checkpoint_uri"], Dataset.open(train_dataset), "val", 256,
                              log=lambda *_: None).model.p68_m
    assert p68 == pytest.approx(outcome.summary["best_metric"], rel=1e-3)


@pytest.mark.timeout(120)
def test_sweep_logs_a_parent_mlflow_run_with_a_child_per_trial(asha_sweep, mlflow_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("heimdall")
    parent = client.search_runs([exp.experiment_id], "attributes.run_name = 'asha'")[0]
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4
    assert parent.data.metrics["best_val_p68_m"] == pytest.approx(asha_sweep[1].summary["best_metric"])
    test = asha_sweep[1].summary["test"]["rows"]  # the best trial on the test split, beside the reference rows
    assert parent.data.metrics["test_p68_m"] == pytest.approx(test["model"]["p68_m"])
    assert parent.data.metrics["test_reference_p68_m"] == pytest.approx(test["reference"]["p68_m"])
    plots = {f.path for f in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/params_vs_metric.png", "plots/trial_stops.png", "plots/sweep_curves.png"} <= plots


@pytest.mark.timeout(900)
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(train_dataset, tmp_path, ray_session,
                                                                     mlflow_server):
    from mlflow.tracking import MlflowClient

    from launch.tune import tune_sweep

    config, path = sweep_config(train_dataset, tmp_path, "resume-sweep", mlflow_server, "tune.scheduler=fifo",
                                "trainer.max_epochs=2", space={"optim.lr": {"grid": [3.0e-3, 1.0e-3]}})
    proc = subprocess.Popen([HEIMDALL_BIN, "tune", "--config", str(path), "tune.scheduler=fifo", "trainer.max_epochs=2",
                             "run.shared_storage=true", "ray.use_gpu=false"],  # joins the session's Ray
                            env={**os.environ, "RAY_ADDRESS": ray_session},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = MlflowClient(mlflow_server)

    def children():
        exp = client.get_experiment_by_name("heimdall")
        parents = client.search_runs([exp.experiment_id], "attributes.run_name = 'resume-sweep'") if exp else []
        return client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'") \
            if parents else []

    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:  # trial 1 finished and trial 2 is training
        kids = children()
        if sum(k.info.status == "FINISHED" for k in kids) >= 1 and any(
                k.info.status == "RUNNING" and client.get_metric_history(k.info.run_id, "val_p68_m") for k in kids):
            break
        time.sleep(1)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    proc.kill()
    proc.wait()
    finished = {k.info.run_id for k in children() if k.info.status == "FINISHED"}
    outcome = tune_sweep(config, log=lambda *_: None)
    assert len(outcome.table) == 2 and all(r["epochs"] == 2 for r in outcome.table), outcome.table
    for run_id in finished:  # trials finished before the interruption were not trained again
        steps = [m.step for m in client.get_metric_history(run_id, "val_p68_m")]
        assert sorted(steps) == [0, 1], steps
    assert len(children()) == 2  # one child run per trial, none duplicated by the resume
