"""What test files share besides fixtures: the two ways to run the `heimdall` command (`cli`, a
subprocess of the installed binary; `cli_in_process`, `launch.cli.main` under capsys), free ports and
server start/stop, the configs and small runs the session fixtures build on, MLflow look-ups, and the
constants they use. A plain module: `from helpers import ...` (pytest puts tests/ on sys.path for the
rootdir conftest). Fixtures stay in conftest.py and import from here.

Heavy imports (torch, mlflow, heimdall.config) stay inside the functions: importing this module is cheap.
"""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEIMDALL_BIN = str(Path(sys.executable).with_name("heimdall"))  # the installed `heimdall` command
EXAMPLES = ROOT / "examples" / "recordings"  # the shipped SigMF and legacy example recordings


# ---- running the CLI --------------------------------------------------------------------------------
def cli(*args: str, env: dict | None = None, timeout: float = 600, cwd=None) -> subprocess.CompletedProcess:
    """`heimdall ARGS` as a subprocess (the installed binary beside sys.executable): text, stdout and
    stderr captured. `env` is added to this process's environment."""
    return subprocess.run([HEIMDALL_BIN, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})})


def cli_in_process(capsys, *argv: str) -> tuple[int, str]:
    """`launch.cli.main(argv)` in this process; returns (exit code, stdout + stderr)."""
    from launch.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


# ---- ports and servers -------------------------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    """n distinct loopback ports free right now (all bound at once, then released)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def free_port() -> int:
    """One loopback port free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc, what: str, tries: int = 300) -> None:
    """Until `url` answers; kills `proc` and raises if it exits first or never answers."""
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
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--artifacts-destination", str(root / "artifacts")],
                            stdout=open(root / "server.log", "a"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    wait_http(f"{uri}/health", proc, "mlflow server")
    return uri, proc


def stop(proc, timeout: float = 20) -> None:
    """Stop a server and every process it started (mlflow server runs its workers as children)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ---- one small ASHA sweep per session: test_tune checks the sweep, test_export exports from it ----
SWEEP_EPOCHS = 4
# Grid order is deterministic: the 2nd and 3rd learning rates are far too small and rank last at rung 1.
SPACE = {"optim.lr": {"grid": [3.0e-3, 1.0e-6, 2.0e-6, 1.0e-3]}}


def sweep_config(data, tmp_path, name, mlflow_uri, *extra, space: dict | None = None):
    """The sweep's TuneConfig, written to tmp_path/NAME.yaml; returns (config, path)."""
    import yaml

    from heimdall.config import TuneConfig, load_config

    cfg = {"data": {"uri": str(data), "batch_size": 64, "normalization_samples": 512},
           "model": {"size": "tiny"}, "optim": {"warmup_steps": 10},
           "trainer": {"max_epochs": SWEEP_EPOCHS, "patience": SWEEP_EPOCHS, "out_dir": str(tmp_path / name)},
           "run": {"storage_path": str(tmp_path / "runs")}, "mlflow": {"tracking_uri": mlflow_uri},
           "tune": {"name": name, "num_samples": 1, "scheduler": "asha", "grace_period": 1, "space": space or SPACE}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path, list(extra), schema=TuneConfig), path


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


# ---- `heimdall train` runs shared by test_train and test_faults --------------------------------------
QUICK_CONFIG = str(ROOT / "configs" / "quick.yaml")
TRAIN_EPOCHS = 5


def config_for(data, tmp_path, name, *extra):
    """The quick config's TrainConfig for a run named NAME under tmp_path, TRAIN_EPOCHS epochs."""
    from heimdall.config import TrainConfig, load_config

    return load_config(QUICK_CONFIG, [f"data.uri={data}", f"trainer.out_dir={tmp_path / name}", f"run.name={name}",
                                      f"trainer.max_epochs={TRAIN_EPOCHS}", f"trainer.patience={TRAIN_EPOCHS}",
                                      "model.dropout=0.0", "data.normalization_samples=512", *extra],
                       schema=TrainConfig)


# ---- MLflow look-ups -------------------------------------------------------------------------------
def mlflow_run(mlflow_uri: str, run_name: str):
    """The run of experiment `heimdall` with that name, or None."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("heimdall")
    runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{run_name}'") if exp else []
    return runs[0] if runs else None


def epoch_steps(mlflow_uri: str, run_id: str, key: str = "val_p68_m") -> list[int]:
    """The sorted steps (epochs) at which the run logged `key`."""
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(mlflow_uri).get_metric_history(run_id, key))


def epoch_values(mlflow_uri: str, run_id: str, key: str = "val_p68_m") -> list[float]:
    """The values the run logged for `key`, in epoch order."""
    from mlflow.tracking import MlflowClient

    return [m.value for m in sorted(MlflowClient(mlflow_uri).get_metric_history(run_id, key), key=lambda m: m.step)]


def wait_for_epochs(mlflow_uri: str, run_name: str, epochs: int, alive=lambda: True, timeout: float = 300) -> None:
    """Until MLflow holds `epochs` epochs of the run (each is committed by then: metrics reach MLflow
    only after Ray Train has recorded the epoch's checkpoint)."""
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
