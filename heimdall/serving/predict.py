"""`heimdall predict`: recorded IQ in, transmitter coordinates with uncertainty ellipses out.

Input: recordings (heimdall.data.recordings: SigMF capture folders or legacy sessions; transmitter
positions optional) or a dataset. Output: CSV, JSON or GeoJSON (a point per capture and its
1-sigma ellipse as a polygon). Where the truth is known, each row also carries its error.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from heimdall.data.states import HEARD, SILENT
from heimdall.data.dataset import MANIFEST, SPLITS, Dataset
from heimdall.geodesy import ellipse_outline, haversine_m
from heimdall.data.receivers import ReceiverNetwork, load_network

FORMATS = ("csv", "json", "geojson")


def inputs_from(source: str, model, receivers_csv: str | None, batch_size: int = 256):
    """Yield (ids, timestamps, columns, receiver names) batches from recordings or a dataset."""
    from heimdall import storage

    fs, root = storage.resolve(source)
    if storage.exists(fs, storage.join(root, MANIFEST)):
        dataset = Dataset.open(source)
        model.check_data(dataset.iq_length, dataset.sample_rate_hz, source)
        names = [r["name"] for r in dataset.manifest["receivers"]]
        for split in SPLITS:
            for cols in dataset.iter_shards(split):
                ids = cols["capture"] if "capture" in cols else np.array([f"{split}/{i}" for i in cols["sample_id"]])
                stamps = cols["timestamp"] if "timestamp" in cols else np.full(len(ids), "")
                yield ids, stamps, cols, names
        return
    from heimdall.data.importer import assemble, check_captures
    from heimdall.data.recordings import scan

    network = model_network(model, receivers_csv)
    captures = scan(source, model.sample_rate_hz, network.names)
    check_captures(captures, network.names, model.iq_length, model.sample_rate_hz, need_tx=False)
    for lo in range(0, len(captures), batch_size):
        part = captures[lo:lo + batch_size]
        cols = assemble(part, network, model.iq_length)
        yield cols["capture"], cols["timestamp"], cols, list(network.names)


def model_network(model, receivers_csv: str | None) -> ReceiverNetwork:
    """The receivers a recording may name: the model's training network (positions from the CSV)."""
    network = load_network(receivers_csv)
    if not model.receivers:
        return network
    missing = [n for n in model.receivers if n not in network.names]
    if missing:
        raise ValueError(f"{model.label} was trained with receivers {', '.join(missing)} that "
                         f"{receivers_csv or 'the packaged network'} does not list: pass --receivers CSV")
    keep = [network.names.index(n) for n in model.receivers]
    return ReceiverNetwork(tuple(model.receivers), network.lat[keep], network.lon[keep], network.alt[keep])


def predict(model, source: str, receivers_csv: str | None = None, batch_size: int = 256, log=print) -> list[dict]:
    """A row per capture that some receiver hears; the others have nothing to locate and are named
    in one line through `log`."""
    rows, unheard = [], []
    for ids, stamps, cols, names in inputs_from(source, model, receivers_csv, batch_size):
        heard = (cols["rx_state"] == HEARD).any(1)
        unheard += [str(i) for i in ids[~heard]]
        ids, stamps, cols = ids[heard], stamps[heard], {k: v[heard] for k, v in cols.items()}
        if not len(ids):
            continue
        out = model.predict(cols["iq"], cols["rx_pos"], cols["rx_state"])
        for i in range(len(ids)):
            row = {"capture": str(ids[i]), "timestamp": str(stamps[i]),
                   "latitude": float(out["latitude"][i]), "longitude": float(out["longitude"][i]),
                   "east_m": float(out["east_north_m"][i, 0]), "north_m": float(out["east_north_m"][i, 1]),
                   "semi_major_m": float(out["ellipse_semi_axes_m"][i, 0]),
                   "semi_minor_m": float(out["ellipse_semi_axes_m"][i, 1]),
                   "orientation_deg": float(out["ellipse_orientation_deg"][i]),
                   "receivers": ";".join(n for n, s in zip(names, cols["rx_state"][i]) if s == HEARD),
                   "silent_receivers": ";".join(n for n, s in zip(names, cols["rx_state"][i]) if s == SILENT)}
            if "tx_lat" in cols and np.isfinite(cols["tx_lat"][i]):
                row.update(true_latitude=float(cols["tx_lat"][i]), true_longitude=float(cols["tx_lon"][i]),
                           error_m=float(haversine_m(row["latitude"], row["longitude"], cols["tx_lat"][i], cols["tx_lon"][i])))
            rows.append(row)
    if unheard:
        log(f"skipped {len(unheard)} capture(s) that no receiver hears (nothing to locate): "
            f"{', '.join(unheard[:5])}{', ...' if len(unheard) > 5 else ''}")
    return rows


def write(rows: list[dict], out: Path, fmt: str, model) -> Path:
    """Write to a temp name and rename: an output file that exists is complete."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, keys)
            w.writeheader()
            w.writerows(rows)
    elif fmt == "json":
        tmp.write_text(json.dumps({"model": model.label, "model_info": model.info, "predictions": rows}, indent=1))
    else:
        tmp.write_text(json.dumps(geojson(rows, model)))
    os.replace(tmp, out)
    return out


def geojson(rows: list[dict], model) -> dict:
    features = []
    for r in rows:
        features.append({"type": "Feature", "geometry": {"type": "Point", "coordinates": [r["longitude"], r["latitude"]]},
                         "properties": {**r, "kind": "estimate"}})
        lat, lon = ellipse_outline(r["east_m"], r["north_m"], r["semi_major_m"], r["semi_minor_m"],
                                   r["orientation_deg"], model.ref_lat, model.ref_lon)
        features.append({"type": "Feature",
                         "geometry": {"type": "Polygon", "coordinates": [np.stack([lon, lat], -1).round(7).tolist()]},
                         "properties": {"capture": r["capture"], "kind": "ellipse_1sigma"}})
    return {"type": "FeatureCollection", "features": features,
            "properties": {"model": model.label, **model.info}}
