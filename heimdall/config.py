"""Typed run configuration: YAML file + dotted key=value overrides, validated before any work.

Unknown keys and wrong types fail with a message that names the key (e.g. `optim.lr`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ModelConfig(BaseModel):
    """LocalizationNet's shape: a named size, any dimension overridden."""
    model_config = ConfigDict(extra="forbid")

    size: str = "tiny"
    n_fft: int | None = Field(None, gt=1)
    hop: int | None = Field(None, gt=0)
    conv_channels: int | None = Field(None, gt=0)
    width: int | None = Field(None, gt=0)
    heads: int | None = Field(None, gt=0)
    layers: int | None = Field(None, ge=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # 3: silent receivers (online, not hearing) inform the estimate; 2: they count as absent, as in
    # models trained before receiver states existed (heimdall.data.states).
    receiver_states: Literal[2, 3] = 3
    # Three-state models: the head also reads the sum over silent receivers. False: the three-state
    # models trained before it (their checkpoints restore that way).
    silent_sum: bool = True

    def resolved(self) -> dict:
        if self.size not in SIZES:
            raise ValueError(f"model.size {self.size!r} is not one of {sorted(SIZES)}")
        dims = dict(SIZES[self.size])
        for key in dims:
            if getattr(self, key) is not None:
                dims[key] = getattr(self, key)
        if dims["width"] % dims["heads"]:
            raise ValueError(f"model.width {dims['width']} must be divisible by model.heads {dims['heads']}")
        return {**dims, "dropout": self.dropout, "receiver_states": self.receiver_states, "silent_sum": self.silent_sum}


SIZES = {
    "tiny": dict(n_fft=32, hop=16, conv_channels=8, width=32, heads=2, layers=1),
    "small": dict(n_fft=32, hop=16, conv_channels=16, width=64, heads=2, layers=2),  # the quick start's
    "base": dict(n_fft=64, hop=32, conv_channels=32, width=128, heads=4, layers=3),
}


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(Strict):
    uri: str = "data/quick"  # dataset folder or s3:// URI
    batch_size: int = Field(64, gt=0)
    eval_batch_size: int = Field(256, gt=0)
    loader_workers: int = Field(0, ge=0)
    prefetch_batches: int = Field(2, ge=0)  # built ahead on a thread and copied to the GPU early; 0: on demand
    normalization_samples: int = Field(2048, gt=0)


class OptimConfig(Strict):
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(50, ge=0)
    min_lr_ratio: float = Field(0.05, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    grad_clip: float = Field(1.0, gt=0)


NOT_OFFERED = {  # schedulers Ray Tune has that cannot work over Ray Train runs here, and why
    "pbt": "PBT exploits by copying a better trial's Tune checkpoint, and Ray Train V2 trials report none, so "
           "no weights would transfer; use asha, median or fifo",
    "hyperband": "its brackets pause a trial until the bracket's other trials reach the same epoch, but a sweep "
                 "creates trials only as the cluster can run them (tune.max_concurrent_trials), so a bracket "
                 "never fills and no trial is paused (seen in a 4-trial test sweep); asha halves the same way "
                 "without waiting",
}
# What a run may monitor (early stopping, best checkpoint, sweep ranking), each with its better direction.
MONITORS = {"val_p68_m": "min", "val_p50_m": "min", "val_p95_m": "min", "val_nll": "min"}


class TrainerConfig(Strict):
    max_epochs: int = Field(20, gt=0)
    patience: int = Field(6, gt=0)  # epochs without a better `monitor` before early stopping
    monitor: Literal["val_p68_m", "val_p50_m", "val_p95_m", "val_nll"] = "val_p68_m"
    seed: int = 0
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "auto"  # auto: bf16-mixed on GPU
    threads: int | None = Field(None, gt=0)  # torch intra-op threads; None = torch default
    out_dir: str = "runs/fit"
    progress: bool = True


class FitConfig(Strict):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    trainer: TrainerConfig = TrainerConfig()


class ScaleConfig(Strict):
    """Ray Train workers. CPUs on a small machine are shared with Ray Data's read tasks."""
    num_workers: int | str = 1  # N, or MIN-MAX: an elastic run (docs/elastic.md)
    resize_interval_s: float = Field(60.0, ge=0)  # elastic: how often a healthy run looks for more workers
    use_gpu: bool | None = None  # None: one GPU per worker when the cluster has GPUs
    cpus_per_worker: float | None = Field(None, gt=0)  # None: share what is left after data_cpus
    data_cpus: float = Field(1.0, ge=0)  # kept free for Ray Data read tasks (they must not starve)
    check_resources: bool = True  # refuse what a local Ray cannot hold (a joined cluster waits for its autoscaler)

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, value: int | str) -> int | str:
        low, high = worker_range(value)
        return low if low == high else f"{low}-{high}"

    @property
    def min_workers(self) -> int:
        return worker_range(self.num_workers)[0]

    @property
    def max_workers(self) -> int:
        return worker_range(self.num_workers)[1]

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers


def worker_range(value: int | str) -> tuple[int, int]:
    """2 -> (2, 2); "1-4" -> (1, 4)."""
    text = str(value).strip()
    low, sep, high = text.partition("-")
    try:
        pair = (int(low), int(high) if sep else int(low))
    except ValueError:
        raise ValueError(f"{value!r} is neither a worker count (2) nor a range (1-4)") from None
    if not 1 <= pair[0] <= pair[1]:
        raise ValueError(f"{value!r}: need 1 <= MIN <= MAX")
    return pair


class RunConfig(Strict):
    """Where a Ray run lives. Starting the same name and storage_path with the same config continues it."""
    name: str = Field("heimdall-train", pattern=r"^[A-Za-z0-9_.-]+$")
    storage_path: str = "runs/ray"  # local folder or s3://bucket/prefix (shared by every node)
    shared_storage: bool = False  # local paths (this one, data.uri) are on a file system every node mounts
    keep_checkpoints: int = Field(2, gt=0)  # best K by trainer.monitor; the latest is always kept too
    max_failures: int = Field(2, ge=-1)  # worker-group restarts from the latest checkpoint; -1 = forever


class MLflowConfig(Strict):
    enabled: bool = True
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db (absolute)
    experiment: str = "heimdall"


class TrainConfig(FitConfig):
    """`heimdall train`: the fit configuration plus Ray scaling, run storage and MLflow."""
    ray: ScaleConfig = ScaleConfig()
    run: RunConfig = RunConfig()
    mlflow: MLflowConfig = MLflowConfig()


DEFAULT_SPACE = {
    "optim.lr": {"loguniform": [3.0e-4, 1.0e-2]},
    "optim.weight_decay": {"loguniform": [1.0e-4, 1.0e-1]},
    "optim.warmup_steps": {"randint": [0, 200]},
    "data.batch_size": {"choice": [32, 64, 128]},
    "model.width": {"choice": [32, 64]},
    "model.dropout": {"uniform": [0.0, 0.2]},
}


class SweepConfig(Strict):
    """`heimdall tune`: what to search, how to schedule trials, when to stop."""
    name: str = Field("heimdall-sweep", pattern=r"^[A-Za-z0-9_.-]+$")  # same name again resumes the sweep
    num_samples: int = Field(8, gt=0)
    metric: str = "val_p68_m"
    mode: Literal["min", "max"] = "min"
    scheduler: Literal["asha", "median", "fifo"] = "asha"
    search: Literal["random", "optuna"] = "random"
    grace_period: int = Field(1, gt=0)  # epochs a trial always gets before ASHA / median stopping
    reduction_factor: int = Field(2, gt=1)
    max_concurrent_trials: int | None = Field(None, gt=0)  # None: what the cluster holds
    time_budget_s: float | None = Field(None, gt=0)  # wall-clock budget of the whole sweep
    seed: int = 0  # search seed
    space: dict[str, dict[str, list]] = Field(default_factory=lambda: dict(DEFAULT_SPACE))

    @field_validator("scheduler", mode="before")
    @classmethod
    def _not_offered(cls, value):
        if value in NOT_OFFERED:
            raise ValueError(f"{value} is not offered: {NOT_OFFERED[value]}")
        return value

    @model_validator(mode="after")
    def _checked(self):
        if self.metric not in MONITORS:
            raise ValueError(f"tune.metric={self.metric!r} is not a metric the trials report for ranking; "
                             f"one of {', '.join(MONITORS)}")
        if self.mode != MONITORS[self.metric]:
            raise ValueError(f"tune.mode={self.mode} ranks {self.metric} the wrong way: a lower value is better "
                             f"(mode {MONITORS[self.metric]})")
        grids = [k for k, v in self.space.items() if "grid" in v]
        if self.search == "optuna" and grids:
            raise ValueError(f"tune.search=optuna cannot search a grid ({', '.join(grids)}): Optuna samples "
                             "each value; use choice, or tune.search=random")
        return self


class TuneConfig(TrainConfig):
    tune: SweepConfig = SweepConfig()


class ExportSettings(Strict):
    """`heimdall export`: checkpoint -> validated ONNX -> serving copy -> registered version."""
    source: str | None = None  # sweep_summary.json, train_summary.json, their folder, a checkpoint, runs:/<id>
    data_uri: str | None = None  # None: the dataset the checkpoint was trained on
    model_name: str = Field("heimdall-localizer", pattern=r"^[A-Za-z0-9_.-]+$")
    opset: int = Field(18, ge=17)
    parity_tolerance_m: float = Field(1.0, ge=0)  # east/north and lat/lon: ONNX vs PyTorch, strictly under
    ellipse_rtol: float = Field(1e-3, ge=0)  # semi-axes and covariance, relative
    random_batches: int = Field(8, ge=0)  # random receiver subsets / batch sizes checked beside the test split
    batch_size: int = Field(256, gt=0)
    seed: int = 0
    models_uri: str = "runs/models"  # serving copies: local folder or s3://bucket/prefix
    s3_endpoint: str | None = None  # None: $AWS_ENDPOINT_URL_S3 (MinIO), else AWS
    multipart_threshold_mb: float = Field(64, gt=0)
    multipart_chunk_mb: float = Field(16, ge=5)  # S3 refuses parts under 5 MiB (but the last)
    register_model: bool = True  # False: validate and upload only, no MLflow
    force_champion: bool = False
    out_dir: str = "runs/export"


class ExportConfig(Strict):
    export: ExportSettings = ExportSettings()
    mlflow: MLflowConfig = MLflowConfig()


class SynthSettings(Strict):
    """`heimdall pipeline`: the synthetic dataset made at data.uri when none is there."""
    samples: int = Field(12000, gt=0)
    iq_length: int = Field(512, gt=0)
    world_preset: str = "low-noise"
    seed: int = 0
    workers: int | None = Field(None, gt=0)  # None: one per CPU core


class PipelineConfig(TuneConfig):
    """`heimdall pipeline`: data (if missing) -> sweep -> export of the best trial."""
    synth: SynthSettings = SynthSettings()
    export: ExportSettings = ExportSettings()


def parse_overrides(overrides: list[str]) -> dict:
    """['optim.lr=1e-3', 'model.size=base'] -> nested dict; values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        node = tree
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {p} is not a section")
        node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
    return tree


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None, overrides: list[str] = (), schema: type[BaseModel] = FitConfig,
                base: dict | None = None):
    """Read YAML (or nothing: embedded defaults) over `base`, apply overrides, validate."""
    raw: dict = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    raw = merge(merge(base or {}, raw), parse_overrides(list(overrides)))
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(describe(e)) from None


def describe(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{key}'")
        else:
            lines.append(f"config key '{key}': {err['msg']} (got {err.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def flatten(config: BaseModel) -> dict[str, object]:
    """Nested config -> {'optim.lr': 0.002, ...} (for MLflow params and logs)."""
    out = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = value
    walk("", config.model_dump())
    return out
