import os
from pathlib import Path

import pytest

os.environ.setdefault("PYTHONHASHSEED", "0")

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
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc, what: str, tries: int = 300) -> None:
    import time
    import urllib.request

    for _ in range(tries):
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{what} did not start")


def start_mlflow(root, port: int):
    """A real `mlflow server` (SQL backend, artifacts served over HTTP) on loopback; returns (uri, proc)."""
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--artifacts-destination", str(root / "artifacts")],
                            stdout=open(root / "server.log", "a"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    _wait_http(f"{uri}/health", proc, "mlflow server")
    return uri, proc


def stop(proc, timeout: float = 20) -> None:
    """Stop a server and every process it started (mlflow server runs its workers as children)."""
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` for the whole session."""
    uri, proc = start_mlflow(tmp_path_factory.mktemp("mlflow"), _free_port())
    yield uri
    stop(proc)


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the whole session (started after the S3 env is set, so workers inherit it)."""
    import ray

    from launch.cluster import connect

    connect(log=lambda *_: None)
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


# ---- one small ASHA sweep per session: test_tune checks the sweep, test_export exports from it ----
SWEEP_EPOCHS = 4
# Grid order is deterministic: the 2nd and 3rd learning rates are far too small and rank last at rung 1.
SPACE = {"optim.lr": {"grid": [3.0e-3, 1.0e-6, 2.0e-6, 1.0e-3]}}


def sweep_config(data, tmp_path, name, mlflow_uri, *extra):
    import yaml

    from heimdall.config import TuneConfig, load_config

    cfg = {"data": {"uri": str(data), "batch_size": 64, "normalization_samples": 512},
           "model": {"size": "tiny"}, "optim": {"warmup_steps": 10},
           "trainer": {"max_epochs": SWEEP_EPOCHS, "patience": SWEEP_EPOCHS, "out_dir": str(tmp_path / name)},
           "run": {"storage_path": str(tmp_path / "runs")}, "mlflow": {"tracking_uri": mlflow_uri},
           "tune": {"name": name, "num_samples": 1, "scheduler": "asha", "grace_period": 1, "space": SPACE}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path, list(extra), schema=TuneConfig), path


@pytest.fixture(scope="session")
def asha_sweep(train_dataset, tmp_path_factory, ray_session, mlflow_server):
    from launch.tune import tune_sweep

    tmp = tmp_path_factory.mktemp("sweep")
    config, _ = sweep_config(train_dataset, tmp, "asha", mlflow_server)
    lines = []
    outcome = tune_sweep(config, log=lines.append)
    return config, outcome, "\n".join(lines)


# ---- a tiny model trained without Ray, and its exported ONNX (registered): for the ops commands ----
OPS_MODEL = "heimdall-ops"


def fit_tiny(data: str, out_dir, epochs: int, lr: float = 3e-3):
    """heimdall fit (no Ray) of the tiny model; returns the best checkpoint path."""
    from heimdall.config import FitConfig
    from heimdall.training.fit import fit

    config = FitConfig.model_validate({
        "data": {"uri": data, "batch_size": 64, "normalization_samples": 512},
        "model": {"size": "tiny"}, "optim": {"lr": lr, "warmup_steps": 10},
        "trainer": {"max_epochs": epochs, "patience": epochs, "out_dir": str(out_dir), "progress": False}})
    return fit(config, log=lambda *_: None).best_checkpoint


def export_checkpoint(checkpoint: str, mlflow_uri: str, tmp, *overrides: str):
    """heimdall export of a checkpoint into OPS_MODEL on the session's MLflow, serving copies in tmp."""
    from heimdall.config import ExportConfig, load_config
    from launch.export import export_model

    config = load_config(None, [f"export.source={checkpoint}", f"export.model_name={OPS_MODEL}",
                                f"export.models_uri={tmp}/models", f"export.out_dir={tmp}/export",
                                f"mlflow.tracking_uri={mlflow_uri}", "export.random_batches=2", *overrides],
                         schema=ExportConfig)
    return export_model(config, log=lambda *_: None)


@pytest.fixture(scope="session")
def trained_checkpoint(train_dataset, tmp_path_factory):
    return fit_tiny(train_dataset, tmp_path_factory.mktemp("fit-tiny"), epochs=4)


@pytest.fixture(scope="session")
def exported_model(trained_checkpoint, mlflow_server, tmp_path_factory):
    """The trained checkpoint exported, validated and registered as OPS_MODEL (candidate + champion)."""
    return export_checkpoint(trained_checkpoint, mlflow_server, tmp_path_factory.mktemp("ops-export"))


# ---- `heimdall train` runs shared by test_train and test_faults --------------------------------------
QUICK_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "quick.yaml")
TRAIN_EPOCHS = 5


def config_for(data, tmp_path, name, *extra):
    from heimdall.config import TrainConfig, load_config

    return load_config(QUICK_CONFIG, [f"data.uri={data}", f"trainer.out_dir={tmp_path / name}", f"run.name={name}",
                                      f"trainer.max_epochs={TRAIN_EPOCHS}", f"trainer.patience={TRAIN_EPOCHS}",
                                      "model.dropout=0.0", "data.normalization_samples=512", *extra],
                       schema=TrainConfig)


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


def mlflow_run(mlflow_uri: str, run_name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("heimdall")
    runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{run_name}'") if exp else []
    return runs[0] if runs else None


def epoch_steps(mlflow_uri: str, run_id: str, key: str = "val_p68_m") -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(mlflow_uri).get_metric_history(run_id, key))


def wait_for_epochs(mlflow_uri: str, run_name: str, epochs: int, alive=lambda: True, timeout: float = 300) -> None:
    """Until MLflow holds `epochs` epochs of the run (each is committed by then: metrics reach MLflow
    only after Ray Train has recorded the epoch's checkpoint)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and alive():
        try:
            run = mlflow_run(mlflow_uri, run_name)
            if run and len(epoch_steps(mlflow_uri, run.info.run_id)) >= epochs:
                return
        except Exception:  # noqa: BLE001 - the server may be the thing a test has stopped
            pass
        time.sleep(0.3)
    raise AssertionError(f"run {run_name} did not reach {epochs} epochs")
