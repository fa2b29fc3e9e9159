"""cluster.yaml against the installed Ray's schema, and the real `ray job submit` path: a second,
private Ray head started with `ray start --head`, a pipeline job submitted with the real CLI, its
MLflow/S3 environment arriving only through the job's runtime env, token authentication on."""
import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")


# ---- cluster.yaml -----------------------------------------------------------------------------------
def test_cluster_yaml_validates_against_rays_schema():
    import jsonschema
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(fillout_defaults(copy.deepcopy(config)))
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"driver_slot": 8}  # drivers pinned to the head
    gpu = {k: t for k, t in types.items() if k != config["head_node_type"]}
    assert gpu and all(t["min_workers"] == 0 and t["node_config"]["InstanceType"].startswith("g") for t in gpu.values())
    assert any(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for t in gpu.values())
    setup = "\n".join(config["setup_commands"])
    assert "download.pytorch.org/whl/cu" in setup and ".[ray,mlflow,export]" in setup and "ray[default,train,tune]==" in setup
    assert all("RAY_AUTH_MODE=token" in c for c in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:])
    broken = copy.deepcopy(config)  # the validator is strict: a misspelled key fails
    broken["available_node_types"]["gpu_1x"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_config(fillout_defaults(broken))


def test_deploy_examples_parse():
    runtime_env = yaml.safe_load((ROOT / "deploy" / "runtime_env.yaml").read_text())
    assert ".venv" in runtime_env["excludes"] and "data" in runtime_env["excludes"]
    job = yaml.safe_load((ROOT / "deploy" / "kuberay-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and "heimdall.cli pipeline" in job["spec"]["entrypoint"]
    assert "driver_slot" in job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["resources"]


# ---- ray job submit against a real head ---------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def clean_env(**extra) -> dict:
    """The head's environment: no MLflow or AWS settings (those must come from the job's runtime env)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "AWS_", "RAY_")) and k not in ("PYTHONPATH",)}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


@pytest.fixture(scope="module")
def ray_head(ray_session):
    """`ray start --head --block` in its own process group with its own ports and temp dir. Stopping
    it never uses `ray stop` (that stops every Ray on the host, the test session's included)."""
    gcs, dashboard, client, agent_http, agent_grpc, runtime_env, metrics, node_manager, object_manager = free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="hj", dir="/tmp")  # short: Ray's socket paths have a length limit
    cmd = [RAY, "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dashboard}",
           "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--include-dashboard=true", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
           f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
           "--min-worker-port=20100", "--max-worker-port=20999", f"--temp-dir={temp_dir}",
           "--num-cpus=2", '--resources={"driver_slot": 4}', "--disable-usage-stats"]
    log = open(Path(temp_dir) / "head.log", "w")
    head = subprocess.Popen(cmd, env=clean_env(RAY_AUTH_MODE="token"), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # answering (401 without a token): up
            break
        except OSError:
            assert head.poll() is None, (Path(temp_dir) / "head.log").read_text()[-3000:]
            time.sleep(1)
    else:
        pytest.fail("the Ray head did not come up")
    yield url, f"127.0.0.1:{gcs}"
    head.send_signal(signal.SIGINT)  # what `--block` documents (it may ignore SIGTERM while shutting down)
    try:
        head.wait(60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)  # anything of this head's group still alive
    except ProcessLookupError:
        pass
    shutil.rmtree(temp_dir, ignore_errors=True)


def ray_cli(*args, auth: str = "token", timeout: int = 120):
    return subprocess.run([RAY, *args], env=clean_env(RAY_AUTH_MODE=auth), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def submit_and_wait(address: str, runtime_env: dict, *entrypoint: str, timeout_s: int = 600) -> tuple[str, str]:
    """`ray job submit --no-wait`, then poll its status; returns (final status, the job's logs)."""
    out = ray_cli("job", "submit", "--no-wait", "--address", address, "--working-dir", str(ROOT),
                  "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    job_id = re.search(r"raysubmit_\w+", out.stdout + out.stderr).group(0)
    deadline, status = time.time() + timeout_s, "PENDING"
    while time.time() < deadline and status in ("PENDING", "RUNNING"):
        time.sleep(5)
        reply = ray_cli("job", "status", "--address", address, job_id)
        text = reply.stdout + reply.stderr
        # Running: "Status for job '<id>': RUNNING"; finished: "Job '<id>' succeeded" (or failed, stopped).
        found = re.search(r"Status for job '\S+': (\w+)", text) or re.search(r"Job '\S+' (succeeded|failed|stopped)", text)
        status = found.group(1).upper() if found else status
    stacks = ""
    if status in ("PENDING", "RUNNING"):  # what is still alive? (diagnostics for the failure message)
        stacks = subprocess.run(["ps", "-eo", "pid,ppid,pgid,etime,args", "--forest"], capture_output=True,
                                text=True).stdout
        ray_cli("job", "stop", "--address", address, job_id)
    logs = ray_cli("job", "logs", "--address", address, job_id)
    return status, logs.stdout + logs.stderr + stacks


@pytest.mark.timeout(900)
def test_ray_job_submit_runs_the_pipeline(ray_head, ray_session, mlflow_server, s3_server, tmp_path):
    import boto3
    import ray
    from mlflow.tracking import MlflowClient

    ray_head, gcs = ray_head
    # Without the cluster's token the job server refuses the client.
    denied = ray_cli("job", "list", "--address", ray_head, auth="disabled")
    assert denied.returncode != 0, denied.stdout[-1000:]

    for bucket in ("jobruns", "jobmodels"):
        boto3.client("s3").create_bucket(Bucket=bucket)
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "AWS_ENDPOINT_URL_S3": s3_server,
           **{k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")},
           "PYTHONUNBUFFERED": "1",
           # Two Ray instances on this host (the session's and this head): Ray Train's placement-group
           # cleaner auto-detects its cluster and needs to be told (see launch/tune.py).
           "RAY_ADDRESS": gcs}
    runtime_env = {"env_vars": env, **{k: v for k, v in yaml.safe_load((ROOT / "deploy" / "runtime_env.yaml").read_text()).items()
                                       if k == "excludes"}}
    status, log = submit_and_wait(ray_head, runtime_env, "python", "-m", "heimdall.cli", "pipeline",
                 f"data.uri={tmp_path / 'data'}", "synth.samples=3000", "synth.iq_length=256", "synth.workers=1",
                 "data.normalization_samples=512", "trainer.max_epochs=3", "trainer.patience=3",
                 f"trainer.out_dir={tmp_path / 'out'}", "run.storage_path=s3://jobruns/heimdall",
                 "tune.name=job-sweep", "tune.num_samples=2", "tune.grace_period=3",
                 "mlflow.experiment=job",
                 "export.models_uri=s3://jobmodels/onnx", f"export.out_dir={tmp_path / 'export'}",
                 "export.model_name=job-model")
    (tmp_path / "job.log").write_text(log)
    assert status == "SUCCEEDED", f"{tmp_path / 'job.log'}\n{log[-6000:]}"
    # The uploaded working directory's code ran, not the copy installed in the virtualenv.
    code_dir = next(line for line in log.splitlines() if line.startswith("heimdall ") and " from " in line).split(" from ")[1]
    assert Path(code_dir).resolve() != ROOT and "runtime_resources" in code_dir, code_dir
    # MLflow and S3 reached driver and workers only through the runtime env (the head has neither).
    checkpoints = boto3.client("s3").list_objects_v2(Bucket="jobruns", Prefix="heimdall/job-sweep-trials/")
    assert any(o["Key"].endswith("/checkpoint.ckpt") for o in checkpoints.get("Contents", []))
    client = MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias("job-model", "champion")
    key = version.tags["serving_uri"].removeprefix("s3://jobmodels/")
    assert boto3.client("s3").head_object(Bucket="jobmodels", Key=key)["Metadata"]["sha256"] == version.tags["sha256"]
    exp = client.get_experiment_by_name("job")
    assert len(client.search_runs([exp.experiment_id], "tags.`tune.trial_id` != ''")) == 2
    assert "pipeline finished" in log and "physics baseline" in log
    # The session's own Ray is untouched by all this.
    assert ray.is_initialized() and ray.get(ray.remote(lambda: 41 + 1).remote()) == 42
