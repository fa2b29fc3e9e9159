"""Fixtures and the tier hook. Helpers and constants that test files share are in helpers.py."""
import os
import tempfile

import pytest

from helpers import config_for, export_checkpoint, fit_tiny, free_port, start_mlflow, stop, sweep_config

os.environ.setdefault("PYTHONHASHSEED", "0")
# The reference estimator caches per dataset: a run of the suite keeps its cache to itself.
os.environ.setdefault("HEIMDALL_CACHE", tempfile.mkdtemp(prefix="heimdall-cache-"))

# Tiers, from what a test needs: `unit` needs no server and no Ray (the fast loop: `pytest -m unit`),
# `integration` starts Ray, MLflow or S3 (or trains), `e2e` starts clusters of its own.
SERVERS = {"ray_session", "mlflow_server", "s3_server", "s3_process", "asha_sweep", "reference_run",
           "trained_checkpoint", "exported_model", "train_dataset", "first_export"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("multinode") or item.get_closest_marker("elastic"):
            item.add_marker(pytest.mark.e2e)
        elif item.get_closest_marker("slow") or SERVERS & set(item.fixturenames):
            item.add_marker(pytest.mark.integration)
        else:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """A small default-world dataset shared by the read-only tests."""
    from heimdall.data.synth import SynthSpec, synthesize

    out = tmp_path_factory.mktemp("data") / "small"
    synthesize(SynthSpec(out=str(out), samples=600, seed=3, iq_length=256, shard_size=256), log=lambda *_: None)
    return str(out)


@pytest.fixture(scope="session")
def s3_server(s3_process):
    """A real S3 HTTP endpoint (moto server) on loopback for the whole test session; AWS env set."""
    return s3_process[0]


@pytest.fixture(scope="session")
def s3_process(tmp_path_factory):
    """(endpoint, process) of the session's moto server: the S3 outage test pauses the process."""
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")
    # Real S3 and MinIO need multipart parts >= 5 MiB; the export test lowers the threshold to exercise
    # multipart with a small model, so this server accepts 256 KiB parts.
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "S3_UPLOAD_PART_MIN_SIZE": "262144"})
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start")
    env = {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint, proc
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` for the whole session."""
    uri, proc = start_mlflow(tmp_path_factory.mktemp("mlflow"), free_port())
    yield uri
    stop(proc)


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the whole session (started after the S3 env is set, so workers inherit it)."""
    import ray

    from launch.cluster import connect

    connect(log=lambda *_: None, num_cpus=2)  # the CI machine's size, whatever this host has
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def train_dataset(tmp_path_factory):
    """A low-noise world small enough for a few CPU epochs under Ray."""
    from heimdall.data.synth import SynthSpec, synthesize
    from launch.cli import WORLD_PRESETS

    out = tmp_path_factory.mktemp("data") / "train"
    synthesize(SynthSpec(out=str(out), samples=4000, seed=5, iq_length=256, shard_size=512,
                         world=WORLD_PRESETS["low-noise"]), workers=2, log=lambda *_: None)
    return str(out)


@pytest.fixture(scope="session")
def asha_sweep(train_dataset, tmp_path_factory, ray_session, mlflow_server):
    from launch.tune import tune_sweep

    tmp = tmp_path_factory.mktemp("sweep")
    config, _ = sweep_config(train_dataset, tmp, "asha", mlflow_server)
    lines = []
    outcome = tune_sweep(config, log=lines.append)
    return config, outcome, "\n".join(lines)


@pytest.fixture(scope="session")
def trained_checkpoint(train_dataset, tmp_path_factory):
    return fit_tiny(train_dataset, tmp_path_factory.mktemp("fit-tiny"), epochs=4)


@pytest.fixture(scope="session")
def exported_model(trained_checkpoint, mlflow_server, tmp_path_factory):
    """The trained checkpoint exported, validated and registered as OPS_MODEL (candidate + champion)."""
    return export_checkpoint(trained_checkpoint, mlflow_server, tmp_path_factory.mktemp("ops-export"))


@pytest.fixture(scope="session")
def reference_run(train_dataset, tmp_path_factory, ray_session, mlflow_server, s3_server):
    """An undisturbed 2-worker run with S3 checkpoints and a real MLflow server: what faults compare to."""
    import boto3

    from launch.train import train

    boto3.client("s3").create_bucket(Bucket="runs")
    tmp = tmp_path_factory.mktemp("train")
    config = config_for(train_dataset, tmp, "reference", "ray.num_workers=2", "run.storage_path=s3://runs/heimdall",
                        f"mlflow.tracking_uri={mlflow_server}", "run.keep_checkpoints=2")
    lines = []
    outcome = train(config, log=lines.append)
    return config, outcome, "\n".join(lines)
