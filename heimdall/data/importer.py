"""Recordings (heimdall.data.recordings layouts) -> the project's dataset format.

Everything that can be checked from sidecars and file sizes is checked before the first byte is
written: one sample rate, one IQ length, known receivers, transmitter positions. Shards are then
written split by split and the manifest last; if anything fails on the way (say NaN inside a float
recording) the files written so far are removed, so the output is a whole dataset or nothing.

Sample ids are a hash of the capture id, so a capture keeps its split when more recordings are
imported later. The physics baseline gets a calibration measured from the data: each receiver's
noise floor from its IQ (heimdall.data.levels) and the search area from the training transmitters.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import asdict

import numpy as np

from heimdall import __version__, faults, storage
from heimdall.data.dataset import (SCHEMA_VERSION, SPLIT_RULE, SPLITS, Shard, begin_write, finish_write, split_of,
                              table_bytes, to_table)
from heimdall.geodesy import to_local
from heimdall.data.levels import IQ_FULL_SCALE, noise_dbfs
from heimdall.data.receivers import ReceiverNetwork, load_network
from heimdall.data.states import ABSENT, HEARD, describe, receiver_states
from heimdall.data.recordings import Capture, RecordingError, load, scan


def sample_id(capture_id: str) -> int:
    return int.from_bytes(hashlib.sha256(capture_id.encode()).digest()[:8], "little") >> 1


def check_captures(captures: list[Capture], receivers: tuple[str, ...], iq_length: int | None = None,
                   sample_rate_hz: float | None = None, need_tx: bool = True) -> tuple[int, float]:
    """One sample rate, known receivers, recordings at least iq_length long (default: all equally
    long), transmitter positions where needed. Returns (iq_length, sample_rate_hz)."""
    first = captures[0].recordings[0]
    rate = sample_rate_hz or first.sample_rate_hz
    length = iq_length
    for c in captures:
        if need_tx and c.tx is None:
            raise RecordingError(f"{c.where}: no transmitter position (heimdall:transmitter / {c.id}_label.npy)")
        for r in c.recordings:
            if r.receiver not in receivers:
                raise RecordingError(f"{r.meta_path}: unknown receiver {r.receiver!r}; the network has "
                                     f"{', '.join(receivers)} (pass --receivers CSV for another network)")
            if r.sample_rate_hz is None:
                raise RecordingError(f"{r.meta_path}: no sample rate")
            if r.sample_rate_hz != rate:
                where = f"{first.meta_path}" if sample_rate_hz is None else "--sample-rate / the model"
                raise RecordingError(f"{r.meta_path}: sample rate {r.sample_rate_hz:g} Hz, but {where} has {rate:g} Hz "
                                     "(one dataset holds one sample rate: resample first)")
            if length is None:
                length = r.length
            elif iq_length is None and r.length != length:
                raise RecordingError(f"{r.path}: {r.length} IQ samples, but {first.path} has {length} "
                                     "(pass --iq-length N to use the first N samples of every recording)")
            elif r.length < length:
                raise RecordingError(f"{r.path}: {r.length} IQ samples, fewer than the {length} required")
    return int(length), float(rate)


def assemble(captures: list[Capture], network: ReceiverNetwork, length: int) -> dict[str, np.ndarray]:
    """Captures -> dataset columns: receivers in network order; a receiver with no recording (or an
    all-zero one) is absent, the others silent or heard by the one detector (heimdall.data.states)."""
    index = {n: i for i, n in enumerate(network.names)}
    n, R = len(captures), len(network)
    iq = np.zeros((n, R, 2, length), np.int16)
    rx_pos = np.broadcast_to(np.stack([network.lat, network.lon, network.alt], -1), (n, R, 3)).copy()
    online = np.zeros((n, R), bool)
    for k, c in enumerate(captures):
        for r in c.recordings:
            data = load(r, length)
            if data is None:
                continue
            i = index[r.receiver]
            iq[k, i], online[k, i] = data, True
            if r.position is not None:
                rx_pos[k, i] = r.position
        if not online[k].any():
            raise RecordingError(f"{c.where}: no receiver recorded anything (all IQ is zero)")
    tx = np.array([c.tx if c.tx is not None else (np.nan, np.nan) for c in captures], np.float64).reshape(n, 2)
    return {"sample_id": np.array([sample_id(c.id) for c in captures], np.int64), "iq": iq, "rx_pos": rx_pos,
            "rx_state": receiver_states(iq, online), "tx_lat": tx[:, 0], "tx_lon": tx[:, 1],
            "freq_hz": np.array([c.frequency_hz or np.nan for c in captures], np.float64),
            "capture": np.array([c.id for c in captures], dtype=object),
            "timestamp": np.array([c.timestamp for c in captures], dtype=object)}


def import_recordings(src: str, out: str, receivers_csv: str | None = None, iq_length: int | None = None,
                      sample_rate_hz: float | None = None, shard_size: int = 1024, overwrite: bool = False,
                      path_loss_exponent: float = 3.0, log=print) -> dict:
    network = load_network(receivers_csv)
    captures = scan(src, sample_rate_hz, network.names)
    length, rate = check_captures(captures, network.names, iq_length, sample_rate_hz)
    ids = [sample_id(c.id) for c in captures]
    if len(set(ids)) != len(ids):
        raise RecordingError(f"{src}: two capture ids hash to the same sample id; rename one")
    log(f"{len(captures)} captures ({', '.join(f'{v} {k}' for k, v in Counter(c.layout for c in captures).items())}), "
        f"{length} IQ samples at {rate:g} Hz, receivers seen: "
        f"{', '.join(sorted({r.receiver for c in captures for r in c.recordings}))}")

    fs, root = storage.resolve(out)
    prefix, old = begin_write(fs, root, overwrite, out)  # the old dataset stays readable until the commit
    splits = split_of(np.array(ids))
    written, shards, noise, unheard = [], [], {n: [] for n in network.names}, []
    try:
        for split in SPLITS:
            members = [c for c, s in zip(captures, splits) if s == split]
            for k, lo in enumerate(range(0, len(members), shard_size)):
                cols = assemble(members[lo:lo + shard_size], network, length)
                heard = (cols["rx_state"] == HEARD).any(1)  # a capture no receiver hears locates nothing
                unheard += list(cols["capture"][~heard])
                cols = {key: v[heard] for key, v in cols.items()}
                if not heard.any():
                    continue
                levels = noise_dbfs(cols["iq"])
                for i, name in enumerate(network.names):
                    noise[name] += levels[cols["rx_state"][:, i] != ABSENT, i].tolist()
                data = table_bytes(to_table(cols))
                rel = f"{prefix}{split}/{split}-{k:05d}.parquet"
                written.append(storage.join(root, rel))
                storage.write_bytes_atomic(fs, written[-1], data)
                faults.maybe_kill("dataset_write", len(written))
                shards.append(asdict(Shard(rel, split, len(cols["sample_id"]), len(data), hashlib.sha256(data).hexdigest())))
                log(f"  {split}: {sum(s['rows'] for s in shards if s['split'] == split)}/{len(members)} captures")
        if unheard:
            log(f"skipped {len(unheard)} capture(s) that no receiver hears (the detector, heimdall.data.states): "
                f"{', '.join(unheard[:5])}{', ...' if len(unheard) > 5 else ''}")
        if not shards:
            raise RecordingError(f"{src}: no capture is heard by any receiver: nothing to import")
        gone = set(unheard)
        keep = np.array([c.id not in gone for c in captures])
        captures, splits = [c for c, k in zip(captures, keep) if k], splits[keep]
        train = [c.tx for c, s in zip(captures, splits) if s == "train"] or [c.tx for c in captures]
        manifest = build_manifest(src, captures, splits, network, length, rate, shard_size, shards, noise, train,
                                  path_loss_exponent)
    except BaseException:  # nothing committed: remove what this write left
        if prefix and storage.exists(fs, storage.join(root, prefix)):
            fs.delete_dir(storage.join(root, prefix))
        for path in written:
            if storage.exists(fs, path):
                fs.delete_file(path)
        raise
    finish_write(fs, root, manifest, old)
    return manifest


def build_manifest(src, captures, splits, network, length, rate, shard_size, shards, noise, train_tx,
                   path_loss_exponent) -> dict:
    measured = {n: float(np.median(v)) for n, v in noise.items() if v}
    floor = float(np.median(list(measured.values())))
    receivers = network.to_records()
    for r in receivers:
        r["gain_db"] = measured.get(r["name"], floor) - floor  # relative gain, seen as a noise floor offset
        r["noise_floor_dbfs"] = measured.get(r["name"])
    tx = np.array(train_tx)
    ref_lat, ref_lon = float(tx[:, 0].mean()), float(tx[:, 1].mean())
    east, north = to_local(tx[:, 0], tx[:, 1], ref_lat, ref_lon)
    margin = 0.1 * max(np.ptp(east), np.ptp(north), 1e3)
    freqs = [c.frequency_hz for c in captures if c.frequency_hz]
    return {
        "schema_version": SCHEMA_VERSION,
        "format": "heimdall-iq-parquet",
        "created_by": f"heimdall {__version__}",
        "source": "recordings",
        "import": {"src": str(src), "layouts": dict(Counter(c.layout for c in captures))},
        "sample_rate_hz": rate,
        "center_frequency_hz": float(np.median(freqs)) if freqs else None,
        "iq_length": length,
        "iq_full_scale": int(IQ_FULL_SCALE),
        "detector": describe(),
        "receivers": receivers,
        "colocated_receivers": [list(g) for g in network.colocated_groups()],
        # What the physics baseline needs, measured rather than known: levels in dB re full scale.
        "calibration": {"path_loss_exponent": path_loss_exponent, "full_scale_dbm": 0.0, "noise_floor_dbm": floor,
                        "area": {"ref_lat": ref_lat, "ref_lon": ref_lon,
                                 "east": [float(east.min() - margin), float(east.max() + margin)],
                                 "north": [float(north.min() - margin), float(north.max() + margin)]}},
        "split_rule": SPLIT_RULE,
        "counts": {**{s: int((splits == s).sum()) for s in SPLITS}, "total": len(captures)},
        "shard_size": shard_size,
        "shards": sorted(shards, key=lambda s: s["path"]),
    }
