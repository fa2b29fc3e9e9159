"""Running on clusters: the cluster launcher and deploy files, read statically; planning against a
cluster this command did not start; and a real two-node Ray cluster on this machine (`ray start`:
a head that offers the driver resource and no training CPUs, a worker node with its own ports and
temp dir) that gets `heimdall train` and `heimdall pipeline` through the real `ray job submit`, with
data and checkpoints in S3 (the moto server), metrics in an MLflow server and token auth on."""
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from heimdall.config import ConfigError, ScaleConfig, TrainConfig, TuneConfig, load_config
from helpers import epoch_steps, free_ports, mlflow_run, wait_for_epochs
from launch.cluster import Cluster, check_shared_storage, plan_workers

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
BUCKETS = {"heimdall-data", "heimdall-runs", "heimdall-models"}


def lock_version(package: str) -> str:
    return re.search(rf"^{package}==(\S+)$", (ROOT / "requirements.lock").read_text(), re.M).group(1)


def submit_lines() -> list[str]:
    """Every documented `launch.cli` command line meant for a cluster."""
    texts = [(ROOT / "cluster.yaml").read_text(), (ROOT / "docs" / "cluster.md").read_text(),
             yaml.safe_load((ROOT / "deploy" / "kuberay-rayjob.yaml").read_text())["spec"]["entrypoint"]]
    lines = []
    for text in texts:
        joined = re.sub(r"\\\n\s*(#\s*)?", " ", text)  # continuation lines (also inside comments)
        lines += [ln for ln in joined.splitlines() if re.search(r"launch\.cli (train|tune|pipeline)\b", ln)]
    return lines


# ---- cluster.yaml and deploy/, read statically ------------------------------------------------------------
def test_cluster_yaml_validates_against_rays_schema():
    import jsonschema
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(fillout_defaults(copy.deepcopy(config)))
    broken = copy.deepcopy(config)  # the validator is strict: a misspelled key fails
    broken["available_node_types"]["gpu_1x"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_config(fillout_defaults(broken))


def test_cluster_yaml_trains_on_gpu_nodes_never_on_the_head():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "driver_slot": 8}
    start = " ".join(config["head_start_ray_commands"])
    assert "--num-cpus=0" in start and "driver_slot" in start and "RAY_AUTH_MODE=token" in start
    assert "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    gpu = {k: t for k, t in types.items() if k != config["head_node_type"]}
    assert gpu and all(t["min_workers"] == 0 and t["resources"]["GPU"] >= 1 and t["resources"]["CPU"] >= 2
                       and t["node_config"]["InstanceType"].startswith("g") for t in gpu.values())
    assert any(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for t in gpu.values())
    # Every node reaches S3 through an instance profile: the workers' is the one the docs' policy is for.
    assert head["node_config"]["IamInstanceProfile"] == {"Name": "heimdall-ray-head"}
    assert all(t["node_config"]["IamInstanceProfile"] == {"Name": "heimdall-ray-worker"} for t in gpu.values())
    # One AMI everywhere, the one docs/cluster.md states (driver, Python).
    amis = {t["node_config"]["ImageId"] for t in types.values()}
    assert amis == {"resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"}
    assert "base-oss-nvidia-driver-gpu-ubuntu-22.04" in (ROOT / "docs" / "cluster.md").read_text()


def test_cluster_setup_installs_the_lock_and_keeps_cudas_torch():
    setup = "\n".join(yaml.safe_load((ROOT / "cluster.yaml").read_text())["setup_commands"])
    assert "--python 3.11" in setup and sys.version_info[:2] == (3, 11)  # the Python the lock was made on
    torch_line = next(c for c in setup.splitlines() if "download.pytorch.org/whl/cu" in c)
    assert "sed -n 's/^torch==//p' requirements.lock" in torch_line  # the lock's torch version, CUDA build
    assert 'grep -v "^torch==" requirements.lock' in setup and "-c /tmp/heimdall-constraints.txt" in setup
    assert setup.index("download.pytorch.org") < setup.index("-c /tmp/heimdall-constraints.txt")
    assert '".[ray,mlflow,export]"' in setup and "ray[" not in setup  # Ray's version comes from the lock too
    docker = (ROOT / "deploy" / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+)-py(\d)(\d+)-gpu$", docker, re.M)
    assert base and base.group(1) == lock_version("ray") and (int(base.group(2)), int(base.group(3))) == (3, 11)
    assert "download.pytorch.org/whl/cu" in docker and 'grep -v "^torch==" requirements.lock' in docker
    assert docker.index("download.pytorch.org") < docker.index("-c /tmp/constraints.txt")


def test_deploy_files_use_gpus_profiles_and_no_keys():
    runtime_env = yaml.safe_load((ROOT / "deploy" / "runtime_env.yaml").read_text())
    assert ".venv" in runtime_env["excludes"] and "data" in runtime_env["excludes"]
    assert not [k for k in runtime_env["env_vars"] if k.startswith("AWS_") or "PASSWORD" in k]
    job = yaml.safe_load((ROOT / "deploy" / "kuberay-rayjob.yaml").read_text())
    cluster = job["spec"]["rayClusterSpec"]
    assert job["kind"] == "RayJob" and cluster["rayVersion"] == lock_version("ray")
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and "driver_slot" in head["rayStartParams"]["resources"]
    pods = [head["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    assert all(p["serviceAccountName"] == "heimdall" for p in pods)  # IRSA: S3 without keys
    assert all(c["image"].endswith("/heimdall-trainer:latest") for p in pods for c in p["containers"])
    assert "heimdall-trainer" in (ROOT / "deploy" / "Dockerfile").read_text()
    assert all(g["minReplicas"] == 0 and g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
               for g in cluster["workerGroupSpecs"])
    assert not [e for p in pods for c in p["containers"] for e in c.get("env", []) if e["name"].startswith("AWS_")]


def test_documented_cluster_commands_ask_for_gpus_and_the_iam_policy_covers_their_buckets():
    lines = submit_lines()
    assert {re.search(r"launch\.cli (\w+)", ln).group(1) for ln in lines} >= {"train", "tune", "pipeline"}, lines
    policy = json.loads((ROOT / "deploy" / "iam" / "s3-policy.json").read_text())
    granted = {r.removeprefix("arn:aws:s3:::").removesuffix("/*") for st in policy["Statement"] for r in st["Resource"]}
    actions = {a for st in policy["Statement"] for a in st["Action"]}
    assert {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"} <= actions
    for line in lines:
        assert "ray.use_gpu=true" in line, line
        for uri in re.findall(r"=s3://([\w.-]+)", line):
            assert uri in granted, (uri, line)
        assert "check_resources" not in line, line  # a joined cluster waits for its autoscaler by itself
        if "launch.cli train" not in line:
            assert "tune.max_concurrent_trials=" in line, line
    head = json.loads((ROOT / "deploy" / "iam" / "head-policy.json").read_text())
    assert any("iam:PassRole" in st["Action"] and any("heimdall-ray-worker" in r for r in st["Resource"])
               for st in head["Statement"])


# ---- planning against a cluster this command did not start (no Ray) -----------------------------------
HEAD_ONLY = Cluster({"CPU": 0, "driver_slot": 8}, [{"CPU": 0, "driver_slot": 8}], joined=True)
WITH_GPU_NODE = Cluster({"CPU": 8, "GPU": 1, "driver_slot": 8}, [{"CPU": 0, "driver_slot": 8}, {"CPU": 8, "GPU": 1}],
                        joined=True)


def test_a_joined_cluster_without_gpus_needs_use_gpu_stated():
    with pytest.raises(ConfigError, match=r"ray\.use_gpu is not set and this cluster has no GPU now"):
        plan_workers(ScaleConfig(), HEAD_ONLY)
    plan = plan_workers(ScaleConfig(use_gpu=False, cpus_per_worker=2), HEAD_ONLY)
    assert not plan.use_gpu and "needs 3 CPUs; the cluster has 0" in plan.waits
    assert plan_workers(ScaleConfig(), WITH_GPU_NODE).use_gpu  # GPUs present: auto takes them


def test_asking_for_gpus_waits_for_the_autoscaler_instead_of_refusing():
    plan = plan_workers(ScaleConfig(num_workers=4, use_gpu=True), HEAD_ONLY)  # the head alone, nothing refused
    assert plan.use_gpu and plan.num_workers == 4 and "needs 4 GPUs; the cluster has 0" in plan.waits
    plan = plan_workers(ScaleConfig(num_workers=1, use_gpu=True), WITH_GPU_NODE)
    assert not plan.waits and plan.cpus_per_worker == 7  # the GPU node's 8 CPUs less 1 for Ray Data
    with pytest.raises(ConfigError, match="needs 4 GPUs"):  # a Ray of our own cannot grow: refused
        plan_workers(ScaleConfig(num_workers=4, use_gpu=True), Cluster({"CPU": 8, "GPU": 1}))


def test_sweep_concurrency_on_an_autoscaling_cluster_is_what_was_asked():
    from launch.tune import plan_sweep

    config = TuneConfig.model_validate({"ray": {"use_gpu": True, "cpus_per_worker": 6},
                                        "tune": {"num_samples": 16, "max_concurrent_trials": 4}})
    plan, concurrent = plan_sweep(config, HEAD_ONLY)
    assert concurrent == 4 and plan.use_gpu and plan.cpus_per_worker == 6 and plan.waits
    config.tune.max_concurrent_trials = None  # unset: as many as there are trial-driver slots
    assert plan_sweep(config, HEAD_ONLY)[1] == 8
    config.tune.max_concurrent_trials = 12
    assert plan_sweep(config, HEAD_ONLY)[1] == 8


def test_worker_ranges_make_elastic_runs():
    config = load_config(None, ["ray.num_workers=1-4", "ray.resize_interval_s=5"], TrainConfig)
    assert (config.ray.min_workers, config.ray.max_workers, config.ray.elastic) == (1, 4, True)
    assert load_config(None, ["ray.num_workers=2-2"], TrainConfig).ray.num_workers == 2  # not elastic
    for bad, said in (("0", "need 1 <= MIN <= MAX"), ("3-1", "need 1 <= MIN <= MAX"), ("two", "neither a worker count")):
        with pytest.raises(ConfigError, match=re.escape(said)):
            load_config(None, [f"ray.num_workers={bad}"], TrainConfig)
    # A Ray of our own must hold the minimum; the run takes up to the maximum as it can.
    plan = plan_workers(ScaleConfig(num_workers="1-4", cpus_per_worker=1), Cluster({"CPU": 2}))
    assert plan.elastic and (plan.min_workers, plan.num_workers, plan.workers) == (1, 4, "1-4") and not plan.waits
    with pytest.raises(ConfigError, match="ray.num_workers=2 x ray.cpus_per_worker=1"):
        plan_workers(ScaleConfig(num_workers="2-4", cpus_per_worker=1), Cluster({"CPU": 2}))
    from launch.tune import plan_sweep

    sweep = TuneConfig.model_validate({"ray": {"num_workers": "1-2", "use_gpu": True}, "tune": {"num_samples": 8}})
    assert plan_sweep(sweep, Cluster({"CPU": 16, "GPU": 4, "driver_slot": 8}))[1] == 2  # trials sized by the maximum


@pytest.mark.parametrize("overrides, key", [
    (["run.storage_path=runs/ray", "mlflow.tracking_uri=http://mlflow:5000"], "run.storage_path=runs/ray is a local path"),
    (["data.uri=/mnt/data/quick", "mlflow.tracking_uri=http://mlflow:5000"], "data.uri=/mnt/data/quick is a local path"),
    (["mlflow.tracking_uri=sqlite:///mlflow.db"], "mlflow.tracking_uri resolves to sqlite:"),
    (["mlflow.tracking_uri=file:///tmp/mlruns"], "mlflow.tracking_uri resolves to file:"),
])
def test_storage_only_this_node_sees_is_refused_on_a_cluster(overrides, key):
    remote = ["run.storage_path=s3://heimdall-runs/ray", "data.uri=s3://heimdall-data/quick"]
    config = load_config(None, [*remote, *overrides], TrainConfig)
    for cluster in (HEAD_ONLY, Cluster({"CPU": 4}, [{"CPU": 2}, {"CPU": 2}])):  # joined, or two nodes
        with pytest.raises(ConfigError, match=re.escape(key)):
            check_shared_storage(config, cluster)
    check_shared_storage(config, Cluster({"CPU": 2}, [{"CPU": 2}]))  # one node of our own: anything goes
    if "mlflow" not in key:  # declared shared (NFS): accepted
        check_shared_storage(config.model_copy(update={"run": config.run.model_copy(update={"shared_storage": True})}),
                             HEAD_ONLY)
    check_shared_storage(load_config(None, [*remote, "mlflow.enabled=false"], TrainConfig), HEAD_ONLY)


# ---- ray job submit against a real head ---------------------------------------------------------------
def clean_env(**extra) -> dict:
    """A shell without MLflow, AWS or Ray settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "AWS_", "RAY_")) and k not in ("PYTHONPATH",)}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def credentials() -> dict:
    """What an instance profile gives a cloud node: S3 credentials in the node's own environment."""
    return {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}


def ray_start(args: list[str], temp_dir: str, name: str) -> subprocess.Popen:
    log = open(Path(temp_dir) / f"{name}.log", "w")
    return subprocess.Popen([RAY, "start", "--block", *args, "--disable-usage-stats"],
                            env=clean_env(RAY_AUTH_MODE="token", **credentials()),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def own_ports(temp_dir: str) -> list[str]:
    """Every port a Ray node opens, its own, and its own temp dir (two nodes share this host)."""
    dash_agent, agent_grpc, runtime_env, metrics, node_manager, object_manager = free_ports(6)
    return [f"--dashboard-agent-listen-port={dash_agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
            f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
            "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}"]


def stop_node(proc: subprocess.Popen) -> None:
    """SIGINT is what `--block` documents; never `ray stop` (that stops every Ray on the host,
    the test session's included)."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything of this node's group still alive
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def two_nodes(ray_session):
    """A head with the driver resource and no CPU for tasks, and a worker node with 3 whole CPUs."""
    gcs, dashboard, client = free_ports(3)
    head_dir = tempfile.mkdtemp(prefix="hh", dir="/tmp")  # short: Ray's socket paths have a length limit
    worker_dir = tempfile.mkdtemp(prefix="hw", dir="/tmp")
    head = ray_start(["--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
                      "--include-dashboard=true", f"--ray-client-server-port={client}", *own_ports(head_dir),
                      "--min-worker-port=20100", "--max-worker-port=20999",
                      "--num-cpus=0", '--resources={"driver_slot": 4}'], head_dir, "head")
    nodes = [head]
    try:
        url = f"http://127.0.0.1:{dashboard}"
        wait_for_dashboard(url, head, head_dir)
        nodes.append(worker_node(url, f"127.0.0.1:{gcs}", worker_dir, 21000))
        yield url, f"127.0.0.1:{gcs}"
    finally:
        for proc in reversed(nodes):
            stop_node(proc)
        shutil.rmtree(head_dir, ignore_errors=True)
        shutil.rmtree(worker_dir, ignore_errors=True)


def worker_node(url: str, gcs: str, temp_dir: str, first_port: int, cpus: int = 3) -> subprocess.Popen:
    """`ray start --address` of one more node with whole CPUs; returns once the cluster counts it."""
    before = len(alive_nodes(url))
    proc = ray_start([f"--address={gcs}", *own_ports(temp_dir), f"--num-cpus={cpus}",
                      f"--min-worker-port={first_port}", f"--max-worker-port={first_port + 999}"], temp_dir, "worker")
    deadline = time.time() + 120
    while len(alive_nodes(url)) <= before:
        assert time.time() < deadline and proc.poll() is None, (Path(temp_dir) / "worker.log").read_text()[-3000:]
        time.sleep(2)
    return proc


def wait_for_dashboard(url: str, head: subprocess.Popen, temp_dir: str) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # answering (401 without a token): up
            return
        except OSError:
            assert head.poll() is None, (Path(temp_dir) / "head.log").read_text()[-3000:]
            time.sleep(1)
    pytest.fail("the Ray head did not come up")


def state(url: str, what: str, *filters: str) -> list[dict]:
    """Ray's state API through the real CLI (token auth), as JSON."""
    args = ["list", what, "--address", url, "--format", "json", "--detail", "--limit", "1000"]
    for f in filters:
        args += ["--filter", f]
    out = ray_cli(*args)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return json.loads(out.stdout)


def alive_nodes(url: str) -> list[dict]:
    try:
        return [n for n in state(url, "nodes") if n["state"] == "ALIVE"]
    except (AssertionError, json.JSONDecodeError):
        return []


def job_env(mlflow_server: str, s3_server: str, gcs: str) -> dict:
    """Where MLflow and S3 are reaches driver and workers only through the job's runtime env (the nodes
    know neither); S3 credentials never travel in it: the nodes have their own (an instance profile)."""
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "AWS_ENDPOINT_URL_S3": s3_server,
           "AWS_DEFAULT_REGION": os.environ["AWS_DEFAULT_REGION"], "PYTHONUNBUFFERED": "1",
           # Two Ray instances on this host (the session's and this cluster): Ray Train's placement-group
           # cleaner auto-detects its cluster and needs to be told (see launch/tune.py).
           "RAY_ADDRESS": gcs}
    excludes = yaml.safe_load((ROOT / "deploy" / "runtime_env.yaml").read_text())["excludes"]
    return {"env_vars": env, "excludes": excludes}


def ray_cli(*args, auth: str = "token", timeout: int = 120):
    return subprocess.run([RAY, *args], env=clean_env(RAY_AUTH_MODE=auth), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def submit(address: str, runtime_env: dict, *entrypoint: str) -> str:
    """`ray job submit --no-wait` with the real CLI; returns the submission id."""
    out = ray_cli("job", "submit", "--no-wait", "--address", address, "--working-dir", str(ROOT),
                  "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return re.search(r"raysubmit_\w+", out.stdout + out.stderr).group(0)


def job_status(address: str, job_id: str) -> str:
    reply = ray_cli("job", "status", "--address", address, job_id)
    text = reply.stdout + reply.stderr
    # Running: "Status for job '<id>': RUNNING"; finished: "Job '<id>' succeeded" (or failed, stopped).
    found = re.search(r"Status for job '\S+': (\w+)", text) or re.search(r"Job '\S+' (succeeded|failed|stopped)", text)
    return found.group(1).upper() if found else "PENDING"


def wait_job(address: str, job_id: str, timeout_s: int = 600) -> tuple[str, str]:
    """Poll a job until it ends; returns (final status, the job's logs)."""
    deadline, status = time.time() + timeout_s, "PENDING"
    while time.time() < deadline and status in ("PENDING", "RUNNING"):
        time.sleep(5)
        status = job_status(address, job_id)
    stacks = ""
    if status in ("PENDING", "RUNNING"):  # what is still alive? (diagnostics for the failure message)
        stacks = subprocess.run(["ps", "-eo", "pid,ppid,pgid,etime,args", "--forest"], capture_output=True,
                                text=True).stdout
        ray_cli("job", "stop", "--address", address, job_id)
    logs = ray_cli("job", "logs", "--address", address, job_id)
    return status, logs.stdout + logs.stderr + stacks


def submit_and_wait(address: str, runtime_env: dict, *entrypoint: str, timeout_s: int = 600) -> tuple[str, str]:
    return wait_job(address, submit(address, runtime_env, *entrypoint), timeout_s)


@pytest.fixture(scope="module")
def s3_data(s3_server):
    import boto3

    from heimdall.data.synth import SynthSpec, synthesize
    from heimdall.data.world import WORLD_PRESETS

    boto3.client("s3").create_bucket(Bucket="multinode")
    synthesize(SynthSpec(out="s3://multinode/data", samples=2000, seed=11, iq_length=256, shard_size=512,
                         world=WORLD_PRESETS["low-noise"]), workers=2, log=lambda *_: None)
    return "s3://multinode/data"


@pytest.mark.multinode
@pytest.mark.timeout(600)
def test_train_job_on_two_nodes_keeps_workers_off_the_head(two_nodes, s3_data, mlflow_server, s3_server, tmp_path):
    import boto3
    from mlflow.tracking import MlflowClient

    url, gcs = two_nodes
    s3 = boto3.client("s3")
    status, log = submit_and_wait(url, job_env(mlflow_server, s3_server, gcs), "python", "-m", "launch.cli", "train",
                                  "data.uri=s3://multinode/data", "model.size=tiny", "data.normalization_samples=512",
                                  "trainer.max_epochs=2", "trainer.patience=2", "ray.num_workers=2",
                                  "ray.use_gpu=false", "ray.cpus_per_worker=1", "run.storage_path=s3://multinode/runs",
                                  "run.name=two-nodes", "mlflow.experiment=multinode",
                                  f"trainer.out_dir={tmp_path / 'out'}", timeout_s=420)
    (tmp_path / "job.log").write_text(log)
    assert status == "SUCCEEDED", f"{tmp_path / 'job.log'}\n{log[-6000:]}"
    nodes = alive_nodes(url)
    head = next(n["node_id"] for n in nodes if n["is_head_node"])
    worker_node = next(n["node_id"] for n in nodes if not n["is_head_node"])
    assert len(nodes) == 2 and len({n["node_ip"] for n in nodes}) == 1  # one IP: only node ids tell them apart
    # Ray's own record of where the training workers ran, and what each worker printed.
    workers = state(url, "actors", "class_name=RayTrainWorker")
    assert len(workers) >= 2 and {w["node_id"] for w in workers} == {worker_node}, workers
    placed = re.findall(r"worker (\d)/2 on node (\w+) \([\d.]+\): cpu", log)
    assert sorted(rank for rank, _ in placed) == ["0", "1"] and {n for _, n in placed} == {worker_node[:12]}, log[-4000:]
    assert head[:12] not in log
    # Checkpoints in S3, every epoch's metrics in the MLflow server.
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="multinode", Prefix="runs/two-nodes/").get("Contents", [])]
    assert "runs/two-nodes/epoch_0001/checkpoint.ckpt" in keys, keys
    client = MlflowClient(mlflow_server)
    run = client.search_runs([client.get_experiment_by_name("multinode").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.tags["ray.storage_path"] == "s3://multinode/runs"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_p68_m")] == [0, 1]
    assert "test_p68_m" in run.data.metrics


@pytest.mark.elastic
@pytest.mark.timeout(600)
def test_elastic_run_survives_a_lost_node_and_takes_it_back(two_nodes, s3_data, mlflow_server, tmp_path):
    """Three nodes (the head and two with 3 CPUs: one 2-CPU worker each, beside a Ray Data read): a
    1-2 worker run loses a node mid-run (its process group killed, as a reclaimed spot node),
    continues on the other from its latest checkpoint, and grows back when a node returns."""
    url, gcs = two_nodes
    spot = worker_node(url, gcs, tempfile.mkdtemp(prefix="hs", dir="/tmp"), 22000)
    epochs = 20
    env = job_env(mlflow_server, os.environ["AWS_ENDPOINT_URL_S3"], gcs)
    # Ray Train first tries the old size after a loss (the lost node still counts for a tick): give up sooner.
    env["env_vars"]["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "20"
    job = submit(url, env, "python", "-m", "launch.cli",
                 "train", "data.uri=s3://multinode/data", "model.size=tiny", "data.normalization_samples=512",
                 f"trainer.max_epochs={epochs}", f"trainer.patience={epochs}", "ray.num_workers=1-2",
                 "ray.resize_interval_s=5", "ray.use_gpu=false", "ray.cpus_per_worker=2",
                 "run.storage_path=s3://multinode/runs", "run.name=elastic",
                 f"trainer.out_dir={tmp_path / 'out'}")
    running = lambda: job_status(url, job) in ("PENDING", "RUNNING")  # noqa: E731
    back = None
    try:
        wait_for_epochs(mlflow_server, "elastic", 2, alive=running, timeout=300)
        os.killpg(spot.pid, signal.SIGKILL)  # the spot node is reclaimed, no notice
        wait_for_epochs(mlflow_server, "elastic", 4, alive=running, timeout=300)  # going on with one worker
        back = worker_node(url, gcs, tempfile.mkdtemp(prefix="hs", dir="/tmp"), 23000)  # a node comes back
        status, log = wait_job(url, job, timeout_s=420)
    except AssertionError as e:
        logs = ray_cli("job", "logs", "--address", url, job)
        ray_cli("job", "stop", "--address", url, job)
        raise AssertionError(f"{e}\n{(logs.stdout + logs.stderr)[-6000:]}") from None
    finally:
        for proc in (spot, back):
            if proc is not None:
                stop_node(proc)
    (tmp_path / "job.log").write_text(log)
    assert status == "SUCCEEDED", f"{tmp_path / 'job.log'}\n{log[-6000:]}"
    # Workers: 2 at first, 1 after the loss, 2 again after the node came back.
    sizes = [int(n) for n in re.findall(r"^elastic: (\d) of 1-2 workers", log, re.M)]
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2 and sizes.index(1) < len(sizes) - 1, (sizes, log[-5000:])
    # Every epoch exactly once in MLflow, with the worker count it ran on.
    run = mlflow_run(mlflow_server, "elastic")
    assert run.info.status == "FINISHED"
    assert epoch_steps(mlflow_server, run.info.run_id) == list(range(epochs))
    from mlflow.tracking import MlflowClient

    workers = [int(m.value) for m in sorted(MlflowClient(mlflow_server).get_metric_history(run.info.run_id, "epoch_workers"),
                                            key=lambda m: m.step)]
    assert len(workers) == epochs and workers[0] == 2 and 1 in workers and workers[-1] == 2, workers


@pytest.mark.multinode
@pytest.mark.timeout(300)
def test_joined_cluster_refuses_at_once_or_waits_for_gpus(two_nodes, s3_data, tmp_path):
    """A driver that joins the cluster (RAY_ADDRESS) gets the same rules as a submitted job."""
    url, gcs = two_nodes
    env = {**clean_env(RAY_AUTH_MODE="token", RAY_ADDRESS=gcs), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    base = [str(VENV_BIN / "heimdall"), "train", "data.uri=s3://multinode/data", "model.size=tiny",
            f"trainer.out_dir={tmp_path / 'out'}", "run.name=refused"]
    for extra, said in ((["run.storage_path=s3://multinode/runs"], "ray.use_gpu is not set"),
                        (["ray.use_gpu=false", f"run.storage_path={tmp_path / 'runs'}"], "run.storage_path=")):
        started = time.time()
        r = subprocess.run([*base, *extra], env={**env, **s3_env()}, capture_output=True, text=True, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and said in lines[0], r.stderr[-3000:]
        assert time.time() - started < 60
    assert not (tmp_path / "runs").exists()  # nothing written where other nodes could not see it
    # Asking for GPUs the cluster does not have yet: the run waits (an autoscaler would add them). Its
    # credentials stay home: the runtime env it gives the cluster is visible to anyone with the dashboard.
    secret = "sentinel-secret-7f3c9e"
    proc = subprocess.Popen([*base, "ray.use_gpu=true", "run.storage_path=s3://multinode/runs", "run.name=waits",
                             "mlflow.enabled=false"], env={**env, **s3_env(), "AWS_SECRET_ACCESS_KEY": secret},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        seen = ""
        deadline = time.time() + 120
        while "waiting for the autoscaler" not in seen and time.time() < deadline and proc.poll() is None:
            seen += proc.stdout.readline()
        assert "waiting for the autoscaler: ray.num_workers=1 with ray.use_gpu=true needs 1 GPUs" in seen, seen
        assert "warning: not forwarding AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in seen and secret not in seen, seen
        jobs = json.dumps(state(url, "jobs"))
        assert "http://127.0.0.1:9" in jobs and secret not in jobs  # the forwarded setting shows; the key is not there
        time.sleep(10)
        assert proc.poll() is None, seen + proc.stdout.read()  # still waiting, not refused
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def s3_env() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


@pytest.mark.multinode
@pytest.mark.timeout(900)
def test_ray_job_submit_runs_the_pipeline(two_nodes, ray_session, mlflow_server, s3_server, tmp_path):
    import boto3
    import ray
    from mlflow.tracking import MlflowClient

    ray_head, gcs = two_nodes
    # Without the cluster's token the job server refuses the client.
    denied = ray_cli("job", "list", "--address", ray_head, auth="disabled")
    assert denied.returncode != 0, denied.stdout[-1000:]

    for bucket in ("jobruns", "jobmodels"):
        boto3.client("s3").create_bucket(Bucket=bucket)
    runtime_env = job_env(mlflow_server, s3_server, gcs)
    status, log = submit_and_wait(ray_head, runtime_env, "python", "-m", "launch.cli", "pipeline",
                 f"data.uri={tmp_path / 'data'}", "synth.samples=3000", "synth.iq_length=256", "synth.workers=1", "ray.use_gpu=false",
                 "ray.cpus_per_worker=1", "run.shared_storage=true",
                 "data.normalization_samples=512", "trainer.max_epochs=3", "trainer.patience=3",
                 "model.size=tiny", "data.batch_size=64",
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
    # MLflow and S3's endpoint reached driver and workers only through the runtime env (the nodes know neither).
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
