"""Which Ray to use and how to share its resources among training workers and Ray Data."""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

from heimdall.config import ConfigError, ScaleConfig

DRIVER_RESOURCE = "driver_slot"  # custom resource that pins Tune trial drivers (see launch/tune.py)
# Reach the workers when this driver joins a cluster itself; a submitted job brings its own runtime env.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_TRACKING_TOKEN", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def connect(log=print, driver_slots: int = 4) -> None:
    """Use RAY_ADDRESS's cluster (or the one a submitted job runs in); otherwise start a private
    local Ray, never silently joining another instance that happens to run on this host."""
    import ray
    from ray.data import DataContext

    import heimdall

    # Which code runs matters under `ray job submit` (the uploaded working dir, not an installed copy).
    log(f"heimdall {heimdall.__version__} from {os.path.dirname(os.path.dirname(os.path.abspath(heimdall.__file__)))}")
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        quiet = dict(logging_level=logging.WARNING, log_to_driver=True,
                     logging_config=ray.LoggingConfig(log_level="WARNING"))
        if address:
            log(f"using the Ray cluster at {address}")
            in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
            env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
            ray.init(address=address, runtime_env=None if in_job or not env else {"env_vars": env}, **quiet)
        else:
            log("starting a local Ray (set RAY_ADDRESS to use a running cluster)")
            # The dashboard is Ray's state API: Tune needs it to release finished trials' resources
            # (tune refuses to start without it). None = start it where ray[default] is installed; lean
            # GPU images without it can still run Train.
            ray.init(address="local", include_dashboard=None, resources={DRIVER_RESOURCE: driver_slots}, **quiet)
    DataContext.get_current().enable_progress_bars = False  # per-epoch lines instead, readable in job logs


@dataclass(frozen=True)
class WorkerPlan:
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    threads: int  # torch intra-op threads per worker
    read_cpus: float  # CPU of each Ray Data read task


def plan_workers(scale: ScaleConfig, cluster: dict[str, float]) -> WorkerPlan:
    """Resolve auto settings against the cluster's resources; refuse what it cannot hold, naming the key."""
    n, cpus, gpus = scale.num_workers, float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    use_gpu = scale.use_gpu if scale.use_gpu is not None else gpus >= 1
    if use_gpu and scale.check_resources and gpus < n:
        raise ConfigError(f"ray.num_workers={n} with ray.use_gpu=true needs {n} GPUs; the cluster has {gpus:g} "
                          "(lower ray.num_workers, or set ray.use_gpu=false)")
    cpw = scale.cpus_per_worker
    if cpw is None:
        share = (cpus - scale.data_cpus) / n
        cpw = float(math.floor(share)) if share >= 1 else math.floor(share * 100) / 100
        if cpw <= 0:
            raise ConfigError(f"ray.num_workers={n}: the cluster's {cpus:g} CPUs leave none for workers after "
                              f"ray.data_cpus={scale.data_cpus:g}")
    need = n * cpw + scale.data_cpus
    if scale.check_resources and need > cpus + 1e-6:
        raise ConfigError(f"ray.num_workers={n} x ray.cpus_per_worker={cpw:g} + ray.data_cpus={scale.data_cpus:g} "
                          f"needs {need:g} CPUs; the cluster has {cpus:g}")
    return WorkerPlan(n, use_gpu, cpw, max(1, int(cpw)), min(1.0, scale.data_cpus))
