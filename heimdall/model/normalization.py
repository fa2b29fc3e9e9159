"""Fit the model's coordinate frame and feature normalisation on the train split only."""
from __future__ import annotations

import numpy as np
import torch

from heimdall.training.batch import to_inputs
from heimdall.data.dataset import Dataset
from heimdall.data.states import HEARD
from heimdall.geodesy import to_local
from heimdall.model.net import LocalizationNet


@torch.no_grad()
def fit_normalization(model: LocalizationNet, dataset: Dataset, max_samples: int = 2048) -> dict[str, float]:
    """Set the frame (mean train transmitter position, spread) and spectral feature statistics."""
    positions = [c for c in dataset.iter_shards("train", columns=["tx_lat", "tx_lon"])]
    lat = np.concatenate([c["tx_lat"] for c in positions])
    lon = np.concatenate([c["tx_lon"] for c in positions])
    ref_lat, ref_lon = float(lat.mean()), float(lon.mean())
    east, north = to_local(lat, lon, ref_lat, ref_lon)
    pos_scale = float(np.sqrt((east**2 + north**2).mean() / 2))
    log_power, band_power = [], []
    seen = 0
    for cols in dataset.iter_shards("train", columns=["iq", "rx_pos", "rx_state"]):
        take = min(len(cols["iq"]), max_samples - seen)
        inputs = to_inputs({k: v[:take] for k, v in cols.items()}, ref_lat, ref_lon)
        for lo in range(0, take, 256):
            spec, band = model.features(inputs["iq"][lo:lo + 256])
            heard = inputs["rx_state"][lo:lo + 256] == HEARD
            log_power.append(spec[:, 0][heard.reshape(-1)].flatten())
            band_power.append(band[heard])
        seen += take
        if seen >= max_samples:
            break
    lp, bp = torch.cat(log_power), torch.cat(band_power)
    stats = {"ref_lat": ref_lat, "ref_lon": ref_lon, "pos_scale_m": pos_scale,
             "log_power_mean": lp.mean().item(), "log_power_std": lp.std().item(),
             "band_power_mean": bp.mean().item(), "band_power_std": bp.std().item()}
    apply_normalization(model, stats)
    return stats


def apply_normalization(model: LocalizationNet, stats: dict[str, float]) -> None:
    model.ref_lat.fill_(stats["ref_lat"])
    model.ref_lon.fill_(stats["ref_lon"])
    model.pos_scale_m.fill_(stats["pos_scale_m"])
    model.log_power_stats.copy_(torch.tensor([stats["log_power_mean"], stats["log_power_std"]]))
    model.band_power_stats.copy_(torch.tensor([stats["band_power_mean"], stats["band_power_std"]]))
