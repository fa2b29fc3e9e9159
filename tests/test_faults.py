"""Exactly once through any single fault: kills at every fault point of an epoch (heimdall.faults),
MLflow and S3 stopping mid-run, a simulated full disk, unreachable datasets and storage, and runs
started again with a changed config. The real SIGKILLs of a worker and of the driver are in
test_train.py. docs/faults.md lists each fault with its outcome and test."""
import csv
import json
import os
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import (HEIMDALL_BIN, TRAIN_EPOCHS, cli, config_for, epoch_steps, epoch_values, free_port, mlflow_run,
                     start_mlflow, stop, wait_for_epochs)


def trained_epochs(stdout: str) -> list[int]:
    """1-based epochs a run trained, from its progress lines."""
    return [int(e) for e in re.findall(r"^epoch (\d+)/\d+ ", stdout, re.M)]


def faults_env(tmp_path, spec: str, ray_address: str | None = None) -> dict:
    env = {"HEIMDALL_FAULT": spec, "HEIMDALL_FAULT_MARKER": str(tmp_path / "fired")}
    return {**env, "RAY_ADDRESS": ray_address} if ray_address else env


# ---- fit: every fault point in turn, one kill per run ----------------------------------------------
FIT_CHAIN = ["validation@1", "before_report@1", "checkpoint_upload@2", "after_commit@2", "driver_final"]


@pytest.mark.timeout(300)
def test_fit_exactly_once_through_every_fault_point(train_dataset, tmp_path):
    import torch

    out = tmp_path / "fit"
    args = ["fit", f"data.uri={train_dataset}", "model.size=tiny", "trainer.max_epochs=4", "trainer.patience=4",
            f"trainer.out_dir={out}", "data.normalization_samples=512", "optim.warmup_steps=10"]
    env = faults_env(tmp_path, ",".join(FIT_CHAIN))
    logs = []
    for point in FIT_CHAIN:
        r = cli(*args, env=env, timeout=300)
        assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr[-3000:])
        assert (tmp_path / "fired" / point.split("@")[0]).exists(), f"{point} did not fire"
        logs.append(r.stdout)
    r = cli(*args, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "physics baseline" in r.stdout  # the final step ran: the test table
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2, 3]
    # metrics.csv is the committed history: the same numbers the last checkpoint holds.
    history = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]["EpochHistory"]["rows"]
    assert [float(row["val_p68_m"]) for row in rows] == pytest.approx([h["val_p68_m"] for h in history])
    # Killed after epoch 3's checkpoint (after_commit@2): the next run trained epoch 4 only.
    assert trained_epochs(logs[4]) == [4]
    assert not list(out.rglob(".*.tmp-*")), "a half-written file was left behind"
    assert json.loads((out / "heimdall_run.json").read_text())["status"] == "finished"

    # Again: reported as finished, nothing trained. Changed: refused, naming the key. --resume: continues.
    r = cli(*args, timeout=300)
    assert r.returncode == 0 and "already finished" in r.stdout and not trained_epochs(r.stdout), r.stdout
    r = cli(*args, "optim.lr=0.01", timeout=300)
    assert r.returncode == 2 and "optim.lr: 0.002 -> 0.01" in r.stderr and "--resume" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = cli("fit", "--resume", *args[1:], "trainer.max_epochs=5", "trainer.patience=5", timeout=300)
    assert r.returncode == 0 and trained_epochs(r.stdout) == [5], r.stdout
    assert [int(row["epoch"]) for row in csv.DictReader(open(out / "metrics.csv"))] == [0, 1, 2, 3, 4]


@pytest.mark.timeout(200)
def test_full_disk_at_checkpoint_keeps_the_last_good_one(train_dataset, tmp_path):
    """Simulated (ENOSPC raised while the checkpoint is written): one line, exit 2, previous checkpoint intact."""
    out = tmp_path / "fit"
    args = ["fit", f"data.uri={train_dataset}", "model.size=tiny", "trainer.max_epochs=3", f"trainer.out_dir={out}",
            "data.normalization_samples=512", "trainer.progress=false"]
    r = cli(*args, env=faults_env(tmp_path, "checkpoint_upload=enospc@1"), timeout=300)
    assert r.returncode == 2 and r.stderr.strip().endswith("No space left on device (simulated by HEIMDALL_FAULT "
                                                          "at checkpoint_upload)"), r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not list(out.rglob(".*.tmp-*"))
    assert [int(row["epoch"]) for row in csv.DictReader(open(out / "metrics.csv"))] == [0]
    r = cli(*args, timeout=300)
    assert r.returncode == 0 and f"resuming from {out}/checkpoints/last.ckpt" in r.stdout, r.stderr[-2000:]
    assert [int(row["epoch"]) for row in csv.DictReader(open(out / "metrics.csv"))] == [0, 1, 2]


# ---- Ray Train: worker-side points with restarts, driver-side points with the command run again -----
@pytest.mark.timeout(500)
def test_train_exactly_once_through_worker_fault_points(reference_run, tmp_path, mlflow_server, monkeypatch):
    from heimdall import storage
    from launch.train import EPOCHS_FILE, train

    ref_config, ref, _ = reference_run
    monkeypatch.setenv("HEIMDALL_FAULT", "validation@1,before_report@2,checkpoint_upload@3")
    monkeypatch.setenv("HEIMDALL_FAULT_MARKER", str(tmp_path / "fired"))
    config = config_for(ref_config.data.uri, tmp_path, "worker-faults", "ray.num_workers=2", "run.max_failures=3",
                        f"run.storage_path={tmp_path / 'runs'}", f"mlflow.tracking_uri={mlflow_server}")
    outcome = train(config, log=lambda *_: None)
    assert sorted(p.name for p in (tmp_path / "fired").iterdir()) == ["before_report", "checkpoint_upload", "validation"]
    for key in ("val_p68_m", "lr", "train_loss_epoch"):
        assert epoch_steps(mlflow_server, outcome.mlflow_run_id, key) == list(range(TRAIN_EPOCHS)), key
    # Every checkpoint left in storage is whole (the one killed half-way was written again) and holds
    # the history of exactly the epochs up to its own.
    run_dir = tmp_path / "runs" / "worker-faults"
    kept = sorted(p for p in run_dir.iterdir() if p.name.startswith("epoch_"))
    assert kept and all({f.name for f in p.iterdir()} == {"checkpoint.ckpt", EPOCHS_FILE} for p in kept)
    for p in kept:
        assert [r["epoch"] for r in json.loads((p / EPOCHS_FILE).read_text())] == list(range(int(p.name[6:]) + 1))
    # The run through the faults is the run without them: each epoch trained again from the last committed
    # checkpoint, reading its own data order. Which worker gets which block of an epoch varies with timing, and
    # moves an epoch's validation error by a few percent.
    assert epoch_values(mlflow_server, outcome.mlflow_run_id) == pytest.approx(
        epoch_values(mlflow_server, ref.mlflow_run_id), rel=0.1)
    assert outcome.test.model.p68_m == pytest.approx(ref.test.model.p68_m, rel=0.1)
    assert storage.exists(*storage.resolve(str(run_dir / "heimdall_run.json")))


@pytest.mark.timeout(600)
def test_train_exactly_once_through_driver_fault_points(train_dataset, tmp_path, ray_session, mlflow_server):
    epochs = 3
    args = ["train", f"data.uri={train_dataset}", "model.size=tiny", "model.dropout=0.0", f"trainer.max_epochs={epochs}",
            f"trainer.out_dir={tmp_path / 'out'}", "run.name=driver-faults", f"run.storage_path={tmp_path / 'runs'}",
            f"mlflow.tracking_uri={mlflow_server}", "data.normalization_samples=512", "ray.num_workers=2",
            "run.shared_storage=true", "ray.use_gpu=false"]  # it joins the session's Ray (RAY_ADDRESS), on this host
    env = faults_env(tmp_path, "after_commit@1,driver_final", ray_session)
    # 1: the controller dies after epoch 2's commit, before sending it to MLflow: the command fails.
    r = cli(*args, env=env, timeout=300)
    said = [ln for ln in r.stderr.splitlines() if ln.startswith("heimdall train: training failed")]
    assert r.returncode == 1 and len(said) == 1 and "run the same command again" in said[0], r.stderr[-3000:]
    # 2: continues from epoch 2's checkpoint (trains epoch 3 only), then dies in the driver's final step.
    r = cli(*args, env=env, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert trained_epochs(r.stdout) == [3], r.stdout
    # 3: trains nothing, completes the final step; 4: reports the finished run.
    r = cli(*args, env=env, timeout=300)
    assert r.returncode == 0 and "completing its final step" in r.stdout and not trained_epochs(r.stdout), r.stdout
    r = cli(*args, env=env, timeout=300)
    assert r.returncode == 0 and "already finished" in r.stdout, r.stdout
    run = mlflow_run(mlflow_server, "driver-faults")
    assert run.info.status == "FINISHED"
    for key in ("val_p68_m", "lr"):
        assert epoch_steps(mlflow_server, run.info.run_id, key) == list(range(epochs)), key
    assert epoch_steps(mlflow_server, run.info.run_id, "test_p68_m") == [0]
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["mlflow_run_id"] == run.info.run_id
    r = cli(*args, "optim.lr=0.01", env={"RAY_ADDRESS": ray_session}, timeout=300)
    assert r.returncode == 2 and "optim.lr: 0.002 -> 0.01" in r.stderr and "run.name" in r.stderr, r.stderr


def test_finished_sweep_returns_its_result_and_a_changed_one_needs_resume(asha_sweep):
    from heimdall.config import ConfigError
    from launch.tune import tune_sweep

    config, first, _ = asha_sweep
    lines = []
    again = tune_sweep(config, log=lines.append)
    assert again.already_finished and again.summary == first.summary and again.table == first.table
    assert any("already finished" in line for line in lines)
    changed = config.model_copy(deep=True)
    changed.tune.num_samples = 8
    with pytest.raises(ConfigError, match="tune.num_samples: 1 -> 8.*--resume"):
        tune_sweep(changed, log=lambda *_: None)


# ---- outages: MLflow and S3 stop answering mid-run ---------------------------------------------------
@pytest.mark.timeout(400)
def test_mlflow_outage_mid_run_loses_no_metric(train_dataset, tmp_path, ray_session):
    root, port, epochs = tmp_path / "mlflow", free_port(), 12  # the outage ends well before training does
    root.mkdir()
    uri, server = start_mlflow(root, port)
    try:
        proc = subprocess.Popen(
            [HEIMDALL_BIN, "train", f"data.uri={train_dataset}", "model.size=tiny", f"trainer.max_epochs={epochs}",
             f"trainer.patience={epochs}", f"trainer.out_dir={tmp_path / 'out'}", "run.name=outage",
             f"run.storage_path={tmp_path / 'runs'}", f"mlflow.tracking_uri={uri}", "data.normalization_samples=512",
             "run.shared_storage=true", "ray.use_gpu=false"],
            env={**os.environ, "RAY_ADDRESS": ray_session}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        wait_for_epochs(uri, "outage", 1, alive=lambda: proc.poll() is None)
        stop(server)
        time.sleep(18)
        uri, server = start_mlflow(root, port)
        console, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, console[-3000:]
        run = mlflow_run(uri, "outage")
        assert run.info.status == "FINISHED"
        for key in ("val_p68_m", "lr"):
            assert epoch_steps(uri, run.info.run_id, key) == list(range(epochs)), key
        assert console.count("MLflow is unreachable") == 1, console[-3000:]  # one warning line, no end-of-run retry
    finally:
        stop(server)


@pytest.mark.timeout(400)
def test_s3_outage_during_checkpoint_upload_loses_no_epoch(reference_run, s3_process, tmp_path, mlflow_server):
    from launch.train import train

    ref_config, _, _ = reference_run
    moto = s3_process[1]
    config = config_for(ref_config.data.uri, tmp_path, "s3-outage", "ray.num_workers=2",
                        "run.storage_path=s3://runs/outage", f"mlflow.tracking_uri={mlflow_server}")
    paused = []

    def pause():
        wait_for_epochs(mlflow_server, "s3-outage", 1)  # epoch 2 trains now; its upload meets a silent S3
        moto.send_signal(signal.SIGSTOP)
        paused.append(time.time())
        time.sleep(15)
        moto.send_signal(signal.SIGCONT)
        paused.append(time.time())

    pauser = threading.Thread(target=pause)
    pauser.start()
    try:
        outcome = train(config, log=lambda *_: None)
    finally:
        pauser.join()
        moto.send_signal(signal.SIGCONT)
    assert len(paused) == 2, "S3 was not paused"
    assert epoch_steps(mlflow_server, outcome.mlflow_run_id) == list(range(TRAIN_EPOCHS))
    assert outcome.best_checkpoint_uri.startswith("s3://runs/outage/s3-outage/epoch_")


# ---- unreachable data and storage: one line naming the URI, in every command ------------------------
DEAD_S3 = {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}


@pytest.mark.timeout(300)
def test_unreachable_s3_is_one_line_naming_the_uri(tmp_path):
    data = "s3://nowhere/data"
    commands = {
        "fit": ["fit", f"data.uri={data}"],
        "train": ["train", f"data.uri={data}", f"run.storage_path={tmp_path}/runs"],
        "tune": ["tune", f"data.uri={data}", f"run.storage_path={tmp_path}/runs"],
        "pipeline": ["pipeline", f"data.uri={data}", f"run.storage_path={tmp_path}/runs"],
        "data info": ["data", "info", data],
        "data validate": ["data", "validate", data],
        "data synth": ["data", "synth", "--out", data, "--samples", "10"],
        "evaluate": ["evaluate", "--model", "s3://nowhere/run/checkpoint.ckpt", "--data", data],
        "export": ["export", "--from", "s3://nowhere/run/checkpoint.ckpt"],
        "data import": ["data", "import", str(Path(__file__).parents[1] / "examples" / "recordings"), "--out", data],
    }
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(commands, pool.map(lambda a: cli(*a, env=DEAD_S3, timeout=120, cwd=tmp_path),
                                                      commands.values())))
    for name, r in results.items():  # `data validate` lists problems on stdout, like a corrupt shard
        said = [ln for ln in (r.stderr + r.stdout).splitlines() if ": error: " in ln or ln.startswith("PROBLEM")]
        assert r.returncode != 0 and "Traceback" not in r.stderr, (name, r.stderr[-2000:])
        assert len(said) == 1 and "s3://nowhere/" in said[0], (name, r.stderr[-2000:], r.stdout[-2000:])
