"""Evaluate a model on a split beside the physics baseline and the centroid predictor."""
from __future__ import annotations

import numpy as np
import torch

from heimdall.baseline import Calibration, locate
from heimdall.batch import INPUT_COLUMNS, rebatch, to_inputs
from heimdall.dataset import Dataset
from heimdall.geodesy import haversine_m
from heimdall.loss import gaussian_nll, whiten
from heimdall.metrics import errors_m, summarize
from heimdall.model import LocalizationNet


@torch.no_grad()
def predict_split(model: LocalizationNet, dataset: Dataset, split: str, batch_size: int = 256,
                  device: str = "cpu", with_baseline: bool = True) -> dict[str, np.ndarray]:
    """Every sample of a split: model mean/scale_tril (metres), truth, and the baseline's estimate."""
    model = model.eval().to(device)
    ref_lat, ref_lon = float(model.ref_lat), float(model.ref_lon)
    cal = Calibration.from_manifest(dataset.manifest) if with_baseline and "world" in dataset.manifest else None
    parts: dict[str, list] = {}
    for cols in rebatch(dataset.iter_shards(split, columns=INPUT_COLUMNS), batch_size, drop_last=False):
        x = to_inputs(cols, ref_lat, ref_lon)
        mean, tril = model(x["iq"].to(device), x["rx_pos"].to(device), x["mask"].to(device))
        mean, tril, target = mean.float().cpu(), tril.float().cpu(), x["target"]
        row = {"sample_id": cols["sample_id"], "mean": mean.numpy(), "tril": tril.numpy(),
               "tx_lat": cols["tx_lat"], "tx_lon": cols["tx_lon"], "mask": cols["mask"],
               "nll": gaussian_nll(target, mean, tril).numpy(), "whitened": whiten(target, mean, tril).numpy()}
        if cal is not None:
            row["baseline_lat"], row["baseline_lon"] = locate(cols["iq"], cols["rx_pos"], cols["mask"], cal)
        for k, v in row.items():
            parts.setdefault(k, []).append(v)
    if not parts:
        raise ValueError(f"split {split!r} of {dataset.uri} is empty")
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out["error_m"] = errors_m(out["mean"], ref_lat, ref_lon, out["tx_lat"], out["tx_lon"])
    out["centroid_error_m"] = haversine_m(ref_lat, ref_lon, out["tx_lat"], out["tx_lon"])
    if cal is not None:
        out["baseline_error_m"] = haversine_m(out["baseline_lat"], out["baseline_lon"], out["tx_lat"], out["tx_lon"])
    return out


def comparison_rows(pred: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Rows for the evaluation table: model, physics baseline (if calibrated data), centroid."""
    rows = {"model": summarize(pred["error_m"], pred["whitened"], pred["nll"])}
    if "baseline_error_m" in pred:
        rows["physics baseline"] = summarize(pred["baseline_error_m"])
    rows["centroid"] = summarize(pred["centroid_error_m"])
    return rows
