import os

import pytest

os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """A small default-world dataset shared by the read-only tests."""
    from heimdall.synth import SynthSpec, synthesize

    out = tmp_path_factory.mktemp("data") / "small"
    synthesize(SynthSpec(out=str(out), samples=600, seed=3, iq_length=256, shard_size=256), log=lambda *_: None)
    return str(out)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 HTTP endpoint (moto server) on loopback for the whole test session."""
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
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
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
    yield endpoint
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


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (SQL backend, artifacts served over HTTP) for the whole session."""
    import subprocess
    import sys
    from pathlib import Path

    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--artifacts-destination", str(root / "artifacts")],
                            stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, env=env)
    uri = f"http://127.0.0.1:{port}"
    _wait_http(f"{uri}/health", proc, "mlflow server")
    yield uri
    proc.terminate()
    proc.wait(20)


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
    from heimdall.synth import SynthSpec, synthesize
    from heimdall.cli import WORLD_PRESETS

    out = tmp_path_factory.mktemp("data") / "train"
    synthesize(SynthSpec(out=str(out), samples=4000, seed=5, iq_length=256, shard_size=512,
                         world=WORLD_PRESETS["low-noise"]), workers=2, log=lambda *_: None)
    return str(out)
