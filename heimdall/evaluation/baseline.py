"""Physics baseline: RSSI multilateration with a log-distance model and unknown transmit power.

RSSI per receiver that hears is measured from its IQ (power minus the known noise floor, through the
receiver's calibration). The fit minimises sum_i (rssi_i - P0 + 10 n log10 d_i(x, y))^2 over the
position (x, y) with P0 profiled out in closed form: a coarse grid search over the area, then
damped Gauss-Newton. Vectorised over samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from heimdall.data.levels import IQ_FULL_SCALE
from heimdall.geodesy import from_local, to_local

LN10 = np.log(10.0)


@dataclass(frozen=True)
class Calibration:
    path_loss_exponent: float
    full_scale_dbm: float
    noise_floor_dbm: float
    rx_gain_db: np.ndarray  # (R,)
    ref_lat: float
    ref_lon: float
    east: tuple[float, float]  # search box in the local frame, metres
    north: tuple[float, float]

    @classmethod
    def from_manifest(cls, manifest: dict) -> "Calibration | None":
        """Synthetic data: the world that made it. Recordings: the calibration measured at import."""
        world = manifest.get("world") or manifest.get("calibration")
        if world is None:
            return None
        area = world["area"]
        return cls(
            path_loss_exponent=world["path_loss_exponent"], full_scale_dbm=world["full_scale_dbm"],
            noise_floor_dbm=world["noise_floor_dbm"],
            rx_gain_db=np.array([r.get("gain_db", 0.0) for r in manifest["receivers"]]),
            ref_lat=area["ref_lat"], ref_lon=area["ref_lon"], east=tuple(area["east"]), north=tuple(area["north"]),
        )


def measured_rssi_dbm(iq: np.ndarray, cal: Calibration) -> np.ndarray:
    """(N, R, 2, L) int16 -> (N, R) received signal power in dBm (noise power removed)."""
    power_fs = np.square(iq.astype(np.float32)).sum(2).mean(-1) / IQ_FULL_SCALE**2
    gain = cal.rx_gain_db - cal.full_scale_dbm
    noise_fs = 10 ** ((cal.noise_floor_dbm + gain) / 10)
    signal_fs = np.maximum(power_fs - noise_fs, noise_fs * 1e-3)
    return 10 * np.log10(signal_fs) - gain


def _profiled_cost(x, y, rx_e, rx_n, rx_h, rssi, w, n_exp):
    """x, y (N, G) candidate positions -> (N, G) least-squares cost with P0 profiled out."""
    d2 = (x[..., None] - rx_e[:, None]) ** 2 + (y[..., None] - rx_n[:, None]) ** 2 + rx_h[:, None] ** 2
    a = rssi[:, None] + 5 * n_exp * np.log10(np.maximum(d2, 1e4))
    a_mean = (a * w[:, None]).sum(-1, keepdims=True) / w.sum(-1)[:, None, None]
    return (((a - a_mean) ** 2) * w[:, None]).sum(-1)


def locate(iq: np.ndarray, rx_pos: np.ndarray, heard: np.ndarray, cal: Calibration,
           grid: int = 48, iterations: int = 15, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Baseline position estimate: returns (lat, lon) in degrees, each (N,)."""
    rssi = measured_rssi_dbm(iq, cal)
    lat, lon = np.empty(len(iq)), np.empty(len(iq))
    for lo in range(0, len(iq), batch):
        sl = slice(lo, lo + batch)
        lat[sl], lon[sl] = _locate_batch(rssi[sl], rx_pos[sl], heard[sl], cal, grid, iterations)
    return lat, lon


def _locate_batch(rssi, rx_pos, heard, cal, grid, iterations, starts=4):
    n_exp = cal.path_loss_exponent
    rx_e, rx_n = to_local(rx_pos[..., 0], rx_pos[..., 1], cal.ref_lat, cal.ref_lon)
    rx_h = rx_pos[..., 2]
    w = heard.astype(np.float64)
    N = len(rssi)
    # Candidates: a grid over the area plus points 1 km around each receiver, where the cost
    # surface is too sharp for the grid to sample.
    gx, gy = np.meshgrid(np.linspace(*cal.east, grid), np.linspace(*cal.north, grid))
    ring = 1e3 * np.array([[1, 0], [-1, 0], [0, 1], [0, -1]])
    cx = np.concatenate([np.broadcast_to(gx.ravel(), (N, grid * grid)), (rx_e[:, :, None] + ring[:, 0]).reshape(N, -1)], 1)
    cy = np.concatenate([np.broadcast_to(gy.ravel(), (N, grid * grid)), (rx_n[:, :, None] + ring[:, 1]).reshape(N, -1)], 1)
    top = np.argsort(_profiled_cost(cx, cy, rx_e, rx_n, rx_h, rssi, w, n_exp), -1)[:, :starts]
    rows = np.arange(N)[:, None]
    x, y, cost = _refine(cx[rows, top].ravel(), cy[rows, top].ravel(), *(np.repeat(a, starts, 0) for a in (rx_e, rx_n, rx_h, rssi, w)),
                         n_exp, iterations)
    pick = cost.reshape(N, starts).argmin(-1)
    x, y = x.reshape(N, starts)[np.arange(N), pick], y.reshape(N, starts)[np.arange(N), pick]
    # Transmitters are known to lie in the area: a flat far-field cost must not run off to infinity.
    return from_local(np.clip(x, *cal.east), np.clip(y, *cal.north), cal.ref_lat, cal.ref_lon)


def _refine(x, y, rx_e, rx_n, rx_h, rssi, w, n_exp, iterations):
    """Levenberg-Marquardt on the profiled cost from starting points x, y (each (N,))."""
    damping = np.full(len(x), 1e-3)
    cost = _profiled_cost(x[:, None], y[:, None], rx_e, rx_n, rx_h, rssi, w, n_exp)[:, 0]
    wsum = w.sum(-1, keepdims=True)
    for _ in range(iterations):
        dx, dy = x[:, None] - rx_e, y[:, None] - rx_n
        d2 = np.maximum(dx**2 + dy**2 + rx_h**2, 1e4)
        a = rssi + 5 * n_exp * np.log10(d2)
        r = (a - (a * w).sum(-1, keepdims=True) / wsum) * w
        jx = 10 * n_exp / LN10 * dx / d2  # d a_i / d x
        jy = 10 * n_exp / LN10 * dy / d2
        jx = (jx - (jx * w).sum(-1, keepdims=True) / wsum) * w
        jy = (jy - (jy * w).sum(-1, keepdims=True) / wsum) * w
        hxx, hyy, hxy = (jx * jx).sum(-1), (jy * jy).sum(-1), (jx * jy).sum(-1)
        gx, gy = (jx * r).sum(-1), (jy * r).sum(-1)
        hxx_d, hyy_d = hxx * (1 + damping), hyy * (1 + damping)
        det = hxx_d * hyy_d - hxy**2
        safe = np.abs(det) > 1e-30
        det = np.where(safe, det, 1.0)
        nx = x + np.where(safe, -(hyy_d * gx - hxy * gy) / det, 0.0)
        ny = y + np.where(safe, -(hxx_d * gy - hxy * gx) / det, 0.0)
        new_cost = _profiled_cost(nx[:, None], ny[:, None], rx_e, rx_n, rx_h, rssi, w, n_exp)[:, 0]
        better = new_cost < cost
        x, y, cost = np.where(better, nx, x), np.where(better, ny, y), np.where(better, new_cost, cost)
        damping = np.where(better, damping * 0.3, damping * 10)
    return x, y, cost
