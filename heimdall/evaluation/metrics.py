"""Accuracy in metres: haversine error percentiles, ellipse coverage and NLL over a whole split.

Percentiles are taken over every error of the split (gather first under DDP; never average
per-rank percentiles). Ideal coverage of a 2-D Gaussian: 39.3 % inside 1 sigma, 86.5 % inside 2.
"""
from __future__ import annotations

import numpy as np

from heimdall.geodesy import from_local, haversine_m

MONITOR = "val_p68_m"  # early stopping, checkpoint ranking and the default sweep metric
IDEAL_COVERAGE = {"cov1": 1 - np.exp(-0.5), "cov2": 1 - np.exp(-2.0)}


def error_percentiles(errors_m: np.ndarray) -> dict[str, float]:
    p50, p68, p95 = np.percentile(errors_m, [50, 68, 95])
    return {"p50_m": float(p50), "p68_m": float(p68), "p95_m": float(p95)}


def errors_m(pred_en: np.ndarray, ref_lat: float, ref_lon: float, tx_lat: np.ndarray, tx_lon: np.ndarray) -> np.ndarray:
    """Haversine error of predicted east/north (in the model frame) against true lat/lon."""
    lat, lon = from_local(pred_en[:, 0].astype(np.float64), pred_en[:, 1].astype(np.float64), ref_lat, ref_lon)
    return haversine_m(lat, lon, tx_lat, tx_lon)


def summarize(errors: np.ndarray, whitened: np.ndarray | None = None, nll: np.ndarray | None = None,
              prefix: str = "") -> dict[str, float]:
    """P50/P68/P95 of errors; with the whitened errors also 1/2-sigma coverage; with NLL its mean."""
    out = error_percentiles(errors)
    if whitened is not None:
        m2 = np.square(whitened).sum(-1)
        out["cov1"] = float(np.mean(m2 <= 1.0))
        out["cov2"] = float(np.mean(m2 <= 4.0))
    if nll is not None:
        out["nll"] = float(np.mean(nll))
    return {f"{prefix}{k}": v for k, v in out.items()}


def format_table(rows: dict[str, dict[str, float]], title: str = "") -> str:
    """Rows of metrics (keys without prefix) as an aligned text table; missing values shown as -."""
    head = f"{'':<16}{'P50 m':>10}{'P68 m':>10}{'P95 m':>10}{'cov1':>8}{'cov2':>8}{'NLL':>9}"
    lines = [title, head] if title else [head]
    for name, m in rows.items():
        def cell(key, width, fmt):
            return f"{m[key]:{width}{fmt}}" if key in m else f"{'-':>{width}}"
        lines.append(f"{name:<16}{cell('p50_m', 10, ',.0f')}{cell('p68_m', 10, ',.0f')}{cell('p95_m', 10, ',.0f')}"
                     f"{cell('cov1', 8, '.3f')}{cell('cov2', 8, '.3f')}{cell('nll', 9, '.2f')}")
    lines.append(f"{'ideal coverage':<46}{IDEAL_COVERAGE['cov1']:>8.3f}{IDEAL_COVERAGE['cov2']:>8.3f}")
    return "\n".join(lines)
