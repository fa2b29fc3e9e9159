"""Recorded captures on disk: the layout `heimdall data import` and `heimdall predict` read.

A capture is one transmission heard by several receivers at once. Two layouts:

SigMF (https://sigmf.org), one folder per capture, one recording per receiver:
    SRC/<capture>/<receiver>.sigmf-data   IQ, interleaved I/Q, little-endian int16 (ci16_le) or
                                          float32 (cf32_le, full scale 1.0)
    SRC/<capture>/<receiver>.sigmf-meta   JSON sidecar:
      {"global": {"core:datatype": "ci16_le", "core:sample_rate": 48000, "core:version": "1.0.0",
                  "core:geolocation": {"type": "Point", "coordinates": [lon, lat, alt_m]},
                  "heimdall:receiver": "<receiver name>",
                  "heimdall:transmitter": {"latitude": .., "longitude": ..}},   (absent: unknown)
       "captures": [{"core:sample_start": 0, "core:frequency": 145.5e6,
                     "core:datetime": "2026-05-01T10:00:00Z"}],
       "annotations": []}

Legacy (the earlier Heimdall service), one set of files per session:
    SRC/<session>_iq.npy        (R, L) complex, or (R, 2, L) int16/float: one row per receiver
    SRC/<session>_label.npy     [lat, lon] of the transmitter
    SRC/<session>_metadata.json optional: {"sample_rate_hz", "center_frequency_hz", "receivers": [names
                                in row order], "timestamp"}; without it rows follow the network order
An all-zero IQ row means that receiver did not record (absent). A receiver that recorded is online;
whether it hears the transmitter is decided from its IQ at import (heimdall.data.states).
Float IQ has full scale 1.0.

Scanning reads sidecars and file sizes only; `load` reads the IQ. Errors name the file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from heimdall.data.levels import IQ_FULL_SCALE

META, DATA = ".sigmf-meta", ".sigmf-data"
DATATYPES = {"ci16_le": np.dtype("<i2"), "cf32_le": np.dtype("<f4")}


class RecordingError(ValueError):
    """A recording is unreadable or inconsistent; the message names the file."""


@dataclass
class Recording:
    receiver: str
    path: Path  # the IQ file
    meta_path: Path  # the file that describes it (sidecar, or the session's iq file)
    position: tuple[float, float, float] | None  # lat, lon, alt_m; None = take the network's
    sample_rate_hz: float | None
    length: int
    row: int | None = None  # legacy: row of the session array
    datatype: str = "ci16_le"  # SigMF: ci16_le or cf32_le


@dataclass
class Capture:
    id: str
    recordings: list[Recording]
    tx: tuple[float, float] | None  # transmitter lat, lon; None = unknown (prediction)
    frequency_hz: float | None = None
    timestamp: str = ""
    layout: str = "sigmf"
    where: str = ""  # what to name in errors
    extra: dict = field(default_factory=dict)


def scan(src: str | Path, sample_rate_hz: float | None = None, receivers: tuple[str, ...] = ()) -> list[Capture]:
    """Every capture under src (a folder of either layout, one capture folder, or one legacy file).
    sample_rate_hz / receivers: what legacy sessions without metadata assume."""
    src = Path(src).expanduser()
    if not src.exists():
        raise RecordingError(f"{src}: no such file or folder")
    if src.is_file():
        if src.name.endswith("_iq.npy"):
            return [_legacy(src, sample_rate_hz, receivers, src.parent)]
        if src.name.endswith(META):
            return [_sigmf_capture(src.parent, [src], src.parent.parent)]
        raise RecordingError(f"{src}: not a recording (expected a folder, *{META} or *_iq.npy)")
    captures = [_legacy(p, sample_rate_hz, receivers, src) for p in sorted(src.rglob("*_iq.npy"))]
    folders = sorted({p.parent for p in src.rglob(f"*{META}")})  # any folder holding sidecars is a capture
    captures += [_sigmf_capture(f, sorted(f.glob(f"*{META}")), src) for f in folders]
    if not captures:
        raise RecordingError(f"{src}: no recordings found (SigMF capture folders or *_iq.npy sessions)")
    ids = [c.id for c in captures]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise RecordingError(f"{src}: capture ids used twice: {', '.join(dup[:5])}")
    return captures


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordingError(f"{path}: unreadable JSON ({e})") from None


def _sigmf_capture(folder: Path, metas: list[Path], root: Path) -> Capture:
    recordings, txs, freqs, times = [], [], [], []
    for meta_path in metas:
        meta = _read_json(meta_path)
        g, caps = meta.get("global", {}), meta.get("captures") or [{}]
        datatype = g.get("core:datatype")
        if datatype not in DATATYPES:
            raise RecordingError(f"{meta_path}: core:datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
        name = g.get("heimdall:receiver")
        if not name:
            raise RecordingError(f"{meta_path}: no heimdall:receiver (the receiver's name)")
        data_path = meta_path.with_name(meta_path.name[: -len(META)] + DATA)
        if not data_path.exists():
            raise RecordingError(f"{meta_path}: its IQ file {data_path.name} is missing")
        size, item = data_path.stat().st_size, 2 * DATATYPES[datatype].itemsize
        if size % item:
            raise RecordingError(f"{data_path}: {size} bytes is not a whole number of {datatype} I/Q pairs")
        point = (g.get("core:geolocation") or {}).get("coordinates")
        position = None
        if point is not None:
            if len(point) < 2:
                raise RecordingError(f"{meta_path}: core:geolocation needs [lon, lat, alt]")
            position = (float(point[1]), float(point[0]), float(point[2]) if len(point) > 2 else 0.0)
        rate = g.get("core:sample_rate")
        recordings.append(Recording(name, data_path, meta_path, position, float(rate) if rate else None,
                                    size // item, datatype=datatype))
        tx = g.get("heimdall:transmitter")
        txs.append((meta_path, None if tx is None else _latlon(tx, meta_path)))
        freqs.append(caps[0].get("core:frequency"))
        times.append(caps[0].get("core:datetime", ""))
    names = [r.receiver for r in recordings]
    for r in recordings:
        if names.count(r.receiver) > 1:
            raise RecordingError(f"{r.meta_path}: receiver {r.receiver} recorded twice in capture {folder.name}")
    known = [(p, t) for p, t in txs if t is not None]
    for p, t in known[1:]:
        if np.hypot(t[0] - known[0][1][0], t[1] - known[0][1][1]) > 1e-6:
            raise RecordingError(f"{p}: transmitter {t} differs from {known[0][1]} in {known[0][0].name}")
    freq = next((float(f) for f in freqs if f), None)
    cid = folder.relative_to(root).as_posix() if folder != root else folder.name
    return Capture(cid, recordings, known[0][1] if known else None, freq, times[0], "sigmf", str(folder))


def _latlon(tx, where: Path) -> tuple[float, float]:
    try:
        lat, lon = (float(tx["latitude"]), float(tx["longitude"])) if isinstance(tx, dict) else (float(tx[0]), float(tx[1]))
    except (KeyError, TypeError, ValueError, IndexError):
        raise RecordingError(f"{where}: transmitter position must be {{latitude, longitude}} or [lat, lon]") from None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise RecordingError(f"{where}: transmitter position ({lat}, {lon}) is not a latitude/longitude")
    return lat, lon


def _legacy(iq_path: Path, sample_rate_hz: float | None, receivers: tuple[str, ...], root: Path) -> Capture:
    session = iq_path.name[: -len("_iq.npy")]
    meta_path = iq_path.with_name(f"{session}_metadata.json")
    meta = _read_json(meta_path) if meta_path.exists() else {}
    try:
        arr = np.load(iq_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise RecordingError(f"{iq_path}: unreadable .npy ({e})") from None
    if not (arr.ndim == 2 and np.iscomplexobj(arr)) and not (arr.ndim == 3 and arr.shape[1] == 2):
        raise RecordingError(f"{iq_path}: IQ of shape {arr.shape} and dtype {arr.dtype}; expected (R, L) complex "
                             "or (R, 2, L) int16/float")
    names = tuple(meta.get("receivers") or receivers)
    if len(names) != arr.shape[0]:
        raise RecordingError(f"{iq_path}: {arr.shape[0]} receiver rows but {len(names)} receiver names "
                             f"({'from ' + meta_path.name if 'receivers' in meta else 'the receiver network'})")
    rate = meta.get("sample_rate_hz", sample_rate_hz)
    if rate is None:
        raise RecordingError(f"{iq_path}: sample rate unknown: add {meta_path.name} with sample_rate_hz, or pass --sample-rate")
    label_path = iq_path.with_name(f"{session}_label.npy")
    tx = None
    if label_path.exists():
        try:
            tx = _latlon(np.load(label_path, allow_pickle=False).reshape(-1)[:2].tolist(), label_path)
        except (OSError, ValueError) as e:
            raise RecordingError(f"{label_path}: unreadable label ({e})") from None
    recordings = [Recording(n, iq_path, meta_path if meta else iq_path, None, float(rate), arr.shape[-1], row=i)
                  for i, n in enumerate(names)]
    cid = iq_path.with_name(session).relative_to(root).as_posix()
    return Capture(cid, recordings, tx, meta.get("center_frequency_hz"), str(meta.get("timestamp", "")),
                   "legacy", str(iq_path))


def load(rec: Recording, length: int) -> np.ndarray:
    """The first `length` samples of one recording as (2, length) int16; None if it is all zeros
    (a legacy row for a receiver that did not record)."""
    if rec.row is not None:
        arr = np.load(rec.path, mmap_mode="r", allow_pickle=False)[rec.row]
        arr = np.stack([arr.real, arr.imag]) if np.iscomplexobj(arr) else np.asarray(arr)
        arr = arr[:, :length]
    else:
        dtype = DATATYPES[rec.datatype]
        arr = np.fromfile(rec.path, dtype=dtype, count=2 * length).reshape(length, 2).T
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise RecordingError(f"{rec.path}: IQ has NaN or infinite values")
        peak = float(np.abs(arr).max(initial=0))
        if peak > 1.0:
            raise RecordingError(f"{rec.path}: float IQ reaches {peak:.3g}, above full scale 1.0")
        arr = np.rint(arr * IQ_FULL_SCALE)
    elif arr.dtype != np.int16:
        raise RecordingError(f"{rec.path}: IQ dtype {arr.dtype}; expected int16 or float")
    out = np.ascontiguousarray(arr, dtype=np.int16)
    return None if rec.row is not None and not out.any() else out


def write_sigmf(folder: Path, receiver: str, iq: np.ndarray, position: tuple[float, float, float],
                sample_rate_hz: float, frequency_hz: float, timestamp: str, tx: tuple[float, float] | None) -> None:
    """Write one receiver's (2, L) int16 IQ and its sidecar (used to make the example recordings)."""
    folder.mkdir(parents=True, exist_ok=True)
    np.ascontiguousarray(iq.T, dtype="<i2").tofile(folder / f"{receiver}{DATA}")
    g = {"core:datatype": "ci16_le", "core:sample_rate": sample_rate_hz, "core:version": "1.0.0",
         "core:geolocation": {"type": "Point", "coordinates": [position[1], position[0], position[2]]},
         "heimdall:receiver": receiver}
    if tx is not None:
        g["heimdall:transmitter"] = {"latitude": tx[0], "longitude": tx[1]}
    meta = {"global": g, "captures": [{"core:sample_start": 0, "core:frequency": frequency_hz, "core:datetime": timestamp}],
            "annotations": []}
    (folder / f"{receiver}{META}").write_text(json.dumps(meta, indent=1))
