"""Which Ray to use, what it offers, and how training workers and Ray Data share it.

Two kinds of Ray: one this command starts for itself (a laptop, a single GPU box), and a cluster it
joins (RAY_ADDRESS, or a job submitted with `ray job submit`). A joined cluster may be autoscaling:
its GPU nodes appear only once a run asks for them, so what it has now says little about what it
can hold. There a run states what it wants (`ray.use_gpu`), waits for the autoscaler, and keeps its
files where every node sees them.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

from heimdall.config import ConfigError, ScaleConfig, TrainConfig
from heimdall.tracking import resolve_tracking_uri

DRIVER_RESOURCE = "driver_slot"  # custom resource that pins Tune trial drivers (see launch/tune.py)
# Reach the workers when this driver joins a cluster itself; a submitted job brings its own runtime env.
# Only settings: a runtime env is shown in Ray's dashboard, so credentials never travel in one
# (nodes use their instance profile, or the cluster's own environment).
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_USERNAME",
              "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
_started_here = False  # this process started its own local Ray


@dataclass(frozen=True)
class Cluster:
    """The Ray this command runs on, as it is now."""
    resources: dict[str, float]  # totals of the alive nodes
    nodes: list[dict[str, float]] = field(default_factory=list)  # each alive node's resources
    joined: bool = False  # a cluster this command did not start: it may grow (autoscaler) and spans hosts

    @property
    def shared(self) -> bool:
        """Nodes other than this one may run the work: local paths are not enough."""
        return self.joined or len(self.nodes) > 1


def joining() -> bool:
    """Whether this command runs on a cluster it did not start; known before connecting, so that
    checks can run before anything is written."""
    return not _started_here and (bool(os.environ.get("RAY_ADDRESS")) or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ)


def connect(log=print, driver_slots: int = 4, num_cpus: int | None = None) -> Cluster:
    """Use RAY_ADDRESS's cluster (or the one a submitted job runs in); otherwise start a private
    local Ray (of num_cpus CPUs, default all), never silently joining another instance on this host."""
    global _started_here
    import ray
    from ray.data import DataContext

    import heimdall

    address = os.environ.get("RAY_ADDRESS")
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    if not ray.is_initialized():
        # Which code runs matters under `ray job submit` (the uploaded working dir, not an installed copy).
        log(f"heimdall {heimdall.__version__} from "
            f"{os.path.dirname(os.path.dirname(os.path.abspath(heimdall.__file__)))}")
        quiet = dict(logging_level=logging.WARNING, log_to_driver=True,
                     logging_config=ray.LoggingConfig(log_level="WARNING"))
        if address:
            _started_here = False
            log(f"using the Ray cluster at {address}")
            env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
            kept = [k for k in SECRET_ENV if k in os.environ]
            if kept and not in_job:
                log(f"warning: not forwarding {', '.join(kept)} to the cluster's workers (a runtime env is shown "
                    "in the dashboard): they use their instance profile or the cluster's own environment")
            ray.init(address=address, runtime_env=None if in_job or not env else {"env_vars": env}, **quiet)
        else:
            log("starting a local Ray (set RAY_ADDRESS to use a running cluster)")
            # The dashboard is Ray's state API: Tune needs it to release finished trials' resources
            # (tune refuses to start without it). None = start it where ray[default] is installed; lean
            # GPU images without it can still run Train.
            ray.init(address="local", include_dashboard=None, resources={DRIVER_RESOURCE: driver_slots},
                     num_cpus=num_cpus, **quiet)
            _started_here = True
    DataContext.get_current().enable_progress_bars = False  # per-epoch lines instead, readable in job logs
    return describe(joined=joining())


def describe(joined: bool) -> Cluster:
    import ray

    nodes = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n["Alive"]]
    return Cluster({k: float(v) for k, v in ray.cluster_resources().items()}, nodes, joined)


def check_shared_storage(config: TrainConfig, cluster: Cluster) -> None:
    """Refuse, before anything starts, paths and stores that only one node of a cluster sees."""
    if not cluster.shared:
        return
    where = "a cluster of more than one node" if len(cluster.nodes) > 1 else "a cluster this command did not start"
    if not config.run.shared_storage:
        for key, uri in (("run.storage_path", config.run.storage_path), ("data.uri", config.data.uri)):
            if "://" not in uri or uri.startswith("file:"):
                raise ConfigError(f"{key}={uri} is a local path, and on {where} the other nodes do not see it: "
                                  f"use s3://..., or set run.shared_storage=true if every node mounts it (NFS)")
    if config.mlflow.enabled:
        uri = resolve_tracking_uri(config.mlflow.tracking_uri)
        if uri.startswith(("sqlite:", "file:")):
            raise ConfigError(f"mlflow.tracking_uri resolves to {uri}, a store on one node's disk; on {where} use an "
                              "MLflow server (mlflow.tracking_uri=http://... or MLFLOW_TRACKING_URI), or set "
                              "mlflow.enabled=false")


@dataclass(frozen=True)
class WorkerPlan:
    num_workers: int  # at most (an elastic run starts with what is there, down to min_workers)
    use_gpu: bool
    cpus_per_worker: float
    threads: int  # torch intra-op threads per worker
    read_cpus: float  # CPU of each Ray Data read task
    waits: str = ""  # what the run waits for the autoscaler to add ("" = the cluster holds it now)
    min_workers: int = 0  # 0: num_workers, fixed
    resize_interval_s: float = 60.0

    @property
    def elastic(self) -> bool:
        return 0 < self.min_workers < self.num_workers

    @property
    def workers(self) -> str:
        return f"{self.min_workers}-{self.num_workers}" if self.elastic else str(self.num_workers)


def resolve_gpu(scale: ScaleConfig, cluster: Cluster) -> bool:
    gpus = cluster.resources.get("GPU", 0.0)
    if scale.use_gpu is not None:
        return scale.use_gpu
    if cluster.joined and gpus < 1:
        # An autoscaling cluster's GPU nodes start at 0: guessing "no GPU" here would train on CPUs.
        raise ConfigError("ray.use_gpu is not set and this cluster has no GPU now: set ray.use_gpu=true to train on "
                          "GPUs (the run waits for the autoscaler to start GPU nodes), or ray.use_gpu=false to "
                          "train on CPUs")
    return gpus >= 1


def node_cpus(cluster: Cluster, use_gpu: bool, data_cpus: float) -> float | None:
    """Whole CPUs per worker on the smallest node that can take one, after Ray Data's share."""
    sizes = [n.get("CPU", 0.0) / n["GPU"] if use_gpu else n.get("CPU", 0.0)
             for n in cluster.nodes if (n.get("GPU", 0) >= 1 if use_gpu else n.get("CPU", 0) >= 1)]
    return max(1.0, math.floor(min(sizes) - data_cpus)) if sizes else None


def default_cpus(scale: ScaleConfig, cluster: Cluster, use_gpu: bool, n: int) -> float:
    """CPUs per worker when unset: the CPUs there are now, less Ray Data's, shared by the workers
    (fractions on a small machine); a GPU worker takes no more than its node's CPUs per GPU. A joined
    cluster with no CPUs yet (its nodes come with the autoscaler): a GPU node's share, else 1."""
    share = (cluster.resources.get("CPU", 0.0) - scale.data_cpus) / n
    per_node = node_cpus(cluster, use_gpu, scale.data_cpus)
    if share <= 0:
        if cluster.joined:
            return per_node or 1.0
        raise ConfigError(f"ray.num_workers={n}: the cluster's {cluster.resources.get('CPU', 0.0):g} CPUs leave none "
                          f"for workers after ray.data_cpus={scale.data_cpus:g}")
    cpw = float(math.floor(share)) if share >= 1 else math.floor(share * 100) / 100
    return min(cpw, per_node) if use_gpu and per_node else cpw


def plan_workers(scale: ScaleConfig, cluster: Cluster) -> WorkerPlan:
    """Resolve auto settings against the cluster; refuse what a Ray of our own cannot hold (naming the
    key), and on a joined cluster say what the run will wait for instead."""
    n, cpus, gpus = scale.max_workers, cluster.resources.get("CPU", 0.0), cluster.resources.get("GPU", 0.0)
    low = scale.min_workers  # what must fit to start; an elastic run takes up to n as the cluster allows
    use_gpu = resolve_gpu(scale, cluster)
    cpw = scale.cpus_per_worker or default_cpus(scale, cluster, use_gpu, n)
    short = shortfall(scale, low, cpw, use_gpu, cpus, gpus)  # an elastic run starts once its minimum fits
    if short and scale.check_resources and not cluster.joined:
        fix = " (lower ray.num_workers, or set ray.use_gpu=false)" if use_gpu and gpus < low else ""
        raise ConfigError(short[0] + fix)
    return WorkerPlan(n, use_gpu, cpw, max(1, int(cpw)), min(1.0, scale.data_cpus),
                      "; ".join(short) if cluster.joined else "",
                      min_workers=low if scale.elastic else 0, resize_interval_s=scale.resize_interval_s)


def shortfall(scale: ScaleConfig, n: int, cpw: float, use_gpu: bool, cpus: float, gpus: float) -> list[str]:
    """What n workers need that the cluster does not have now, each naming its keys."""
    short = []
    if use_gpu and gpus < n:
        short.append(f"ray.num_workers={n} with ray.use_gpu=true needs {n} GPUs; the cluster has {gpus:g}")
    need_cpu = n * cpw + scale.data_cpus
    if need_cpu > cpus + 1e-6:
        short.append(f"ray.num_workers={n} x ray.cpus_per_worker={cpw:g} + ray.data_cpus={scale.data_cpus:g} "
                     f"needs {need_cpu:g} CPUs; the cluster has {cpus:g}")
    return short


def describe_plan(plan: WorkerPlan) -> str:
    elastic = f" (elastic: starts with what is there, resizes every {plan.resize_interval_s:g} s)" if plan.elastic else ""
    line = (f"{plan.workers} worker(s){elastic}, {'1 GPU' if plan.use_gpu else 'no GPU'} and {plan.cpus_per_worker:g} "
            f"CPU each ({plan.threads} torch thread(s)); Ray Data read tasks {plan.read_cpus:g} CPU")
    if plan.waits:
        line += f"\nwaiting for the autoscaler: {plan.waits} now (the run starts when nodes join)"
    return line
