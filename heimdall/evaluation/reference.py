"""World-aware reference: the Bayes posterior over the transmitter position of a synthetic capture,
given what a model sees and everything fixed about the world that made the data.

It knows the manifest's `world`: the terrain field per site (rebuilt from the seed), the receiver
gains, the path-loss law (100 m floor, band centre frequency), the noise floor, the int16 scaling,
the statistics of shadowing and fading, the transmit-power range, the area box and the detector
that decided which receivers hear (heimdall.data.states). It sees per capture the IQ and the state
of every receiver (receiver positions are the network's).

Per receiver i, at position x and effective transmit power P (transmit power less the path-loss
change of the unknown carrier frequency against the band centre f_c; one P per capture):
    m_i = P - A_i(x) + e_i,   A_i(x) = PL(d_i, f_c) + terrain(site_i, x),   e_i = -shadow + fade_dB + noise
m_i is the signal power read from the IQ: mean |iq|^2 minus the known noise power (quantisation
included), through the receiver's gain. The density of e is a table: the exact fading law in dB
(Rician K / Rayleigh mixture) convolved with the Gaussian shadowing and a Gaussian measurement error
whose std follows from the SNR and the capture length (floored at FLOOR_DB).
- receiver that hears: log density of e. That it was detected is a function of the measurement
  alone, so it is a constant factor here.
- clipped receiver (a sample at int16 full scale): censored, log P(e >= the measured residual).
- absent receiver: ignored (absence does not depend on the transmitter).
- silent receiver: ignored, or with `non_detections` log P(level < the detector's threshold), with
  the measurement error at the threshold.
The rule "at least min_active_sites sites hear" cancels: the data imply it.
P is marginalised on a grid (prior: the uniform power range convolved with the frequency shift);
position on a hierarchical grid over the area box (uniform prior): 64 x 64 cells, the most probable
cells refined 4 x 4, twice. Per capture: the posterior mean, its covariance, the NLL of the true
position (nats per square metre, as heimdall.model.loss.gaussian_nll) and the credible level of the
truth (posterior mass denser than at the truth: uniform on [0, 1] when the posterior is calibrated).
"""
from __future__ import annotations

import os
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

from heimdall.data.dataset import Dataset
from heimdall.data.receivers import ReceiverNetwork
from heimdall.data.levels import IQ_FULL_SCALE
from heimdall.data.states import ABSENT, DETECT_SNR_DB, HEARD
from heimdall.data.world import BANDS_HZ, World, WorldParams
from heimdall.geodesy import from_local, haversine_m, to_local

VERSION = 2  # part of the cache key: bump when the estimator's output changes
FLOOR_DB = 0.1  # least measurement error: keeps a noiseless world's posterior resolvable by the grid
LEVELS = 6  # measurement-error tables at FLOOR_DB * 2**k
COARSE, SUB, KEEP = 64, 4, (128, 64)  # level-0 cells per axis, subdivision, cells refined per level
P_STEP_DB = 1.0  # largest step of the transmit-power grid (finer when the error density is narrower)
LN10_10 = np.log(10.0) / 10
VALUE_FLOOR = -1e6  # log values below this are equally impossible; keeps the tables finite


def _log_i0(z: np.ndarray) -> np.ndarray:
    small = np.log(np.i0(np.minimum(z, 50.0)))
    zz = np.maximum(z, 50.0)
    large = zz - 0.5 * np.log(2 * np.pi * zz) + np.log1p(1 / (8 * zz) + 9 / (128 * zz**2))
    return np.where(z < 50.0, small, large)


def _fade_logpdf_db(y: np.ndarray, p: WorldParams) -> np.ndarray | None:
    """Log density of the fading power gain in dB (None: no fading, a point mass at 0 dB)."""
    k = 10 ** (p.rician_k_db / 10)
    branches = {"none": [], "rician": [(1.0, k)], "rayleigh": [(1.0, 0.0)],
                "mixed": [(1 - p.rayleigh_fraction, k), (p.rayleigh_fraction, 0.0)]}[p.fading]
    if not branches:
        return None
    x = 10 ** (y / 10)
    out = np.full(y.shape, -np.inf)
    for weight, kk in branches:
        if weight > 0:  # |h|^2 of a Rician channel with unit mean power, times the dB Jacobian
            lp = (np.log(kk + 1) - kk - (kk + 1) * x + _log_i0(2 * np.sqrt(kk * (kk + 1) * x))
                  + np.log(x * LN10_10) + np.log(weight))
            out = np.logaddexp(out, lp)
    return out


def _gauss_logpdf(e: np.ndarray, sigma: float) -> np.ndarray:
    return -0.5 * (e / sigma) ** 2 - np.log(sigma * np.sqrt(2 * np.pi))


def _error_logpdf(e: np.ndarray, fade: np.ndarray | None, sigma: float) -> np.ndarray:
    """Log density of fade_dB + N(0, sigma^2) on the grid e (fade given on the same grid)."""
    if fade is None:
        return _gauss_logpdf(e, sigma)
    h = e[1] - e[0]
    band = int(np.ceil(15 * sigma / h))
    offsets = np.arange(-band, band + 1)
    kernel = _gauss_logpdf(offsets * h, sigma) + np.log(h)
    padded = np.concatenate([np.full(band, -np.inf), fade, np.full(band, -np.inf)])
    out = np.empty_like(e)
    step = max(1, 2_000_000 // len(offsets))
    for lo in range(0, len(e), step):
        j = np.arange(lo, min(lo + step, len(e)))
        terms = padded[j[:, None] + band - offsets[None, :]] + kernel  # fade(e_j - offset h)
        top = terms.max(1)
        out[j] = top + np.log(np.exp(terms - np.where(np.isfinite(top), top, 0.0)[:, None]).sum(1))
    return out


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    top = x.max(axis, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis, keepdims=True))).squeeze(axis)


class ReferenceEstimator:
    """The posterior of one synthetic world; `locate` runs it on captures held in memory."""

    def __init__(self, manifest: dict):
        w = manifest.get("world")
        if not w:
            raise ValueError("the manifest has no world: the reference needs a synthetic dataset")
        params = WorldParams(**{k: w[k] for k in WorldParams.model_fields if k in w})
        network = ReceiverNetwork.from_records(manifest["receivers"])
        self.world = world = World(network, params, int(w["seed"]), manifest["sample_rate_hz"], manifest["iq_length"])
        gains = np.array([r.get("gain_db", np.nan) for r in manifest["receivers"]])
        area = w.get("area", {})
        same_area = np.allclose([area.get("ref_lat"), area.get("ref_lon")], [world.area.ref_lat, world.area.ref_lon])
        if not (np.allclose(gains, world.rx_gain_db) and np.isclose(w["noise_floor_dbm"], world.noise_floor_dbm)
                and same_area):
            raise ValueError("the manifest's world does not rebuild to the same gains, noise floor and area: "
                             "written by another version of heimdall.data.world")
        self.params, self.gain_db = params, world.rx_gain_db
        sigma = IQ_FULL_SCALE * 10 ** ((world.noise_floor_dbm + self.gain_db - params.full_scale_dbm) / 20) / np.sqrt(2)
        self.noise_power = 2 * sigma**2 + 1 / 6  # int16 counts^2; rounding adds 1/12 per component (Sheppard)
        self.detect_db = float((manifest.get("detector") or {}).get("threshold_db", DETECT_SNR_DB))
        self.threshold_dbm = world.noise_floor_dbm + self.detect_db
        self._build_tables()
        a = world.area
        self.cell = [((a.east[1] - a.east[0]) / (COARSE * SUB**k), (a.north[1] - a.north[0]) / (COARSE * SUB**k))
                     for k in range(len(KEEP) + 1)]
        self.lattice = [self._lattice(k) for k in range(len(KEEP) + 1)]

    # ---- fixed tables: the error density, and the prior over P --------------------------------------
    def _build_tables(self) -> None:
        p = self.params
        k = 10 ** (p.rician_k_db / 10)
        # rough dB std of the fading core: sets the grid steps, not the density
        core_fade = {"none": 0.0, "rayleigh": 1 / LN10_10}.get(p.fading, np.sqrt(2 * k + 1) / (k + 1) / LN10_10)
        core = float(np.sqrt(p.shadowing_std_db**2 + core_fade**2 + FLOOR_DB**2))
        h = min(0.1, core / 8)
        # P step = a whole number of table steps: one table index per receiver serves every P bin
        stride = max(1, int(min(P_STEP_DB, core / 3) / h + 1e-9))
        self.h_p = stride * h
        # Effective power prior: uniform transmit power minus the uniform-carrier path-loss shift.
        band = BANDS_HZ[p.band]
        freq = band[0] + (np.arange(256) + 0.5) * (band[1] - band[0]) / 256
        shift = 20 * np.log10(freq / p.center_frequency_hz)
        lo, hi = p.tx_power_dbm[0] - shift.max(), p.tx_power_dbm[1] - shift.min()
        n_p = max(1, int(np.ceil((hi - lo) / self.h_p - 1e-9)))
        edges = (lo + hi) / 2 + (np.arange(n_p + 1) - n_p / 2) * self.h_p
        width = p.tx_power_dbm[1] - p.tx_power_dbm[0]
        tx = edges[:, None] + shift[None]
        cdf = np.clip((tx - p.tx_power_dbm[0]) / width, 0, 1) if width > 0 else (tx >= p.tx_power_dbm[0]) * 1.0
        cdf = cdf.mean(1)
        mass = np.diff(cdf)
        self.p0 = edges[0] + self.h_p / 2  # P of bin 0 (the lowest)
        self.log_w = np.log(np.maximum(mass, 1e-300)).astype(np.float32)
        self.log_w[mass <= 0] = VALUE_FLOOR
        # Error grid: wide enough for deep fades, plus the P span below it (index j - k stride >= 0).
        levels = FLOOR_DB * 2.0 ** np.arange(LEVELS)
        spread = 12 * np.sqrt(p.shadowing_std_db**2 + levels[-1] ** 2)
        e_lo, e_hi = (-100 - spread, 20 + spread) if p.fading != "none" else (-5 - spread, 5 + spread)
        self.e_start = e_lo - (n_p - 1) * self.h_p - h
        e = self.e_start + h * np.arange(int(np.ceil((e_hi + h - self.e_start) / h)) + 1)
        fade = _fade_logpdf_db(e, p)
        pdf = [_error_logpdf(e, fade, float(np.sqrt(p.shadowing_std_db**2 + s**2))) for s in levels]
        log_sf = np.logaddexp.accumulate(pdf[0][::-1])[::-1] + np.log(h)
        # a silent receiver: its level stayed under the detector's threshold, measured with the error
        # a signal at the threshold has
        s = 10 ** (self.detect_db / 10)
        at_threshold = np.sqrt((2 * s + 1) / self.world.iq_length) / s / LN10_10
        level = int(np.clip(np.rint(np.log2(np.hypot(at_threshold, FLOOR_DB) / FLOOR_DB)), 0, LEVELS - 1))
        log_q = np.logaddexp.accumulate(pdf[level]) + np.log(h)
        tables = np.stack(pdf + [np.minimum(log_sf, 0.0), np.minimum(log_q, 0.0), np.zeros_like(e)])
        self.SF, self.Q, self.ZERO = LEVELS, LEVELS + 1, LEVELS + 2
        tables = np.maximum(np.nan_to_num(tables, nan=VALUE_FLOOR, neginf=VALUE_FLOOR), VALUE_FLOOR)
        slope = np.diff(tables, axis=1, append=tables[:, -1:])
        # rows[t * n_e + j, :, k]: (value, slope) of table t at index j - k * stride, for every P bin k.
        self.n_e, self.h_e, self.n_p = len(e), h, n_p
        idx = np.maximum(np.arange(len(e))[:, None] - stride * np.arange(n_p)[None], 0)
        self.rows = np.ascontiguousarray(np.stack([tables[:, idx], slope[:, idx]], 2).reshape(-1, 2, n_p),
                                         np.float32)
        self.j_range = ((n_p - 1) * stride, len(e) - 2)

    # ---- the position grid ----------------------------------------------------------------------------
    def _centres(self, level: int) -> tuple[np.ndarray, np.ndarray]:
        a, (de, dn) = self.world.area, self.cell[level]
        n = COARSE * SUB**level
        return a.east[0] + (np.arange(n) + 0.5) * de, a.north[0] + (np.arange(n) + 0.5) * dn

    def _lattice(self, level: int) -> np.ndarray:
        """A_i at every cell centre of a level: (n*n, R) float32, row iy * n + ix."""
        world, (ce, cn) = self.world, self._centres(level)
        terrain, sites = world.terrain, world.network.num_sites
        scale = terrain.std_db * np.sqrt(2.0 / terrain.NUM_FEATURES)
        field = np.empty((len(cn), len(ce), sites))
        for s in range(sites):  # separable Fourier features: one complex matmul per site
            ee = np.exp(1j * ce[:, None] * terrain.freqs[s, None, :, 0])
            en = np.exp(1j * (cn[:, None] * terrain.freqs[s, None, :, 1] + terrain.phases[s]))
            field[:, :, s] = scale * (en @ ee.T).real
        field = field.reshape(-1, sites)
        east, north = (g.ravel() for g in np.meshgrid(ce, cn))
        out = np.empty((len(east), len(world.network)), dtype=np.float32)
        for lo in range(0, len(east), 2**16):
            sl = slice(lo, lo + 2**16)
            out[sl] = self._path_terrain(east[sl], north[sl], field[sl][:, world.sites])
        return out

    def _path_terrain(self, east: np.ndarray, north: np.ndarray, terrain: np.ndarray) -> np.ndarray:
        """Path loss at the band centre plus terrain, (N, R) dB, computed as World.draw_links does."""
        net = self.world.network
        lat, lon = from_local(east, north, self.world.area.ref_lat, self.world.area.ref_lon)
        dist = np.hypot(haversine_m(lat[:, None], lon[:, None], net.lat[None], net.lon[None]), net.alt[None])
        return self.world.path_loss_db(dist, self.params.center_frequency_hz) + terrain

    # ---- likelihood -------------------------------------------------------------------------------------
    def observe(self, iq: np.ndarray, rx_state: np.ndarray, non_detections: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """IQ (N, R, 2, L) and states -> per receiver the level b (dBm) and which table scores it."""
        heard = rx_state == HEARD
        counts = iq.astype(np.float64)
        power = np.square(counts).sum(2).mean(-1)
        signal = np.maximum(power - self.noise_power, 1e-3 * self.noise_power)
        meas = 10 * np.log10(signal / IQ_FULL_SCALE**2) - self.gain_db + self.params.full_scale_dbm
        # var(mean |iq|^2) = (2 S N0 + N0^2) / L for a constant-envelope signal S in complex noise N0
        std_db = np.sqrt((2 * signal * self.noise_power + self.noise_power**2) / iq.shape[-1]) / signal / LN10_10
        level = np.clip(np.rint(np.log2(np.hypot(std_db, FLOOR_DB) / FLOOR_DB)), 0, LEVELS - 1).astype(np.int64)
        clipped = np.abs(counts).max((2, 3)) >= IQ_FULL_SCALE
        table = np.where(clipped, self.SF, level)
        table = np.where(heard, table, self.Q if non_detections else self.ZERO)
        table = np.where(rx_state == ABSENT, self.ZERO, table)
        return np.where(heard, meas, self.threshold_dbm).astype(np.float32), table

    def _loglik(self, a: np.ndarray, table: np.ndarray) -> np.ndarray:
        """a = b + A (n, G, R), table (n, R) -> (n, G) log likelihood with P marginalised."""
        u = np.clip((a - np.float32(self.p0 + self.e_start)) * np.float32(1 / self.h_e), *self.j_range)
        j = u.astype(np.int32)
        frac = (u - j)[..., None]
        w = self.rows[table[:, None, :] * self.n_e + j]  # (n, G, R, 2, n_p)
        s = (w[..., 0, :] + frac * w[..., 1, :]).sum(2) + self.log_w
        return _logsumexp(s, -1)

    def locate(self, iq: np.ndarray, rx_state: np.ndarray, tx_lat: np.ndarray | None = None,
               tx_lon: np.ndarray | None = None, non_detections: bool = False) -> dict[str, np.ndarray]:
        """Posterior per capture: lat, lon (mean), cov (2, 2) m^2 east/north, entropy (nats per m^2:
        the expected NLL when calibrated); with the truth also nll (nats per m^2) and credible
        (posterior mass denser than at the truth)."""
        N, R = rx_state.shape
        out = {"lat": np.empty(N), "lon": np.empty(N), "cov": np.empty((N, 2, 2)), "entropy": np.empty(N)}
        truth = tx_lat is not None
        if truth:
            out["nll"], out["credible"] = np.empty(N), np.empty(N)
        chunk = max(1, 3_000_000 // (COARSE * COARSE * R * 2 * self.n_p))
        for lo in range(0, N, chunk):
            sl = slice(lo, min(lo + chunk, N))
            b, table = self.observe(iq[sl], rx_state[sl], non_detections)
            leaf_ll, width_e, width_n, leaf_e, leaf_n = self._posterior(b, table)
            log_mass = leaf_ll + np.log(width_e * width_n)
            log_z = _logsumexp(log_mass, -1)
            wgt = np.exp(log_mass - log_z[:, None])
            me, mn = (wgt * leaf_e).sum(1), (wgt * leaf_n).sum(1)
            de, dn = leaf_e - me[:, None], leaf_n - mn[:, None]
            # + the spread within each cell (uniform): keeps the covariance positive on a peak within one cell
            cov_en = (wgt * de * dn).sum(1)
            out["cov"][sl] = np.stack([(wgt * (de**2 + width_e**2 / 12)).sum(1), cov_en,
                                       cov_en, (wgt * (dn**2 + width_n**2 / 12)).sum(1)], -1).reshape(-1, 2, 2)
            out["lat"][sl], out["lon"][sl] = from_local(me, mn, self.world.area.ref_lat, self.world.area.ref_lon)
            if truth:
                te, tn = to_local(tx_lat[sl], tx_lon[sl], self.world.area.ref_lat, self.world.area.ref_lon)
                at = self._path_terrain(te, tn, self.world.terrain(te, tn)[:, self.world.sites]).astype(np.float32)
                ll_true = self._loglik(b[:, None, :] + at[:, None, :], table)[:, 0].astype(np.float64)
                out["nll"][sl] = log_z - ll_true
                out["credible"][sl] = (wgt * (leaf_ll > ll_true[:, None])).sum(1)
            out["entropy"][sl] = (wgt * np.where(wgt > 0, log_z[:, None] - leaf_ll, 0.0)).sum(1)
        return out

    def _posterior(self, b: np.ndarray, table: np.ndarray):
        """Leaf cells of the refined grid: log likelihood, width east, width north, centre east, centre
        north (each (n, C))."""
        n = len(b)
        ll = self._loglik(b[:, None, :] + self.lattice[0][None], table)
        idx = np.broadcast_to(np.arange(COARSE * COARSE), ll.shape)
        leaves = []
        for level, keep in enumerate(KEEP):
            size = COARSE * SUB**level
            top = np.argpartition(-ll, keep - 1, axis=1)[:, :keep]
            parent = np.take_along_axis(idx, top, 1)
            rest = ll.copy()
            np.put_along_axis(rest, top, -np.inf, 1)
            leaves.append((rest, level, idx))
            iy, ix = np.divmod(parent, size)
            sub = np.arange(SUB)
            child_y = (iy[:, :, None, None] * SUB + sub[None, None, :, None])
            child_x = (ix[:, :, None, None] * SUB + sub[None, None, None, :])
            idx = (child_y * size * SUB + child_x).reshape(n, -1)
            ll = self._loglik(b[:, None, :] + self.lattice[level + 1][idx], table)
        leaves.append((ll, len(KEEP), idx))
        parts = []
        for ll, level, idx in leaves:
            size = COARSE * SUB**level
            ce, cn = self._centres(level)
            iy, ix = np.divmod(idx, size)
            de, dn = self.cell[level]
            parts.append((ll.astype(np.float64), np.full(ll.shape, de), np.full(ll.shape, dn), ce[ix], cn[iy]))
        return tuple(np.concatenate([p[i] for p in parts], 1) for i in range(5))


def reference_predictions(dataset: Dataset, split: str, *, non_detections: bool = False,
                          cache: bool = True) -> dict[str, np.ndarray] | None:
    """The reference per capture of a split, in iter_shards order: sample_id, lat, lon (posterior
    mean), cov (N, 2, 2) east/north m^2, nll (nats per m^2 at the true position), credible, entropy.
    None when the dataset has no `world` (recordings). Cached per (manifest, split, options) under
    $HEIMDALL_CACHE (default ~/.cache/heimdall)/reference/."""
    if not dataset.manifest.get("world"):
        return None
    mode = "silent" if non_detections else "heard"
    path = Path(os.environ.get("HEIMDALL_CACHE") or Path.home() / ".cache" / "heimdall") / "reference" / (
        f"{dataset.manifest_sha256}-{split}-{mode}-v{VERSION}.npz")
    if cache and path.exists():
        ids = [c["sample_id"] for c in dataset.iter_shards(split, columns=["sample_id"])]
        hit = _load(path)
        if hit is not None and np.array_equal(hit["sample_id"], np.concatenate(ids) if ids else np.empty(0, np.int64)):
            return hit
    est = ReferenceEstimator(dataset.manifest)
    network = np.stack([est.world.network.lat, est.world.network.lon, est.world.network.alt], -1)
    R, L = dataset.num_receivers, dataset.iq_length
    parts = [{"sample_id": np.empty(0, np.int64),
              **est.locate(np.zeros((0, R, 2, L), np.int16), np.zeros((0, R), np.int8), np.empty(0), np.empty(0))}]
    for cols in dataset.iter_shards(split, columns=["sample_id", "iq", "rx_pos", "rx_state", "tx_lat", "tx_lon"]):
        if np.abs(cols["rx_pos"] - network).max(initial=0.0) > 1e-6:
            raise ValueError(f"{dataset.uri} ({split}): rx_pos differs from the manifest's receivers")
        parts.append({"sample_id": cols["sample_id"].astype(np.int64),
                      **est.locate(cols["iq"], cols["rx_state"], cols["tx_lat"], cols["tx_lon"], non_detections)})
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if cache:
        _save(path, out)
    return out


def _load(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None  # unreadable: computed again and replaced


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Temp file + rename: a cache file that exists is complete."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        warnings.warn(f"reference cache not written ({e})")
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if not isinstance(e, OSError):
            raise
        warnings.warn(f"reference cache not written ({e})")
