"""The synthetic RF world: where transmitters are, what each receiver hears, and its IQ.

Received power = transmit power - log-distance path loss - terrain excess loss (a FIXED smooth
field per site, derived from the world seed: the structure a model can learn beyond free space)
- per-sample log-normal shadowing + Rician/Rayleigh fading. Everything is vectorised over samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from heimdall.geodesy import from_local, haversine_m, to_local
from heimdall.data.levels import IQ_FULL_SCALE
from heimdall.data.receivers import ReceiverNetwork
from heimdall.data.states import HEARD, receiver_states

BANDS_HZ = {"2m": (144e6, 146e6), "70cm": (430e6, 440e6)}
THERMAL_NOISE_DBM_PER_HZ = -174.0


class WorldParams(BaseModel):
    """Physics of the synthetic world. Same params + seed = same world."""

    model_config = ConfigDict(extra="forbid")

    band: Literal["2m", "70cm"] = "2m"
    margin_km: float = Field(20.0, ge=0)
    path_loss_exponent: float = Field(3.0, gt=0)
    terrain_std_db: float = Field(8.0, ge=0)
    terrain_scale_km: tuple[float, float] = (10.0, 30.0)
    shadowing_std_db: float = Field(4.0, ge=0)
    fading: Literal["none", "rician", "rayleigh", "mixed"] = "mixed"
    rician_k_db: float = 6.0
    rayleigh_fraction: float = Field(0.3, ge=0, le=1)  # share of Rayleigh links when fading="mixed"
    tx_power_dbm: tuple[float, float] = (30.0, 47.0)  # 1 W .. 50 W, unknown to the model
    noise_figure_db: float = 6.0
    full_scale_dbm: float = -30.0  # receiver input power that reaches int16 full scale at 0 dB gain
    gain_std_db: float = Field(2.0, ge=0)  # fixed per-receiver calibration spread
    absent_prob: float = Field(0.1, ge=0, lt=1)  # a receiver delivers no data (state ABSENT)
    min_active_sites: int = Field(3, ge=1)  # distinct sites that hear every capture (heimdall.data.states)
    fm_deviation_hz: float = Field(2500.0, ge=0)
    freq_offset_hz: float = Field(800.0, ge=0)  # per-receiver LO error, uniform +-

    @model_validator(mode="after")
    def _ranges(self):
        if not self.terrain_scale_km[0] <= self.terrain_scale_km[1]:
            raise ValueError("terrain_scale_km must be (low, high) with low <= high")
        if not self.tx_power_dbm[0] <= self.tx_power_dbm[1]:
            raise ValueError("tx_power_dbm must be (low, high) with low <= high")
        return self

    @property
    def center_frequency_hz(self) -> float:
        lo, hi = BANDS_HZ[self.band]
        return (lo + hi) / 2

    def noise_floor_dbm(self, sample_rate_hz: float) -> float:
        return THERMAL_NOISE_DBM_PER_HZ + 10 * np.log10(sample_rate_hz) + self.noise_figure_db


@dataclass(frozen=True)
class Area:
    """Local frame (reference point) and the east/north box transmitters are drawn from."""

    ref_lat: float
    ref_lon: float
    east: tuple[float, float]
    north: tuple[float, float]

    @classmethod
    def around(cls, network: ReceiverNetwork, margin_km: float) -> "Area":
        ref_lat, ref_lon = float(network.lat.mean()), float(network.lon.mean())
        e, n = to_local(network.lat, network.lon, ref_lat, ref_lon)
        m = margin_km * 1e3
        return cls(ref_lat, ref_lon, (float(e.min() - m), float(e.max() + m)), (float(n.min() - m), float(n.max() + m)))


class TerrainField:
    """Fixed excess loss (dB) per site as a smooth random field of the transmitter position.

    Random Fourier features of a squared-exponential kernel, one length scale per site drawn from
    terrain_scale_km: a stationary Gaussian field with std terrain_std_db.
    """

    NUM_FEATURES = 128

    def __init__(self, params: WorldParams, num_sites: int, seed: int):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7E22A1]))
        lo, hi = params.terrain_scale_km
        scale_m = rng.uniform(lo, hi, size=(num_sites, 1, 1)) * 1e3
        self.freqs = rng.standard_normal((num_sites, self.NUM_FEATURES, 2)) / scale_m  # rad/m
        self.phases = rng.uniform(0, 2 * np.pi, size=(num_sites, self.NUM_FEATURES))
        self.std_db = params.terrain_std_db

    def __call__(self, east: np.ndarray, north: np.ndarray) -> np.ndarray:
        """(N,) positions -> (N, S) excess loss in dB."""
        arg = east[:, None, None] * self.freqs[None, :, :, 0] + north[:, None, None] * self.freqs[None, :, :, 1]
        field = np.cos(arg + self.phases[None]).sum(-1) * np.sqrt(2.0 / self.NUM_FEATURES)
        return self.std_db * field


class World:
    """A receiver network in a world with fixed terrain and calibration, both from the seed."""

    def __init__(self, network: ReceiverNetwork, params: WorldParams, seed: int, sample_rate_hz: float, iq_length: int):
        self.network, self.params, self.seed = network, params, seed
        self.sample_rate_hz, self.iq_length = float(sample_rate_hz), int(iq_length)
        self.area = Area.around(network, params.margin_km)
        self.sites = network.site_index
        self.terrain = TerrainField(params, network.num_sites, seed)
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0xCA11B]))
        self.rx_gain_db = rng.normal(0.0, params.gain_std_db, size=len(network))
        self.rx_east, self.rx_north = to_local(network.lat, network.lon, self.area.ref_lat, self.area.ref_lon)
        self.noise_floor_dbm = params.noise_floor_dbm(self.sample_rate_hz)

    # ---- propagation -------------------------------------------------------------------------
    def path_loss_db(self, dist_m: np.ndarray, freq_hz: np.ndarray) -> np.ndarray:
        """Log-distance path loss: the free-space loss at 1 km, exponent n from there (either side);
        distances under 100 m count as 100 m."""
        d = np.maximum(dist_m, 100.0)
        fspl_1km = 20 * np.log10(1e3) + 20 * np.log10(freq_hz) - 147.55
        return fspl_1km + 10 * self.params.path_loss_exponent * np.log10(d / 1e3)

    def fading_power_db(self, rng: np.random.Generator, shape) -> tuple[np.ndarray, np.ndarray]:
        """Power gain (dB) and carrier phase of a flat-fading link per sample and receiver."""
        p = self.params
        phase = rng.uniform(0, 2 * np.pi, size=shape)
        if p.fading == "none":
            return np.zeros(shape), phase
        k = np.full(shape, 10 ** (p.rician_k_db / 10))
        if p.fading == "rayleigh":
            k[:] = 0.0
        elif p.fading == "mixed":
            k[rng.random(shape) < p.rayleigh_fraction] = 0.0
        scatter = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / np.sqrt(2)
        h = np.sqrt(k / (k + 1)) + np.sqrt(1 / (k + 1)) * scatter
        return 10 * np.log10(np.maximum(np.abs(h) ** 2, 1e-12)), phase + np.angle(h)

    def capture(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        """n captures: transmitter, per-link levels, IQ and receiver states, each heard by at least
        min_active_sites sites. Whether a receiver hears is decided from its IQ (states.detect), as
        for recordings; captures heard by too few sites are drawn again."""
        out = self._capture_once(rng, n)
        for _ in range(100):
            bad = np.flatnonzero(self.sites_hearing(out["rx_state"]) < self.params.min_active_sites)
            if bad.size == 0:
                return out
            redo = self._capture_once(rng, bad.size)
            for key, value in redo.items():
                out[key][bad] = value
        raise RuntimeError("could not draw captures heard by enough sites: check the world parameters")

    def _capture_once(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        links = self.draw_links(rng, n)
        links["iq"] = self.render_iq(rng, links)
        links["rx_state"] = receiver_states(links["iq"], links["present"])
        return links

    def sites_hearing(self, rx_state: np.ndarray) -> np.ndarray:
        """(N, R) states -> (N,) number of distinct sites with at least one receiver that hears."""
        per_site = np.zeros((rx_state.shape[0], self.network.num_sites), dtype=bool)
        for r, s in enumerate(self.sites):
            per_site[:, s] |= rx_state[:, r] == HEARD
        return per_site.sum(1)

    def draw_links(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        """Transmitter positions and per-link power, SNR and presence for n captures."""
        p, a, R = self.params, self.area, len(self.network)
        east = rng.uniform(*a.east, size=n)
        north = rng.uniform(*a.north, size=n)
        lat, lon = from_local(east, north, a.ref_lat, a.ref_lon)
        freq = rng.uniform(*BANDS_HZ[p.band], size=n)
        tx_power = rng.uniform(*p.tx_power_dbm, size=n)
        ground = haversine_m(lat[:, None], lon[:, None], self.network.lat[None], self.network.lon[None])
        dist = np.hypot(ground, self.network.alt[None])  # transmitter near ground level
        terrain = self.terrain(east, north)[:, self.sites]
        shadow = rng.normal(0.0, p.shadowing_std_db, size=(n, R))
        fade_db, carrier_phase = self.fading_power_db(rng, (n, R))
        rx_dbm = tx_power[:, None] - self.path_loss_db(dist, freq[:, None]) - terrain - shadow + fade_db
        snr = rx_dbm - self.noise_floor_dbm
        present = rng.random((n, R)) >= p.absent_prob
        return {
            "tx_lat": lat, "tx_lon": lon, "freq_hz": freq, "tx_power_dbm": tx_power,
            "rx_power_dbm": rx_dbm, "snr_db": snr, "present": present,
            "carrier_phase": carrier_phase,
            "freq_offset_hz": rng.uniform(-p.freq_offset_hz, p.freq_offset_hz, size=(n, R)),
        }

    # ---- IQ --------------------------------------------------------------------------------------
    def render_iq(self, rng: np.random.Generator, links: dict[str, np.ndarray], block: int = 32) -> np.ndarray:
        """Narrowband FM common to all receivers -> per-receiver int16 IQ (N, R, 2, L).

        Works in blocks of samples so the float32 intermediates stay in cache.
        """
        n, R = links["rx_power_dbm"].shape
        L, fs = self.iq_length, self.sample_rate_hz
        t = (np.arange(L, dtype=np.float32) / np.float32(fs))[None, :]
        tones = rng.uniform(300.0, 3000.0, size=(n, 2, 1)).astype(np.float32)
        tone_phase = rng.uniform(0, 2 * np.pi, size=(n, 2, 1)).astype(np.float32)
        gain = self.rx_gain_db[None] - self.params.full_scale_dbm  # dB re full scale
        amp = (IQ_FULL_SCALE * 10 ** ((links["rx_power_dbm"] + gain) / 20)).astype(np.float32)
        noise_std = np.broadcast_to(IQ_FULL_SCALE * 10 ** ((self.noise_floor_dbm + gain) / 20) / np.sqrt(2),
                                    (n, R)).astype(np.float32)
        omega = (2 * np.pi * links["freq_offset_hz"]).astype(np.float32)
        carrier = links["carrier_phase"].astype(np.float32)
        fm_gain = np.float32(2 * np.pi * self.params.fm_deviation_hz / fs)
        out = np.empty((n, R, 2, L), dtype=np.int16)
        for lo in range(0, n, block):
            hi = min(lo + block, n)
            message = np.sin(2 * np.pi * tones[lo:hi] * t[:, None] + tone_phase[lo:hi]).mean(1)  # (b, L)
            fm_phase = fm_gain * np.cumsum(message, axis=1, dtype=np.float32)
            phase = fm_phase[:, None, :] + omega[lo:hi, :, None] * t[None] + carrier[lo:hi, :, None]
            iq = rng.standard_normal((hi - lo, R, 2, L), dtype=np.float32)
            iq *= noise_std[lo:hi, :, None, None]
            iq[:, :, 0] += amp[lo:hi, :, None] * np.cos(phase)
            iq[:, :, 1] += amp[lo:hi, :, None] * np.sin(phase)
            hot = amp[lo:hi] + 6 * noise_std[lo:hi] > IQ_FULL_SCALE  # only strong links can clip
            if hot.any():
                iq[hot] = np.clip(iq[hot], -IQ_FULL_SCALE - 1, IQ_FULL_SCALE)
            np.rint(iq, out=iq)
            out[lo:hi] = iq
        out[~links["present"]] = 0  # an absent receiver delivers nothing
        return out


WORLD_PRESETS = {
    "default": {},
    # Smaller noise terms: the pipeline can show it learns within a few CPU minutes.
    "low-noise": {"terrain_std_db": 2.0, "shadowing_std_db": 1.0, "fading": "rician", "rician_k_db": 15.0,
                  "absent_prob": 0.05},
}
