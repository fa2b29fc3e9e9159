"""The receiver network as data: a CSV of name, latitude, longitude, altitude_m.

The packaged default is the original Heimdall WebSDR network in north-west Italy; pass your own CSV
with the same columns to use another. Receivers that share coordinates are one *site*: they see the
same terrain but have their own gain, noise and fading.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

DEFAULT_NETWORK = "receivers_nw_italy.csv"
COLUMNS = ("name", "latitude", "longitude", "altitude_m")


@dataclass(frozen=True)
class ReceiverNetwork:
    names: tuple[str, ...]
    lat: np.ndarray  # (R,) degrees
    lon: np.ndarray  # (R,) degrees
    alt: np.ndarray  # (R,) metres

    def __len__(self) -> int:
        return len(self.names)

    @property
    def site_index(self) -> np.ndarray:
        """(R,) index of each receiver's distinct site; co-located receivers share one."""
        keys = [(round(a, 6), round(b, 6)) for a, b in zip(self.lat, self.lon)]
        first = {}
        return np.array([first.setdefault(k, len(first)) for k in keys], dtype=np.int64)

    @property
    def num_sites(self) -> int:
        return int(self.site_index.max()) + 1

    def colocated_groups(self) -> list[tuple[str, ...]]:
        sites = self.site_index
        groups = [tuple(n for n, s in zip(self.names, sites) if s == k) for k in range(self.num_sites)]
        return [g for g in groups if len(g) > 1]

    def to_records(self) -> list[dict]:
        return [
            {"name": n, "latitude": float(a), "longitude": float(b), "altitude_m": float(h)}
            for n, a, b, h in zip(self.names, self.lat, self.lon, self.alt)
        ]

    @classmethod
    def from_records(cls, records: list[dict]) -> "ReceiverNetwork":
        return cls(
            names=tuple(r["name"] for r in records),
            lat=np.array([r["latitude"] for r in records], dtype=np.float64),
            lon=np.array([r["longitude"] for r in records], dtype=np.float64),
            alt=np.array([r["altitude_m"] for r in records], dtype=np.float64),
        )


def load_network(path: str | Path | None = None) -> ReceiverNetwork:
    """Read a receiver CSV; None means the packaged default network."""
    if path is None:
        text = resources.files("heimdall.resources").joinpath(DEFAULT_NETWORK).read_text()
        source = f"packaged {DEFAULT_NETWORK}"
    else:
        text = Path(path).read_text()
        source = str(path)
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or tuple(rows[0].keys()) != COLUMNS:
        raise ValueError(f"{source}: expected CSV columns {','.join(COLUMNS)}")
    try:
        records = [
            {"name": r["name"].strip(), "latitude": float(r["latitude"]),
             "longitude": float(r["longitude"]), "altitude_m": float(r["altitude_m"])}
            for r in rows
        ]
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    names = [r["name"] for r in records]
    if len(set(names)) != len(names):
        raise ValueError(f"{source}: receiver names must be unique")
    if len(records) < 3:
        raise ValueError(f"{source}: need at least 3 receivers, got {len(records)}")
    return ReceiverNetwork.from_records(records)
