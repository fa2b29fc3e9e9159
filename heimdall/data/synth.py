"""Generate a synthetic dataset in parallel, deterministically.

The dataset is cut into fixed chunks of `shard_size` sample ids; chunk k draws from its own RNG
seeded by (seed, k), so the bytes written do not depend on how many worker processes share the work.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from heimdall import __version__, faults, storage
from heimdall.data.dataset import (SCHEMA_VERSION, SPLIT_RULE, SPLITS, Shard, begin_write, finish_write, split_of,
                              table_bytes, to_table)
from heimdall.data import states
from heimdall.data.levels import IQ_FULL_SCALE
from heimdall.data.receivers import ReceiverNetwork, load_network
from heimdall.data.world import World, WorldParams


@dataclass(frozen=True)
class SynthSpec:
    out: str
    samples: int
    seed: int = 0
    iq_length: int = 1024
    sample_rate_hz: float = 48_000.0
    shard_size: int = 2048
    receivers: str | None = None  # CSV path; None = packaged network
    world: dict | None = None  # WorldParams overrides

    def world_params(self) -> WorldParams:
        return WorldParams(**(self.world or {}))


def make_world(spec: SynthSpec, network: ReceiverNetwork | None = None) -> World:
    network = network or load_network(spec.receivers)
    return World(network, spec.world_params(), spec.seed, spec.sample_rate_hz, spec.iq_length)


def generate_chunk(world: World, seed: int, chunk: int, first_id: int, n: int) -> dict[str, np.ndarray]:
    """Columns for sample ids first_id .. first_id + n - 1."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5A3F1E, chunk]))
    links = world.capture(rng, n)
    R = len(world.network)
    rx_pos = np.broadcast_to(np.stack([world.network.lat, world.network.lon, world.network.alt], -1), (n, R, 3))
    return {
        "sample_id": np.arange(first_id, first_id + n, dtype=np.int64),
        "iq": links["iq"],
        "rx_pos": rx_pos,
        "rx_state": links["rx_state"],
        "tx_lat": links["tx_lat"],
        "tx_lon": links["tx_lon"],
        "freq_hz": links["freq_hz"],
        "tx_power_dbm": links["tx_power_dbm"],
        "rx_power_dbm": links["rx_power_dbm"].astype(np.float32),
        "snr_db": links["snr_db"].astype(np.float32),
    }


def _write_chunk(spec: SynthSpec, chunk: int, prefix: str = "") -> list[dict]:
    world = _worker_world(spec)
    first = chunk * spec.shard_size
    n = min(spec.shard_size, spec.samples - first)
    cols = generate_chunk(world, spec.seed, chunk, first, n)
    fs, root = storage.resolve(spec.out)
    splits = split_of(cols["sample_id"])
    shards = []
    for split in SPLITS:
        rows = splits == split
        if not rows.any():
            continue
        data = table_bytes(to_table({k: v[rows] for k, v in cols.items()}))
        rel = f"{prefix}{split}/{split}-{chunk:05d}.parquet"
        storage.write_bytes_atomic(fs, storage.join(root, rel), data)
        shards.append(asdict(Shard(rel, split, int(rows.sum()), len(data), hashlib.sha256(data).hexdigest())))
    return shards


_WORLD_CACHE: dict = {}


def _worker_world(spec: SynthSpec) -> World:
    key = (spec.receivers, json.dumps(spec.world, sort_keys=True), spec.seed, spec.sample_rate_hz, spec.iq_length)
    if key not in _WORLD_CACHE:
        _WORLD_CACHE.clear()
        _WORLD_CACHE[key] = make_world(spec)
    return _WORLD_CACHE[key]


def build_manifest(spec: SynthSpec, world: World, shards: list[dict]) -> dict:
    counts = {s: sum(x["rows"] for x in shards if x["split"] == s) for s in SPLITS}
    receivers = world.network.to_records()
    for r, site, gain in zip(receivers, world.sites, world.rx_gain_db):
        r.update(site=int(site), gain_db=float(gain))
    return {
        "schema_version": SCHEMA_VERSION,
        "format": "heimdall-iq-parquet",
        "created_by": f"heimdall {__version__}",
        "source": "synthetic",
        "sample_rate_hz": spec.sample_rate_hz,
        "center_frequency_hz": world.params.center_frequency_hz,
        "iq_length": spec.iq_length,
        "iq_full_scale": int(IQ_FULL_SCALE),
        "detector": states.describe(),
        "receivers": receivers,
        "colocated_receivers": [list(g) for g in world.network.colocated_groups()],
        "world": {"seed": spec.seed, **world.params.model_dump(),
                  "noise_floor_dbm": world.noise_floor_dbm,
                  "area": asdict(world.area)},
        "split_rule": SPLIT_RULE,
        "counts": {**counts, "total": spec.samples},
        "shard_size": spec.shard_size,
        "shards": sorted(shards, key=lambda s: s["path"]),
    }


def synthesize(spec: SynthSpec, workers: int = 1, overwrite: bool = False, log=print) -> dict:
    """Write the dataset described by spec; returns its manifest. Manifest last = complete."""
    if spec.samples < 1:
        raise ValueError("samples must be >= 1")
    world = make_world(spec)
    for group in world.network.colocated_groups():
        log(f"note: receivers {', '.join(group)} share one site: one terrain field, "
            "independent gain/noise/fading; counted once for the sites-heard rule")
    fs, root = storage.resolve(spec.out)
    prefix, old = begin_write(fs, root, overwrite, spec.out)  # the old dataset stays readable until the commit
    chunks = range(-(-spec.samples // spec.shard_size))
    start, shards, done = time.perf_counter(), [], 0
    if workers <= 1:
        results = (_write_chunk(spec, c, prefix) for c in chunks)
        pool = None
    else:
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
        results = pool.map(_write_chunk, [spec] * len(chunks), chunks, [prefix] * len(chunks))
    try:
        for written, chunk_shards in enumerate(results, 1):
            faults.maybe_kill("dataset_write", written)
            shards += chunk_shards
            done += sum(s["rows"] for s in chunk_shards)
            rate = done / (time.perf_counter() - start)
            log(f"  {done}/{spec.samples} samples  {rate:,.0f} samples/s  "
                f"ETA {(spec.samples - done) / rate:,.0f} s")
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    manifest = build_manifest(spec, world, shards)
    finish_write(fs, root, manifest, old)
    return manifest
