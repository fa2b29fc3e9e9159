"""Dataset rows -> model inputs: the one place coordinates enter the model's local frame."""
from __future__ import annotations

import warnings
from typing import Iterator

import numpy as np
import torch

from heimdall.data.states import HEARD
from heimdall.geodesy import to_local

# Batches are read-only views of Arrow buffers (zero copy); nothing writes into them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

INPUT_COLUMNS = ["sample_id", "iq", "rx_pos", "rx_state", "tx_lat", "tx_lon"]


def check_iq(iq: np.ndarray | torch.Tensor, where: str = "input") -> None:
    """IQ must be (B, R, 2, L); float IQ must be finite. Raises ValueError naming the problem."""
    if iq.ndim != 4 or iq.shape[2] != 2:
        raise ValueError(f"{where}: IQ has shape {tuple(iq.shape)}, expected (batch, receivers, 2, samples)")
    if iq.dtype.is_floating_point if isinstance(iq, torch.Tensor) else np.issubdtype(iq.dtype, np.floating):
        bad = ~(torch.isfinite(iq) if isinstance(iq, torch.Tensor) else np.isfinite(iq))
        if bad.any():
            rows = sorted({int(i) for i in (bad.nonzero()[0] if isinstance(bad, np.ndarray) else bad.nonzero()[:, 0])})
            raise ValueError(f"{where}: IQ has NaN or infinite values in batch rows {rows[:10]}")


def to_inputs(cols: dict[str, np.ndarray], ref_lat: float, ref_lon: float) -> dict[str, torch.Tensor]:
    """Columns of a batch -> tensors: iq as given (int16 stays int16: half the bytes to the device),
    rx_pos local east/north/alt metres, rx_state, target east/north metres, true lat/lon (float64)."""
    check_iq(cols["iq"])
    lat, lon, alt = cols["rx_pos"][..., 0], cols["rx_pos"][..., 1], cols["rx_pos"][..., 2]
    rx_e, rx_n = to_local(lat, lon, ref_lat, ref_lon)
    out = {
        "iq": torch.from_numpy(np.ascontiguousarray(cols["iq"])),
        "rx_pos": torch.from_numpy(np.stack([rx_e, rx_n, alt], -1).astype(np.float32)),
        "rx_state": torch.from_numpy(np.ascontiguousarray(cols["rx_state"], dtype=np.int8)),
    }
    if "tx_lat" in cols:
        tx_e, tx_n = to_local(cols["tx_lat"], cols["tx_lon"], ref_lat, ref_lon)
        out["target"] = torch.from_numpy(np.stack([tx_e, tx_n], -1).astype(np.float32))
        out["tx_latlon"] = torch.from_numpy(np.stack([cols["tx_lat"], cols["tx_lon"]], -1).astype(np.float64))
    if "sample_id" in cols:
        out["sample_id"] = torch.from_numpy(np.asarray(cols["sample_id"], dtype=np.int64))
    return out


def rebatch(chunks: Iterator[dict[str, np.ndarray]], batch_size: int, drop_last: bool) -> Iterator[dict[str, np.ndarray]]:
    """Cut a stream of column chunks (e.g. shards) into batches of exactly batch_size rows.

    Last-batch rule: a final partial batch is kept unless drop_last (training drops it).
    """
    pending: list[dict[str, np.ndarray]] = []
    have = 0
    for chunk in chunks:
        pending.append(chunk)
        have += len(next(iter(chunk.values())))
        if have < batch_size:
            continue
        merged = {k: np.concatenate([c[k] for c in pending]) for k in pending[0]}
        full = have // batch_size * batch_size
        for lo in range(0, full, batch_size):
            yield {k: v[lo:lo + batch_size] for k, v in merged.items()}
        pending = [{k: v[full:] for k, v in merged.items()}]
        have -= full
    if have and not drop_last:
        yield {k: np.concatenate([c[k] for c in pending]) for k in pending[0]}


def require_heard(rx_state: np.ndarray, ids, where: str) -> None:
    """The serving contract wants at least one receiver that hears per row: refuse a row without, by name."""
    unheard = np.flatnonzero(~(np.asarray(rx_state) == HEARD).any(1))
    if len(unheard):
        more = f" (and {len(unheard) - 1} more)" if len(unheard) > 1 else ""
        raise ValueError(f"{where} {ids[unheard[0]]}{more}: no receiver hears the transmitter, there is nothing "
                         "to locate")
