"""Evaluate a model on a split beside the physics baseline and the centroid predictor."""
from __future__ import annotations

import numpy as np
import torch

from heimdall.evaluation.baseline import Calibration, locate
from heimdall.training.batch import INPUT_COLUMNS, rebatch, require_active, to_inputs
from heimdall.data.dataset import Dataset
from heimdall.geodesy import haversine_m
from heimdall.model.loss import gaussian_nll, whiten
from heimdall.evaluation.metrics import errors_m, summarize
from heimdall.model.net import LocalizationNet


@torch.no_grad()
def predict_split(model: LocalizationNet, dataset: Dataset, split: str, batch_size: int = 256,
                  device: str = "cpu", with_baseline: bool = True) -> dict[str, np.ndarray]:
    """Every sample of a split: model mean/scale_tril (metres), truth, and the baseline's estimate."""
    model = model.eval().to(device)
    ref_lat, ref_lon = float(model.ref_lat), float(model.ref_lon)
    cal = Calibration.from_manifest(dataset.manifest) if with_baseline else None
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


# ---- through the serving contract (ONNX or its PyTorch twin): lat/lon and ellipse out ----------
SERVING_COLUMNS = ["sample_id", "iq", "rx_pos", "mask", "tx_lat", "tx_lon"]


def predict_serving(predictors: dict, dataset: Dataset, split: str, batch_size: int = 256,
                    with_baseline: bool = True) -> dict:
    """Run every predictor (name -> callable(iq, rx_pos, mask) -> serving outputs) on the same
    batches of a split. Returns {"truth": columns, name: outputs, ...} with the baseline in truth."""
    cal = Calibration.from_manifest(dataset.manifest) if with_baseline else None
    parts: dict[str, dict[str, list]] = {}
    for cols in rebatch(dataset.iter_shards(split, columns=SERVING_COLUMNS), batch_size, drop_last=False):
        require_active(cols["mask"], cols["sample_id"], f"{dataset.uri} ({split}): sample")
        truth = {k: cols[k] for k in ("sample_id", "tx_lat", "tx_lon", "mask")}
        if cal is not None:
            truth["baseline_lat"], truth["baseline_lon"] = locate(cols["iq"], cols["rx_pos"], cols["mask"], cal)
        for name, out in [("truth", truth)] + [(n, p(cols["iq"], cols["rx_pos"], cols["mask"])) for n, p in predictors.items()]:
            for k, v in out.items():
                parts.setdefault(name, {}).setdefault(k, []).append(v)
    if not parts:
        raise ValueError(f"split {split!r} of {dataset.uri} is empty")
    return {name: {k: np.concatenate(v) for k, v in cols.items()} for name, cols in parts.items()}


def serving_summary(out: dict[str, np.ndarray], truth: dict[str, np.ndarray], ref_lat: float, ref_lon: float) -> dict:
    """P50/P68/P95 from the predicted lat/lon, coverage and NLL from the predicted ellipse."""
    from heimdall.geodesy import to_local

    errors = haversine_m(out["latitude"], out["longitude"], truth["tx_lat"], truth["tx_lon"])
    east, north = to_local(truth["tx_lat"], truth["tx_lon"], ref_lat, ref_lon)
    d = np.stack([east, north], -1) - out["east_north_m"].astype(np.float64)
    t = np.radians(out["ellipse_orientation_deg"].astype(np.float64))
    major, minor = out["ellipse_semi_axes_m"][:, 0].astype(np.float64), out["ellipse_semi_axes_m"][:, 1].astype(np.float64)
    z = np.stack([(d[:, 0] * np.sin(t) + d[:, 1] * np.cos(t)) / major,
                  (d[:, 0] * np.cos(t) - d[:, 1] * np.sin(t)) / minor], -1)
    nll = 0.5 * np.square(z).sum(-1) + np.log(major * minor) + np.log(2 * np.pi)
    return summarize(errors, z, nll)


def serving_rows(pred: dict, name: str, ref_lat: float, ref_lon: float, label: str | None = None
                 ) -> dict[str, dict[str, float]]:
    """Evaluation table rows for one predictor of predict_serving, beside baseline and centroid."""
    truth = pred["truth"]
    rows = {label or name: serving_summary(pred[name], truth, ref_lat, ref_lon)}
    if "baseline_lat" in truth:
        rows["physics baseline"] = summarize(haversine_m(truth["baseline_lat"], truth["baseline_lon"],
                                                         truth["tx_lat"], truth["tx_lon"]))
    rows["centroid"] = summarize(haversine_m(ref_lat, ref_lon, truth["tx_lat"], truth["tx_lon"]))
    return rows


# ---- any model (heimdall.serving.inference), every split, by number of active receivers -----------------
def subset(pred: dict, keep: np.ndarray) -> dict:
    return {name: {k: v[keep] for k, v in cols.items()} for name, cols in pred.items()}


def evaluate_splits(model, dataset: Dataset, splits: list[str], batch_size: int = 256, log=print) -> dict:
    """model: a heimdall.serving.inference.LoadedModel. Per split: the predictions, the table beside the
    baseline and the centroid, and the same per number of active receivers."""
    model.check_data(dataset.iq_length, dataset.sample_rate_hz, dataset.uri)
    out = {}
    for split in splits:
        if dataset.count(split) == 0:
            log(f"{split}: empty, skipped")
            continue
        pred = predict_serving({"model": model.predict}, dataset, split, batch_size)
        active = pred["truth"]["mask"].sum(1)
        by_receivers = {int(k): serving_rows(subset(pred, active == k), "model", model.ref_lat, model.ref_lon)
                        for k in np.unique(active)}
        out[split] = {"pred": pred, "rows": serving_rows(pred, "model", model.ref_lat, model.ref_lon),
                      "by_receivers": by_receivers, "count": int(len(active)),
                      "count_by_receivers": {int(k): int((active == k).sum()) for k in np.unique(active)}}
    if not out:
        raise ValueError(f"{dataset.uri}: splits {', '.join(splits)} are all empty")
    return out
