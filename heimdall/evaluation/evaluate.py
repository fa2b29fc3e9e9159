"""The one evaluation path: any predictor behind the serving contract (a PyTorch model or its ONNX
export) on a split, beside the world-aware reference (synthetic data only), the physics baseline
and the centroid (always predicting the training area's centre). Fit, train, tune, export,
evaluate and the registry gate all measure through here."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from heimdall.data.dataset import Dataset
from heimdall.evaluation.baseline import Calibration, locate
from heimdall.evaluation.metrics import Metrics, SplitReport
from heimdall.geodesy import haversine_m, to_local
from heimdall.data.states import HEARD
from heimdall.training.batch import rebatch, require_heard

# (iq, rx_pos, rx_state) -> latitude, longitude, east_north_m, ellipse_semi_axes_m, ellipse_orientation_deg
Predictor = Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, np.ndarray]]
COLUMNS = ["sample_id", "iq", "rx_pos", "rx_state", "tx_lat", "tx_lon"]


def predict(predictors: dict[str, Predictor], dataset: Dataset, split: str, batch_size: int = 256,
            with_baseline: bool = True, with_reference: bool = True) -> dict:
    """Every predictor on the same batches of a split: {"truth": columns, name: outputs, ...}. The
    truth holds the physics baseline's and the world-aware reference's estimates when known."""
    cal = Calibration.from_manifest(dataset.manifest) if with_baseline else None
    parts: dict[str, dict[str, list]] = {}
    for cols in rebatch(dataset.iter_shards(split, columns=COLUMNS), batch_size, drop_last=False):
        require_heard(cols["rx_state"], cols["sample_id"], f"{dataset.uri} ({split}): sample")
        truth = {k: cols[k] for k in ("sample_id", "tx_lat", "tx_lon", "rx_state")}
        if cal is not None:
            heard = cols["rx_state"] == HEARD
            truth["baseline_lat"], truth["baseline_lon"] = locate(cols["iq"], cols["rx_pos"], heard, cal)
        outputs = [(n, p(cols["iq"], cols["rx_pos"], cols["rx_state"])) for n, p in predictors.items()]
        for name, out in [("truth", truth)] + outputs:
            for k, v in out.items():
                parts.setdefault(name, {}).setdefault(k, []).append(v)
    if not parts:
        raise ValueError(f"split {split!r} of {dataset.uri} is empty")
    pred = {name: {k: np.concatenate(v) for k, v in cols.items()} for name, cols in parts.items()}
    if with_reference:
        add_reference(pred["truth"], dataset, split)
    return pred


def add_reference(truth: dict, dataset: Dataset, split: str) -> None:
    """The world-aware reference's estimate per capture, aligned to the truth (synthetic data only)."""
    from heimdall.evaluation.reference import reference_predictions

    ref = reference_predictions(dataset, split, non_detections=True)  # the limit of everything the data records
    if ref is None:
        return
    order = {int(s): i for i, s in enumerate(ref["sample_id"])}
    idx = np.array([order[int(s)] for s in truth["sample_id"]])
    truth["reference_lat"], truth["reference_lon"], truth["reference_nll"] = (
        ref["lat"][idx], ref["lon"][idx], ref["nll"][idx])


def model_metrics(out: dict[str, np.ndarray], truth: dict[str, np.ndarray], ref_lat: float, ref_lon: float) -> Metrics:
    """P50/P68/P95 from the predicted lat/lon, coverage and NLL from the predicted ellipse."""
    errors = haversine_m(out["latitude"], out["longitude"], truth["tx_lat"], truth["tx_lon"])
    east, north = to_local(truth["tx_lat"], truth["tx_lon"], ref_lat, ref_lon)
    d = np.stack([east, north], -1) - out["east_north_m"].astype(np.float64)
    t = np.radians(out["ellipse_orientation_deg"].astype(np.float64))
    major, minor = out["ellipse_semi_axes_m"][:, 0].astype(np.float64), out["ellipse_semi_axes_m"][:, 1].astype(np.float64)
    z = np.stack([(d[:, 0] * np.sin(t) + d[:, 1] * np.cos(t)) / major,
                  (d[:, 0] * np.cos(t) - d[:, 1] * np.sin(t)) / minor], -1)
    nll = 0.5 * np.square(z).sum(-1) + np.log(major * minor) + np.log(2 * np.pi)
    return Metrics.of(errors, z, nll)


def row_errors(pred: dict, name: str, ref_lat: float, ref_lon: float) -> dict[str, np.ndarray]:
    """Per-capture error in metres of every row: the predictor `name` as "model", then the others."""
    truth = pred["truth"]

    def err(lat, lon):
        return haversine_m(lat, lon, truth["tx_lat"], truth["tx_lon"])
    errors = {"model": err(pred[name]["latitude"], pred[name]["longitude"])}
    for row, key in (("reference", "reference"), ("physics baseline", "baseline")):
        if f"{key}_lat" in truth:
            errors[row] = err(truth[f"{key}_lat"], truth[f"{key}_lon"])
    errors["centroid"] = err(ref_lat, ref_lon)
    return errors


def split_report(pred: dict, name: str, ref_lat: float, ref_lon: float, split: str, producer: str = "torch"
                 ) -> SplitReport:
    """The table of one predictor of `predict` beside the reference, the baseline and the centroid."""
    truth = pred["truth"]
    errors = row_errors(pred, name, ref_lat, ref_lon)
    rows = {"model": model_metrics(pred[name], truth, ref_lat, ref_lon)}
    if "reference" in errors:
        rows["reference"] = Metrics.of(errors["reference"], nll=truth["reference_nll"])
    rows.update({row: Metrics.of(e) for row, e in errors.items() if row not in rows})
    extra = {}
    if "reference" in rows:
        extra["nll_over_reference"] = rows["model"].nll - rows["reference"].nll
    return SplitReport(split, len(truth["tx_lat"]), rows, producer, extra)


def subset(pred: dict, keep: np.ndarray) -> dict:
    return {name: {k: v[keep] for k, v in cols.items()} for name, cols in pred.items()}


def evaluate_splits(model, dataset: Dataset, splits: list[str], batch_size: int = 256, log=print) -> dict:
    """model: a heimdall.serving.inference.LoadedModel. Per split: the predictions, its SplitReport,
    and the same per number of receivers that hear."""
    model.check_data(dataset.iq_length, dataset.sample_rate_hz, dataset.uri)
    out = {}
    for split in splits:
        if dataset.count(split) == 0:
            log(f"{split}: empty, skipped")
            continue
        pred = predict({"model": model.predict}, dataset, split, batch_size)
        active = (pred["truth"]["rx_state"] == HEARD).sum(1)
        report = partial(split_report, name="model", ref_lat=model.ref_lat, ref_lon=model.ref_lon, split=split,
                         producer=model.producer)
        out[split] = {"pred": pred, "report": report(pred),
                      "by_receivers": {int(k): report(subset(pred, active == k)) for k in np.unique(active)}}
    if not out:
        raise ValueError(f"{dataset.uri}: splits {', '.join(splits)} are all empty")
    return out


def evaluate_checkpoint(path: str, dataset: Dataset, split: str, batch_size: int, plots_dir: Path | None = None,
                        device: str = "cpu", log=print) -> SplitReport:
    """A training checkpoint's table on a split (printed), and its plots when a folder is given."""
    from heimdall.serving.inference import open_model

    model = open_model(path, device=device)
    pred = predict({"model": model.predict}, dataset, split, batch_size)
    report = split_report(pred, "model", model.ref_lat, model.ref_lon, split, model.producer)
    log(report.table(f"{split} split ({report.count} samples), checkpoint {path}"))
    if plots_dir is not None:
        from heimdall.evaluation.report import plots_for  # matplotlib only when plotting: lean GPU images lack it

        plots_for(split, pred, model, dataset.manifest["receivers"], plots_dir)
    return report
