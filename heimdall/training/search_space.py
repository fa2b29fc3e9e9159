"""Hyperparameter search spaces as data: dotted config keys -> one distribution each.

    optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
    data.batch_size: {choice: [32, 64, 128]}

Parsed and checked against the training config before any trial starts (an unknown key or a value
the config rejects names `tune.space.<key>`); `launch/tune.py` turns it into Ray Tune domains.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from heimdall.config import ConfigError, merge, parse_overrides

KINDS = {"loguniform": 2, "uniform": 2, "randint": 2, "choice": None, "grid": None}


@dataclass(frozen=True)
class Dimension:
    key: str  # dotted config key, e.g. optim.lr
    kind: str  # loguniform | uniform | randint (low inclusive, high exclusive) | choice | grid (every value)
    args: tuple

    def examples(self) -> list[Any]:
        """Values that must all be valid for the config: the ends of a range, every choice."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        low, high = self.args
        return [low, high - 1 if self.kind == "randint" else high]


def parse_space(space: dict[str, Any]) -> list[Dimension]:
    dims = []
    for key, spec in space.items():
        where = f"tune.space.{key}"
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"{where}: give one distribution, e.g. {{loguniform: [1.0e-4, 1.0e-2]}}")
        (kind, args), = spec.items()
        if kind not in KINDS:
            raise ConfigError(f"{where}: unknown distribution {kind!r} (one of {', '.join(KINDS)})")
        if not isinstance(args, list) or not args or (KINDS[kind] and len(args) != KINDS[kind]):
            raise ConfigError(f"{where}: {kind} takes {KINDS[kind] or 'a non-empty list of'} values, got {args!r}")
        if KINDS[kind] and not args[0] < args[1]:
            raise ConfigError(f"{where}: {kind} needs low < high, got {args}")
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0, got {args}")
        dims.append(Dimension(key, kind, tuple(args)))
    return dims


def apply(base: dict, params: dict[str, Any]) -> dict:
    """Base config dict + {dotted key: value} -> merged config dict."""
    return merge(base, parse_overrides([f"{k}={_yaml(v)}" for k, v in params.items()]))


def check_space(dims: list[Dimension], base: dict, schema: type[BaseModel]) -> None:
    """Every key must exist and every end of its range must validate."""
    for dim in dims:
        for value in dim.examples():
            try:
                schema.model_validate(apply(base, {dim.key: value}))
            except Exception as e:  # pydantic's message names the nested key; ours names the space entry
                raise ConfigError(f"tune.space.{dim.key}: value {value!r} is not valid for the config "
                                  f"({_first_line(e)})") from None


def _yaml(v) -> str:
    import yaml

    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def _first_line(e: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(e, ValidationError):
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        return f"unknown config key '{key}'" if err["type"] == "extra_forbidden" else f"{key}: {err['msg']}"
    return str(e).splitlines()[0]
