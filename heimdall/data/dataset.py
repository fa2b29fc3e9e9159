"""The dataset format: Parquet shards per split plus a manifest.json written last.

Each row is one capture: sample_id, iq int16 (R, 2, L), rx_pos float64 (R, 3) [lat, lon, alt],
rx_state int8 (R,) (heimdall.data.states: 0 absent, 1 online but silent, 2 heard; the one
convention everywhere), transmitter lat/lon and a few diagnostic columns. Small tensors are Arrow fixed-shape tensor columns. IQ is stored as
fixed-width binary holding little-endian int16 in C order (R, 2, L): Parquet has no 16-bit
physical type, so an int16 tensor column would be widened to INT32 with nested-list levels (2x the
bytes, ~8x slower to write); raw bytes decode with one zero-copy np.frombuffer.
The manifest's presence means the dataset is complete.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from heimdall import storage
from heimdall.data.states import ABSENT, HEARD, SILENT

SCHEMA_VERSION = 2  # 2: rx_state (absent / silent / heard) replaced the two-state mask of 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
SPLIT_RULE = {
    "hash": "splitmix64(sample_id) % 10000",
    "buckets": {"train": [0, 8000], "val": [8000, 9000], "test": [9000, 10000]},
}
TENSOR_COLUMNS = ("rx_pos", "rx_state", "rx_power_dbm", "snr_db")


class DatasetError(ValueError):
    """A dataset is missing, incomplete or inconsistent; the message names the file."""


def splitmix64(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def split_of(sample_ids: np.ndarray) -> np.ndarray:
    """Split name per sample id, from a hash of the id (never its position)."""
    bucket = splitmix64(np.asarray(sample_ids, dtype=np.int64)) % np.uint64(10000)
    out = np.empty(bucket.shape, dtype=object)
    for name, (lo, hi) in SPLIT_RULE["buckets"].items():
        out[(bucket >= lo) & (bucket < hi)] = name
    return out


def _tensor(a: np.ndarray) -> pa.Array:
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(a))


def iq_to_arrow(iq: np.ndarray) -> pa.Array:
    iq = np.ascontiguousarray(iq, dtype="<i2")
    width = iq[0].nbytes if len(iq) else int(np.prod(iq.shape[1:])) * 2
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(iq), [None, pa.py_buffer(iq)])


def iq_from_arrow(col: pa.Array, shape: tuple[int, ...]) -> np.ndarray:
    """Fixed-width binary IQ -> (N, *shape) int16 view of the Arrow buffer (no copy)."""
    width = col.type.byte_width
    if width != 2 * int(np.prod(shape)):
        raise ValueError(f"iq rows hold {width} bytes, expected int16{list(shape)} = {2 * int(np.prod(shape))}")
    if col.null_count:
        raise ValueError("iq has null rows")
    data = np.frombuffer(col.buffers()[1], dtype="<i2", count=(col.offset + len(col)) * width // 2)
    return data[col.offset * width // 2:].reshape((len(col), *shape))


def to_table(columns: dict[str, np.ndarray]) -> pa.Table:
    def arrow(k, v):
        if k == "iq":
            return iq_to_arrow(v)
        return _tensor(v) if k in TENSOR_COLUMNS else pa.array(v)
    return pa.table({k: arrow(k, v) for k, v in columns.items()})


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    # IQ near the noise floor is incompressible; compressing costs CPU and saves little.
    pq.write_table(table, buf, compression="none", use_dictionary=False, row_group_size=256, write_statistics=False)
    return buf.getvalue()


@dataclass(frozen=True)
class Shard:
    path: str  # relative to the dataset root
    split: str
    rows: int
    bytes: int
    sha256: str


class Dataset:
    """An opened dataset: manifest checked, shard files located, rows streamed on demand."""

    def __init__(self, uri: str, manifest: dict, fs, root: str):
        self.uri, self.manifest, self.fs, self.root = uri, manifest, fs, root
        self.shards = [Shard(**s) for s in manifest["shards"]]

    @classmethod
    def open(cls, uri: str, check_files: bool = True) -> "Dataset":
        fs, root = storage.resolve(uri)
        mpath = storage.join(root, MANIFEST)
        try:
            if not storage.exists(fs, mpath):
                raise DatasetError(f"{uri}: no {MANIFEST} (not a dataset, or generation did not finish)")
            manifest = json.loads(storage.read_bytes(fs, mpath))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{uri}/{MANIFEST}: corrupt manifest ({e})") from None
        except OSError as e:
            raise DatasetError(f"dataset {uri} is unreachable: {storage.first_line(e)}") from None
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DatasetError(f"{uri}: dataset schema version {version}; this heimdall reads version {SCHEMA_VERSION} "
                               "(receiver states absent/silent/heard): regenerate it with `heimdall data synth` or "
                               "`heimdall data import`")
        ds = cls(uri, manifest, fs, root)
        if check_files:
            missing = [s.path for s in ds.shards if not storage.exists(fs, ds.shard_path(s))]
            if missing:
                raise DatasetError(f"{uri}: missing shard(s): {', '.join(missing)}")
        return ds

    @property
    def num_receivers(self) -> int:
        return len(self.manifest["receivers"])

    @property
    def iq_length(self) -> int:
        return int(self.manifest["iq_length"])

    @property
    def sample_rate_hz(self) -> float:
        return float(self.manifest["sample_rate_hz"])

    @property
    def manifest_sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()

    def describe(self) -> dict:
        """What a model trained on this dataset must be fed: recorded in checkpoints and exports."""
        m = self.manifest
        return {"uri": self.uri, "manifest_sha256": self.manifest_sha256, "iq_length": self.iq_length,
                "sample_rate_hz": self.sample_rate_hz, "center_frequency_hz": m.get("center_frequency_hz"),
                "receivers": [r["name"] for r in m["receivers"]]}

    def shard_path(self, shard: Shard) -> str:
        return storage.join(self.root, shard.path)

    def split_shards(self, split: str) -> list[Shard]:
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}: one of {SPLITS}")
        return [s for s in self.shards if s.split == split]

    def count(self, split: str) -> int:
        return sum(s.rows for s in self.split_shards(split))

    def read_shard(self, shard: Shard, columns: list[str] | None = None, data: bytes | None = None) -> dict[str, np.ndarray]:
        """One shard as numpy arrays, checked against the manifest; errors name the shard. `data`: its
        bytes when the caller already holds them (validate hashes them first)."""
        where = f"{self.uri}/{shard.path}"
        try:
            with (pa.BufferReader(data) if data is not None else self.fs.open_input_file(self.shard_path(shard))) as f:
                table = pq.read_table(f, columns=columns)
        except (pa.ArrowInvalid, OSError) as e:
            raise DatasetError(f"{where}: unreadable shard ({e})") from None
        if table.num_rows != shard.rows:
            raise DatasetError(f"{where}: {table.num_rows} rows, manifest says {shard.rows}")
        return self.decode(table, shard.split, where)

    def decode(self, table: pa.Table, split: str, where: str) -> dict[str, np.ndarray]:
        """Rows of a split (a shard, or a batch from Ray Data) -> checked numpy columns."""
        cols = {}
        for name in table.column_names:
            try:
                cols[name] = self.decode_column(name, table[name])
            except ValueError as e:
                raise DatasetError(f"{where}: column {name}: {e}") from None
        return self._check(where, split, cols)

    def decode_column(self, name: str, col: pa.ChunkedArray) -> np.ndarray:
        if name == "iq":
            col = col.combine_chunks()
            if not pa.types.is_fixed_size_binary(col.type):
                raise ValueError(f"type {col.type}, expected fixed-size binary int16 IQ")
            return iq_from_arrow(col, (self.num_receivers, 2, self.iq_length))
        return column_numpy(col)

    def _check(self, where: str, split: str, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        R, L = self.num_receivers, self.iq_length
        expect = {"iq": ((R, 2, L), np.int16), "rx_pos": ((R, 3), np.float64), "rx_state": ((R,), np.int8)}
        for name, (shape, dtype) in expect.items():
            if name in cols:
                a = cols[name]
                if a.shape[1:] != shape or a.dtype != dtype:
                    raise DatasetError(f"{where}: column {name} is {a.dtype}{list(a.shape[1:])}, "
                                       f"expected {np.dtype(dtype)}{list(shape)}")
        if "rx_state" in cols and not np.isin(cols["rx_state"], (ABSENT, SILENT, HEARD)).all():
            raise DatasetError(f"{where}: column rx_state holds values other than 0, 1, 2 (absent, silent, heard)")
        for name in ("rx_pos", "tx_lat", "tx_lon"):
            if name in cols and not np.isfinite(cols[name]).all():
                raise DatasetError(f"{where}: column {name} has NaN or infinite values")
        if "sample_id" in cols:
            wrong = split_of(cols["sample_id"]) != split
            if wrong.any():
                raise DatasetError(f"{where}: {int(wrong.sum())} sample ids belong to another split")
        return cols

    def iter_shards(self, split: str, seed: int | None = None, epoch: int = 0,
                    rank: int = 0, world_size: int = 1, columns: list[str] | None = None
                    ) -> Iterator[dict[str, np.ndarray]]:
        """Stream a split shard by shard: memory holds one shard, never the dataset.

        With a seed, shard order and rows within a shard are shuffled per (seed, epoch). Shards are
        dealt round-robin to `world_size` readers, each getting a disjoint subset.
        """
        shards = self.split_shards(split)
        rng = np.random.default_rng([seed, epoch]) if seed is not None else None
        order = rng.permutation(len(shards)) if rng is not None else np.arange(len(shards))
        for i in order[rank::world_size]:
            cols = self.read_shard(shards[i], columns)
            if rng is not None:
                perm = rng.permutation(shards[i].rows)
                cols = {k: v[perm] for k, v in cols.items()}
            yield cols


def column_numpy(col: pa.ChunkedArray) -> np.ndarray:
    """Arrow column -> numpy; fixed-shape tensors become (N, *shape) arrays."""
    col = col.combine_chunks()
    if isinstance(col.type, pa.FixedShapeTensorType):
        if col.type.value_type == pa.bool_():  # Arrow packs bools as bits: no zero-copy view
            flat = col.storage.flatten().to_numpy(zero_copy_only=False)
            return flat.reshape((len(col), *col.type.shape))
        return col.to_numpy_ndarray()
    return col.to_numpy(zero_copy_only=False)


# ---- writing a dataset: a manifest that lands last, over the old one --------------------------------
GENERATION = "gen-"  # shards of a dataset that replaced another live under gen-<token>/


def begin_write(fs, root: str, overwrite: bool, where: str) -> tuple[str, dict | None]:
    """Where a new dataset's shards go, and the manifest it will replace.

    The manifest is the commit: it lands last, in one rename or PUT. A dataset that replaces
    another writes its shards into a fresh gen-<token>/ folder, so until its manifest lands the old
    manifest and every shard it names stay readable; a write killed part-way leaves the old dataset
    as it was (its partial folder is removed by the next write)."""
    import uuid

    from pyarrow.fs import FileSelector, FileType

    path = storage.join(root, MANIFEST)
    old = json.loads(storage.read_bytes(fs, path)) if storage.exists(fs, path) else None
    if old is not None and not overwrite:
        raise FileExistsError(f"{where} already holds a dataset (use --overwrite to replace it)")
    keep = {_generation(s["path"]) for s in (old or {}).get("shards", [])}
    for info in fs.get_file_info(FileSelector(root, allow_not_found=True)):
        name = info.path.rstrip("/").rsplit("/", 1)[-1]
        if info.type == FileType.Directory and name.startswith(GENERATION) and name not in keep:
            fs.delete_dir(info.path)  # left by a replacement that never committed
    return (f"{GENERATION}{uuid.uuid4().hex[:12]}/" if old is not None else ""), old


def finish_write(fs, root: str, manifest: dict, old: dict | None) -> None:
    """Commit the new manifest, then remove the shards only the old one named."""
    missing = [s["path"] for s in manifest["shards"] if not storage.exists(fs, storage.join(root, s["path"]))]
    if missing:  # another write into the same place removed them: never commit a manifest naming nothing
        raise OSError(f"{len(missing)} shard(s) of this write vanished ({missing[0]}, ...): another write to the same "
                      "dataset ran at the same time; run it again")
    storage.write_bytes_atomic(fs, storage.join(root, MANIFEST), json.dumps(manifest, indent=1).encode())
    if old is None:
        return
    keep = {s["path"] for s in manifest["shards"]}
    for shard in old["shards"]:
        if shard["path"] not in keep and storage.exists(fs, storage.join(root, shard["path"])):
            fs.delete_file(storage.join(root, shard["path"]))
    for gen in {_generation(s["path"]) for s in old["shards"]} - {_generation(s["path"]) for s in manifest["shards"]}:
        if gen and storage.exists(fs, storage.join(root, gen)):
            fs.delete_dir(storage.join(root, gen))


def _generation(path: str) -> str:
    head = path.split("/", 1)[0]
    return head if head.startswith(GENERATION) else ""
