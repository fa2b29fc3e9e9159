"""`heimdall train` under a real local Ray, a real S3 HTTP server and a real MLflow server."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from heimdall.config import ConfigError, ScaleConfig, TrainConfig, load_config
from helpers import HEIMDALL_BIN, QUICK_CONFIG, cli, config_for, epoch_steps, epoch_values, wait_for_epochs
from helpers import TRAIN_EPOCHS as EPOCHS
from launch.cluster import Cluster, plan_workers


# ---- resources: pure planning, no Ray -------------------------------------------------------------
def test_two_workers_on_two_cpus_leave_a_cpu_for_ray_data():
    plan = plan_workers(ScaleConfig(num_workers=2), Cluster({"CPU": 2}))
    assert plan.cpus_per_worker == 0.5 and plan.threads == 1 and plan.read_cpus == 1 and not plan.use_gpu
    assert plan_workers(ScaleConfig(num_workers=1), Cluster({"CPU": 16, "GPU": 1})).use_gpu


@pytest.mark.parametrize("scale, key", [
    (ScaleConfig(num_workers=2, use_gpu=True), "ray.num_workers=2 with ray.use_gpu=true needs 2 GPUs"),
    (ScaleConfig(num_workers=2, cpus_per_worker=2), "ray.cpus_per_worker=2"),
    (ScaleConfig(num_workers=4, data_cpus=2), "ray.data_cpus=2"),
])
def test_impossible_resources_name_the_key(scale, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        plan_workers(scale, Cluster({"CPU": 2, "GPU": 1} if scale.use_gpu else {"CPU": 2}))


# ---- fail fast, before any worker -----------------------------------------------------------------
def test_unknown_key_and_wrong_type_fail_before_ray(tmp_path):
    out = cli("train", "ray.num_worker=2", timeout=120)
    assert out.returncode == 2 and "unknown config key 'ray.num_worker'" in out.stderr
    out = cli("train", "ray.num_workers=two", timeout=120)
    assert out.returncode == 2 and "ray.num_workers" in out.stderr and "Traceback" not in out.stderr


def test_unreachable_mlflow_and_s3_fail_in_seconds(train_dataset, tmp_path):
    base = [f"data.uri={train_dataset}", f"run.storage_path={tmp_path / 'runs'}"]
    start = time.perf_counter()
    out = cli("train", *base, "mlflow.tracking_uri=http://127.0.0.1:9", timeout=120)
    took = time.perf_counter() - start
    assert out.returncode == 2 and "MLflow tracking server http://127.0.0.1:9 is unreachable" in out.stderr, out.stderr
    assert took < 30
    env = {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    start = time.perf_counter()
    out = cli("train", *base[:1], "run.storage_path=s3://runs/heimdall", env=env, timeout=120)
    took = time.perf_counter() - start
    assert out.returncode == 2 and "run.storage_path s3://runs/heimdall is not writable" in out.stderr, out.stderr
    assert took < 45 and "Traceback" not in out.stderr


@pytest.mark.timeout(240)
def test_more_gpus_than_the_cluster_has_fails_before_workers(train_dataset, tmp_path, ray_session):
    from launch.train import train

    config = config_for(train_dataset, tmp_path, "gpu", "ray.use_gpu=true", f"run.storage_path={tmp_path / 'r'}",
                        f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db")
    with pytest.raises(ConfigError, match="needs 1 GPUs; the cluster has 0"):
        train(config, log=lambda *_: None)
    assert not (tmp_path / "r" / "gpu").exists()


# ---- ingestion: each train sample once per epoch across 2 workers -------------------------------
def _collect_ids(loop_config):
    import ray.train

    from heimdall.data.dataset import Dataset
    from launch.ingest import ShardBatches

    ds = Dataset.open(loop_config["uri"])
    rank = ray.train.get_context().get_world_rank()
    batches = ShardBatches(ray.train.get_dataset_shard("train"), ds, "train", 64, 45.0, 7.5, drop_last=True)
    ids = np.concatenate([b["sample_id"].numpy() for b in batches])
    np.save(f"{loop_config['out']}/rank{rank}.npy", ids)


@pytest.mark.timeout(300)
def test_two_workers_see_every_train_sample_once(train_dataset, tmp_path, ray_session):
    from ray import cloudpickle
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from heimdall.data.dataset import Dataset, split_of
    from launch.ingest import train_val_datasets

    ds = Dataset.open(train_dataset)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test file
    TorchTrainer(_collect_ids, train_loop_config={"uri": train_dataset, "out": str(tmp_path)},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                 run_config=RunConfig(name="ingest", storage_path=str(tmp_path / "runs")),
                 datasets=train_val_datasets(ds, seed=0, read_cpus=1),
                 dataset_config=DataConfig(datasets_to_split=["train", "val"])).fit()
    ranks = [np.load(tmp_path / f"rank{r}.npy") for r in range(2)]
    seen = np.concatenate(ranks)
    assert len(seen) == len(np.unique(seen)), "a sample was seen twice in one epoch"
    assert set(split_of(seen)) == {"train"}
    all_train = np.concatenate([ds.read_shard(s, ["sample_id"])["sample_id"] for s in ds.split_shards("train")])
    # Last-batch rule: equal split drops < world_size rows, each worker drops its partial batch.
    assert set(seen) <= set(all_train) and len(all_train) - len(seen) < 2 * 64 + 2
    assert len(ranks[0]) == len(ranks[1])


@pytest.mark.timeout(120)
def test_a_split_started_at_epoch_k_reads_epoch_k_order(train_dataset, ray_session):
    """What a worker group restarted at epoch k reads: epoch k's file order, not epoch 0's again."""
    from ray.data import DataContext

    from heimdall.data.dataset import Dataset
    from launch.ingest import split_dataset

    ds = Dataset.open(train_dataset)
    options = DataContext.get_current().execution_options
    preserve, options.preserve_order = options.preserve_order, True  # read tasks may finish in any order
    try:
        def orders(first_epoch: int, epochs: int) -> list[list[int]]:
            shard = split_dataset(ds, "train", 0, 1.0, first_epoch).streaming_split(1, equal=True)[0]
            return [[int(b["sample_id"][0]) for b in shard.iter_batches(batch_size=None)] for _ in range(epochs)]
        fresh = orders(0, 3)
        assert fresh[0] != fresh[1] != fresh[2], fresh  # reshuffled every epoch
        assert orders(2, 1) == fresh[2:], (orders(2, 1), fresh)
    finally:
        options.preserve_order = preserve


# ---- the real thing: 2 workers, S3 checkpoints, MLflow server (reference_run in conftest) ---------
@pytest.mark.timeout(400)
def test_train_two_workers_s3_checkpoints_and_mlflow(reference_run, mlflow_server):
    import boto3
    from mlflow.tracking import MlflowClient

    config, outcome, console = reference_run
    test = outcome.test
    assert test.model.p68_m < 0.7 * test["centroid"].p68_m, test  # it learned something in 5 epochs
    assert {"reference", "physics baseline"} <= set(test.rows) and "P68 / ref" in console
    assert f"best checkpoint: {outcome.best_checkpoint_uri}" in console
    summary = json.loads((Path(outcome.out_dir) / "train_summary.json").read_text())  # `heimdall export --from`
    assert summary["best_checkpoint_uri"] == outcome.best_checkpoint_uri and summary["mlflow_run_id"] == outcome.mlflow_run_id
    # Checkpoints live in S3: best K by val_p68_m plus the latest, nothing else.
    assert outcome.best_checkpoint_uri.startswith("s3://runs/heimdall/reference/epoch_")
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="runs", Prefix="heimdall/reference/")["Contents"]]
    checkpoints = {k.split("/")[2] for k in keys if k.endswith("/checkpoint.ckpt")}
    assert 1 <= len(checkpoints) <= 3 and outcome.best_checkpoint_uri.split("/")[-2] in checkpoints
    # MLflow: params, tags, per-epoch metrics, artifacts, no credentials.
    client = MlflowClient(mlflow_server)
    run = client.get_run(outcome.mlflow_run_id)
    assert run.data.params["optim.lr"] == "0.003" and run.data.params["ray.num_workers"] == "2"
    for tag in ("dataset.manifest_sha256", "heimdall.version", "git_commit"):
        assert run.data.tags[tag] and run.data.tags[tag] != "unknown"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_p68_m"))
    assert steps == list(range(EPOCHS))
    assert run.data.metrics["test_p68_m"] == pytest.approx(test.model.p68_m)
    assert run.data.metrics["test_reference_p68_m"] == pytest.approx(test["reference"].p68_m)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | \
        {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"config.yaml", "test_metrics.json", "plots/training_curves.png", "plots/test_error_cdf.png",
            "plots/test_map.png"} <= artifacts
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert not any(secret in str(v) for v in [*run.data.params.values(), *run.data.tags.values()])


def _kill_a_worker_after(mlflow_uri: str, run_name: str, epochs: int, killed: list):
    from ray.util.state import list_actors

    wait_for_epochs(mlflow_uri, run_name, epochs)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    if workers:
        os.kill(workers[-1]["pid"], signal.SIGKILL)
        killed.append(workers[-1]["pid"])


@pytest.mark.timeout(500)
def test_killed_worker_restarts_from_checkpoint_and_matches(reference_run, tmp_path, mlflow_server):
    from launch.train import train

    ref_config, ref, _ = reference_run
    config = config_for(ref_config.data.uri, tmp_path, "faulty", "ray.num_workers=2", "run.max_failures=1",
                        f"run.storage_path={tmp_path / 'runs'}", f"mlflow.tracking_uri={mlflow_server}")
    killed = []
    killer = threading.Thread(target=_kill_a_worker_after, args=(mlflow_server, "faulty", 3, killed))
    killer.start()
    outcome = train(config, log=lambda *_: None)
    killer.join()
    assert killed, "no worker was killed"
    assert epoch_steps(mlflow_server, outcome.mlflow_run_id) == list(range(EPOCHS))  # each epoch once
    # docs/training.md: the run through the kill is the undisturbed run, epoch by epoch.
    assert epoch_values(mlflow_server, outcome.mlflow_run_id) == pytest.approx(
        epoch_values(mlflow_server, ref.mlflow_run_id), rel=0.1)
    assert outcome.test.model.p68_m == pytest.approx(ref.test.model.p68_m, rel=0.1)


@pytest.mark.timeout(500)
def test_interrupted_driver_resumes_same_run(train_dataset, tmp_path, ray_session, mlflow_server):
    """Kill the `heimdall train` process mid-run, start it again: it continues, in the same MLflow run."""
    from mlflow.tracking import MlflowClient

    from launch.train import train

    args = [f"--config={QUICK_CONFIG}", f"data.uri={train_dataset}", f"trainer.out_dir={tmp_path / 'out'}",
            "run.name=resumable", f"run.storage_path={tmp_path / 'runs'}", f"mlflow.tracking_uri={mlflow_server}",
            f"trainer.max_epochs={EPOCHS}", f"trainer.patience={EPOCHS}", "model.dropout=0.0",
            "data.normalization_samples=512", "run.shared_storage=true",
            "ray.use_gpu=false"]  # it joins the session's Ray, on this host: say what it may use
    proc = subprocess.Popen([HEIMDALL_BIN, "train", *args], env={**os.environ, "RAY_ADDRESS": ray_session},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_epochs(mlflow_server, "resumable", 3, alive=lambda: proc.poll() is None)
    assert proc.poll() is None, "the first run ended before it could be interrupted"
    proc.kill()
    proc.wait()
    config = load_config(QUICK_CONFIG, [a for a in args if not a.startswith("--")], schema=TrainConfig)
    outcome = train(config, log=lambda *_: None)
    assert outcome.resumed
    assert epoch_steps(mlflow_server, outcome.mlflow_run_id) == list(range(EPOCHS))  # each epoch once
    runs = MlflowClient(mlflow_server).search_runs(
        [MlflowClient(mlflow_server).get_run(outcome.mlflow_run_id).info.experiment_id],
        "tags.heimdall_run_key != ''")
    assert sum(r.info.run_name == "resumable" for r in runs) == 1
