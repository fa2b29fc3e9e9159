"""Accuracy in metres, and the one record every command reports it in.

`Metrics` is one row: haversine error percentiles P50/P68/P95, and for a model that states its
uncertainty the 1/2-sigma ellipse coverage and the NLL. `SplitReport` is a split's rows (the model,
the world-aware reference on synthetic data, the physics baseline, the centroid) with the one table
formatter and the one naming rule (docs/metrics.md): `{split}_{metric}` for the model
(`test_p68_m`), `{split}_{row}_{metric}` for the other rows (`test_baseline_p68_m`).

Percentiles are taken over every error of the split (gather first under DDP; never average
per-rank percentiles). Ideal coverage of a 2-D Gaussian: 39.3 % inside 1 sigma, 86.5 % inside 2.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np

from heimdall.geodesy import from_local, haversine_m

IDEAL_COVERAGE = {"cov1": 1 - np.exp(-0.5), "cov2": 1 - np.exp(-2.0)}
# Row name in tables and JSON -> its part of a metric name ("" for the model itself).
ROWS = {"model": "", "reference": "reference", "physics baseline": "baseline", "centroid": "centroid"}
PRODUCERS = {"torch": "model", "onnx": "model (ONNX)"}


@dataclass(frozen=True)
class Metrics:
    p50_m: float
    p68_m: float
    p95_m: float
    cov1: float | None = None
    cov2: float | None = None
    nll: float | None = None

    @classmethod
    def of(cls, errors_m: np.ndarray, whitened: np.ndarray | None = None, nll: np.ndarray | None = None) -> "Metrics":
        """P50/P68/P95 of the errors; with the whitened errors 1/2-sigma coverage; with NLL its mean."""
        p50, p68, p95 = (float(v) for v in np.percentile(errors_m, [50, 68, 95]))
        cov1 = cov2 = None
        if whitened is not None:
            m2 = np.square(whitened).sum(-1)
            cov1, cov2 = float(np.mean(m2 <= 1.0)), float(np.mean(m2 <= 4.0))
        return cls(p50, p68, p95, cov1, cov2, None if nll is None else float(np.mean(nll)))

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "Metrics":
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})


METRICS = tuple(f.name for f in fields(Metrics))


def metric_name(split: str, metric: str, row: str = "model") -> str:
    part = ROWS[row]
    return f"{split}_{part}_{metric}" if part else f"{split}_{metric}"


@dataclass
class SplitReport:
    """One split's rows, in table order. `producer` says what computed the model row (torch|onnx)."""

    split: str
    count: int
    rows: dict[str, Metrics]
    producer: str = "torch"
    extra: dict[str, float] = field(default_factory=dict)  # e.g. model NLL minus the reference's

    def __getitem__(self, row: str) -> Metrics:
        return self.rows[row]

    def __contains__(self, row: str) -> bool:
        return row in self.rows

    @property
    def model(self) -> Metrics:
        return self.rows["model"]

    def over_reference(self, row: str = "model") -> float | None:
        """P68 of a row as a multiple of the world-aware reference's (None without a reference)."""
        ref = self.rows.get("reference")
        return self.rows[row].p68_m / ref.p68_m if ref and row in self.rows else None

    def named(self) -> dict[str, float]:
        """Every figure under its metric name: MLflow metrics, registry tags, sweep summaries."""
        out = {metric_name(self.split, k, row): v for row, m in self.rows.items() for k, v in m.as_dict().items()}
        ratio = self.over_reference()
        if ratio is not None:
            out[f"{self.split}_p68_over_reference"] = ratio
        out.update({f"{self.split}_{k}": v for k, v in self.extra.items()})
        return out

    def to_json(self) -> dict:
        return {"split": self.split, "count": self.count, "producer": self.producer,
                "rows": {row: m.as_dict() for row, m in self.rows.items()}, "extra": self.extra}

    @classmethod
    def from_json(cls, d: dict) -> "SplitReport":
        return cls(d["split"], d["count"], {row: Metrics.from_dict(m) for row, m in d["rows"].items()},
                   d.get("producer", "torch"), d.get("extra", {}))

    def cells(self) -> list[list[str]]:
        """The table as strings, header first: the one formatter behind text, Markdown and HTML."""
        ref = "reference" in self.rows
        head = ["", "P50 m", "P68 m", "P95 m", "cov 1σ", "cov 2σ", "NLL"] + (["P68 / ref"] if ref else [])
        body = []
        for row, m in self.rows.items():
            name = PRODUCERS.get(self.producer, "model") if row == "model" else row
            cells = [f"{m.p50_m:,.0f}", f"{m.p68_m:,.0f}", f"{m.p95_m:,.0f}"] + [
                "-" if v is None else fmt.format(v) for v, fmt in ((m.cov1, "{:.3f}"), (m.cov2, "{:.3f}"), (m.nll, "{:.2f}"))]
            body.append([name] + cells + ([f"{self.over_reference(row):.2f}"] if ref else []))
        body.append(["ideal coverage", "", "", "", f"{IDEAL_COVERAGE['cov1']:.3f}", f"{IDEAL_COVERAGE['cov2']:.3f}", ""]
                    + ([""] if ref else []))
        return [head] + body

    def table(self, title: str = "") -> str:
        text = text_table(self.cells())
        if "nll_over_reference" in self.extra:
            text += f"\nmodel NLL minus the reference's (its bound): {self.extra['nll_over_reference']:.2f} nats"
        return f"{title}\n{text}" if title else text


def text_table(t: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in t) for i in range(len(t[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                     for r in t)


def errors_m(pred_en: np.ndarray, ref_lat: float, ref_lon: float, tx_lat: np.ndarray, tx_lon: np.ndarray) -> np.ndarray:
    """Haversine error of predicted east/north (in the model frame) against true lat/lon."""
    lat, lon = from_local(pred_en[:, 0].astype(np.float64), pred_en[:, 1].astype(np.float64), ref_lat, ref_lon)
    return haversine_m(lat, lon, tx_lat, tx_lon)


def summarize(errors: np.ndarray, whitened: np.ndarray | None = None, nll: np.ndarray | None = None,
              split: str = "") -> dict[str, float]:
    """The model row of a split under its metric names (`val_p68_m`, ...); bare names without a split."""
    m = Metrics.of(errors, whitened, nll).as_dict()
    return {metric_name(split, k) if split else k: v for k, v in m.items()}
