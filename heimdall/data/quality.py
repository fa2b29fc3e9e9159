"""`heimdall data info` and `heimdall data validate`: what a dataset holds, and whether it is whole.

info summarises from the manifest plus a bounded read of rows (activity per receiver, SNR measured
from the IQ). validate reads every shard and checks it against the manifest (presence, size,
sha256, rows, schema, split membership, finite positions, a receiver that hears in every row) and across
shards (duplicate sample ids, counts); it lists every problem by shard instead of stopping at one.
"""
from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np

from heimdall import storage
from heimdall.data import levels
from heimdall.data.dataset import SPLITS, Dataset, DatasetError
from heimdall.data.states import HEARD, SILENT


def info(uri: str, max_rows: int = 20_000) -> dict:
    ds = Dataset.open(uri, check_files=False)
    m, names = ds.manifest, [r["name"] for r in ds.manifest["receivers"]]
    heard_count, silent_count = np.zeros(len(names)), np.zeros(len(names))
    snr = [[] for _ in names]
    recorded_snr, per_capture, rows = [], Counter(), 0
    missing = {s.path for s in ds.shards if not storage.exists(ds.fs, ds.shard_path(s))}
    budget = {s: max(1, max_rows * ds.count(s) // max(1, sum(ds.count(x) for x in SPLITS))) for s in SPLITS}
    for split in SPLITS:
        seen = 0
        for shard in ds.split_shards(split):
            if seen >= budget[split]:
                break
            if shard.path in missing:
                continue
            cols = ds.read_shard(shard)
            heard = cols["rx_state"] == HEARD
            measured = levels.snr_db(cols["iq"])
            heard_count += heard.sum(0)
            silent_count += (cols["rx_state"] == SILENT).sum(0)
            for i in range(len(names)):
                snr[i] += measured[heard[:, i], i].tolist()
            if "snr_db" in cols:
                recorded_snr += cols["snr_db"][heard].tolist()
            per_capture.update(heard.sum(1).tolist())
            seen += len(heard)
        rows += seen
    def pct(v):
        return dict(zip(("p5", "p25", "p50", "p75", "p95"), np.percentile(v, [5, 25, 50, 75, 95]).round(1).tolist())) if v else {}
    return {
        "uri": uri, "source": m.get("source", "?"), "created_by": m.get("created_by", "?"),
        "manifest_sha256": ds.manifest_sha256, "iq_length": ds.iq_length, "sample_rate_hz": ds.sample_rate_hz,
        "center_frequency_hz": m.get("center_frequency_hz"),
        "counts": {s: ds.count(s) for s in SPLITS}, "shards": len(ds.shards),
        "bytes": sum(s.bytes for s in ds.shards), "rows_read": rows,
        "receivers": [{"name": n, "latitude": r["latitude"], "longitude": r["longitude"],
                       "heard": float(heard_count[i] / max(rows, 1)), "silent": float(silent_count[i] / max(rows, 1)),
                       "snr_db": pct(snr[i])}
                      for i, (n, r) in enumerate(zip(names, m["receivers"]))],
        "heard_receivers_per_capture": dict(sorted(per_capture.items())),
        "detector": m.get("detector"),
        "snr_db_measured": pct(sum(snr, [])), "snr_db_recorded": pct(recorded_snr),
        "baseline_calibration": "world" if "world" in m else "measured at import" if "calibration" in m else "none",
        "manifest_checks": {"missing_shards": sorted(missing),
                            "counts_match": all(m.get("counts", {}).get(s, ds.count(s)) == ds.count(s) for s in SPLITS)},
    }


def format_info(d: dict) -> str:
    c = d["counts"]
    lines = [f"dataset {d['uri']}  ({d['source']}, {d['created_by']}, manifest {d['manifest_sha256'][:12]})",
             f"  {sum(c.values()):,} captures: train {c['train']:,}, val {c['val']:,}, test {c['test']:,}  "
             f"in {d['shards']} shards, {d['bytes'] / 1e6:,.1f} MB",
             f"  IQ: {d['iq_length']} samples at {d['sample_rate_hz']:g} Hz"
             + (f", centre {d['center_frequency_hz'] / 1e6:.4f} MHz" if d["center_frequency_hz"] else ""),
             f"  physics baseline calibration: {d['baseline_calibration']}",
             "  manifest: " + ("shard files present, counts match" if not d["manifest_checks"]["missing_shards"]
                               and d["manifest_checks"]["counts_match"] else
                               f"{len(d['manifest_checks']['missing_shards'])} shard file(s) missing, counts "
                               f"{'match' if d['manifest_checks']['counts_match'] else 'differ'}: run `heimdall data validate`"),
             f"  from {d['rows_read']:,} captures read:",
             f"  {'receiver':<20}{'lat':>9}{'lon':>9}{'heard':>7}{'silent':>8}   SNR dB when heard "
             "(measured from IQ) p5 / p50 / p95"]
    for r in d["receivers"]:
        s = r["snr_db"]
        snr = f"{s['p5']:6.1f} / {s['p50']:5.1f} / {s['p95']:5.1f}" if s else "   (never heard)"
        lines.append(f"  {r['name']:<20}{r['latitude']:9.4f}{r['longitude']:9.4f}{r['heard']:7.0%}{r['silent']:8.0%}   {snr}")
    hist = ", ".join(f"{k}: {v:,}" for k, v in d["heard_receivers_per_capture"].items())
    lines.append(f"  receivers that hear, per capture: {hist}")
    if d["detector"]:
        lines.append(f"  detector: heard when the measured SNR >= {d['detector']['threshold_db']:.1f} dB "
                     "(heimdall.data.states)")
    for key, label in (("snr_db_measured", "measured from IQ"), ("snr_db_recorded", "recorded in the data")):
        if d[key]:
            lines.append(f"  SNR dB of links heard, {label}: " + ", ".join(f"{k} {v}" for k, v in d[key].items()))
    return "\n".join(lines)


def validate(uri: str, log=print) -> list[str]:
    """Every problem found, each naming its file; an empty list means the dataset is whole."""
    try:
        ds = Dataset.open(uri, check_files=False)
    except DatasetError as e:
        return [str(e)]
    problems, ids, seen_paths = [], Counter(), Counter(s.path for s in ds.shards)
    problems += [f"{uri}/{p}: listed {n} times in the manifest" for p, n in seen_paths.items() if n > 1]
    for split in SPLITS:
        declared = ds.manifest.get("counts", {}).get(split)
        if declared is not None and declared != ds.count(split):
            problems.append(f"{uri}/manifest.json: counts.{split} = {declared}, shards hold {ds.count(split)}")
    for n, shard in enumerate(ds.shards, 1):
        found = _check_shard(ds, shard, ids)
        problems += found
        log(f"  [{n}/{len(ds.shards)}] {shard.path}: " + ("ok" if not found else f"{len(found)} problem(s)"))
    dup = [i for i, c in ids.items() if c > 1]
    if dup:
        problems.append(f"{uri}: {len(dup)} sample ids appear in more than one row (e.g. {dup[:3]})")
    return problems


def _check_shard(ds: Dataset, shard, ids: Counter) -> list[str]:
    where = f"{ds.uri}/{shard.path}"
    path = ds.shard_path(shard)
    if not storage.exists(ds.fs, path):
        return [f"{where}: missing"]
    data = storage.read_bytes(ds.fs, path)
    out = []
    if len(data) != shard.bytes:
        out.append(f"{where}: {len(data):,} bytes, manifest says {shard.bytes:,}")
    if hashlib.sha256(data).hexdigest() != shard.sha256:
        out.append(f"{where}: sha256 differs from the manifest (changed or corrupt)")
    try:
        cols = ds.read_shard(shard, data=data)  # the bytes just hashed: one read per shard
    except DatasetError as e:
        return out + [str(e)]
    for name in ("sample_id", "iq", "rx_pos", "rx_state", "tx_lat", "tx_lon"):
        if name not in cols:
            out.append(f"{where}: no column {name}")
    if out:
        return out
    unheard = ~(cols["rx_state"] == HEARD).any(1)
    if unheard.any():
        out.append(f"{where}: {int(unheard.sum())} rows where no receiver hears the transmitter")
    lat, lon = cols["tx_lat"], cols["tx_lon"]
    if ((np.abs(lat) > 90) | (np.abs(lon) > 180)).any():
        out.append(f"{where}: transmitter positions outside latitude/longitude range")
    ids.update(cols["sample_id"].tolist())
    return out
