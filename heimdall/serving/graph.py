"""The serving graph: what a receiver network delivers in, what a user wants out.

Inputs are raw int16 IQ, receiver latitude/longitude/altitude and each receiver's state; outputs are the
transmitter's latitude/longitude (float64: float32 cannot resolve a metre at 45 degrees), east/north
metres in the model's frame and the 1-sigma uncertainty ellipse. The local frame, feature
extraction and normalisation are inside, so serving needs no Python feature code.

ONNX Runtime has no float64 Asin/Atan kernels, so the geodesy here starts each inverse
trigonometric function in float32 and refines it with one Newton step that uses only float64
sin/cos: the result agrees with numpy's float64 to ~1e-12 rad (well under a millimetre).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from heimdall.data.states import DETECT_SNR_DB
from heimdall.geodesy import EARTH_RADIUS_M
from heimdall.model.net import LocalizationNet

INPUTS = ("iq", "rx_pos", "rx_state")
OUTPUTS = ("latitude", "longitude", "east_north_m", "ellipse_semi_axes_m", "ellipse_orientation_deg")


def contract(iq_length: int, sample_rate_hz: float, center_frequency_hz: float | None,
             ref_lat: float, ref_lon: float, receiver_states: int = 3) -> dict:
    """The serving contract, written into the ONNX metadata and docs/serving-contract.md."""
    return {
        "inputs": {
            "iq": {"dtype": "int16", "shape": ["batch", "receivers", 2, iq_length],
                   "meaning": "raw I and Q counts per receiver, full scale 32767",
                   "sample_rate_hz": sample_rate_hz, "center_frequency_hz": center_frequency_hz,
                   "iq_length": f"fixed at {iq_length}: the graph rejects any other length"},
            "rx_pos": {"dtype": "float64", "shape": ["batch", "receivers", 3],
                       "meaning": "receiver latitude, longitude (degrees, WGS84) and altitude (metres)"},
            "rx_state": {"dtype": "int8", "shape": ["batch", "receivers"],
                         "meaning": "0 = absent (no data from the receiver: its iq and rx_pos are ignored, "
                                    "whatever they hold, NaN and inf included); 1 = online but does not hear the "
                                    "transmitter (pass its IQ and position: where it is, the transmitter is "
                                    "likely not); 2 = hears the transmitter. Decide 1 or 2 with "
                                    "heimdall.data.states.detect on the IQ, as the training data did"
                                    + ("" if receiver_states == 3 else
                                       "; this model was trained without state 1 and treats it as 0"),
                         "detector": f"heard when the SNR measured from the IQ (heimdall.data.levels.snr_db) "
                                     f">= {DETECT_SNR_DB:g} dB"},
        },
        "outputs": {
            "latitude": {"dtype": "float64", "shape": ["batch"], "meaning": "degrees"},
            "longitude": {"dtype": "float64", "shape": ["batch"], "meaning": "degrees"},
            "east_north_m": {"dtype": "float32", "shape": ["batch", 2],
                             "meaning": f"metres east/north of the frame origin ({ref_lat:.6f}, {ref_lon:.6f})"},
            "ellipse_semi_axes_m": {"dtype": "float32", "shape": ["batch", 2],
                                    "meaning": "1-sigma ellipse semi-major, semi-minor axis in metres "
                                               "(39.3 % of true positions inside; x2 for 86.5 %)"},
            "ellipse_orientation_deg": {"dtype": "float32", "shape": ["batch"],
                                        "meaning": "bearing of the semi-major axis, degrees clockwise from "
                                                   "north, in [0, 180)"},
        },
        "batch": "dynamic (>= 1)", "receivers": "dynamic (>= 1), any subset and order of receivers",
        "no_receiver_hears": "a row with no receiver in state 2 has no estimate: every output of that row is NaN "
                             "(heimdall predict and evaluate refuse such a row, naming it)",
        "two_state_exports": "models exported before receiver states existed take `mask` (bool, True = "
                             "heard) instead of rx_state; heimdall's predictors pass rx_state == 2 to them",
    }


def _asin(x: torch.Tensor) -> torch.Tensor:
    y = torch.asin(x.float()).double()
    return y - (torch.sin(y) - x) / torch.cos(y)


def _atan2(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    t = torch.atan2(y.float(), x.float()).double()
    den = x * torch.cos(t) + y * torch.sin(t)  # = hypot(x, y) at the root; 0 only at (0, 0)
    return t + (y * torch.cos(t) - x * torch.sin(t)) / torch.where(den == 0, torch.ones_like(den), den)


def to_local(lat: torch.Tensor, lon: torch.Tensor, ref_lat: torch.Tensor, ref_lon: torch.Tensor):
    """heimdall.geodesy.to_local in torch float64 (degrees in, metres out)."""
    rad = math.pi / 180.0
    p0, l0, p, dl = ref_lat * rad, ref_lon * rad, lat * rad, (lon - ref_lon) * rad
    a = torch.sin((p - p0) / 2) ** 2 + torch.cos(p0) * torch.cos(p) * torch.sin(dl / 2) ** 2
    dist = 2 * EARTH_RADIUS_M * _asin(torch.sqrt(a.clamp(0.0, 1.0)))
    bearing = _atan2(torch.sin(dl) * torch.cos(p), torch.cos(p0) * torch.sin(p) - torch.sin(p0) * torch.cos(p) * torch.cos(dl))
    return dist * torch.sin(bearing), dist * torch.cos(bearing)


def from_local(east: torch.Tensor, north: torch.Tensor, ref_lat: torch.Tensor, ref_lon: torch.Tensor):
    """heimdall.geodesy.from_local in torch float64 (metres in, degrees out)."""
    rad = math.pi / 180.0
    p0, l0 = ref_lat * rad, ref_lon * rad
    delta = torch.sqrt(east**2 + north**2) / EARTH_RADIUS_M
    bearing = _atan2(east, north)
    p = _asin(torch.sin(p0) * torch.cos(delta) + torch.cos(p0) * torch.sin(delta) * torch.cos(bearing))
    l = l0 + _atan2(torch.sin(bearing) * torch.sin(delta) * torch.cos(p0), torch.cos(delta) - torch.sin(p0) * torch.sin(p))
    lon = l / rad
    return p / rad, lon - 360.0 * torch.floor((lon + 180.0) / 360.0)


def ellipse(scale_tril: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cholesky factor (B, 2, 2) of the east/north covariance -> 1-sigma semi-axes (major, minor) and
    the major axis's bearing in degrees clockwise from north, in [0, 180)."""
    l00, l10, l11 = (scale_tril[:, 0, 0].double(), scale_tril[:, 1, 0].double(), scale_tril[:, 1, 1].double())
    a, b, d = l00 * l00, l00 * l10, l10 * l10 + l11 * l11  # covariance [[a, b], [b, d]]
    major_sq = (a + d) / 2 + torch.sqrt(((a - d) / 2) ** 2 + b * b)
    major = torch.sqrt(major_sq)
    minor = torch.abs(l00 * l11) / major  # det = major^2 minor^2: no cancellation for thin ellipses
    angle_from_east = 0.5 * _atan2(2 * b, a - d) * (180.0 / math.pi)
    bearing = 90.0 - angle_from_east
    bearing = bearing - 180.0 * torch.floor(bearing / 180.0)
    return torch.stack([major, minor], -1).float(), bearing.float()


class ServingModel(nn.Module):
    """LocalizationNet wrapped with the geodesy of its frame: the graph that is exported to ONNX."""

    def __init__(self, net: LocalizationNet):
        super().__init__()
        self.net = net.eval()

    def forward(self, iq: torch.Tensor, rx_pos: torch.Tensor, rx_state: torch.Tensor):
        ref_lat, ref_lon = self.net.ref_lat, self.net.ref_lon
        east, north = to_local(rx_pos[..., 0], rx_pos[..., 1], ref_lat, ref_lon)
        local = torch.stack([east, north, rx_pos[..., 2]], -1).float()
        mean, tril = self.net(iq, local, rx_state)
        lat, lon = from_local(mean[:, 0].double(), mean[:, 1].double(), ref_lat, ref_lon)
        axes, orientation = ellipse(tril.float())
        return lat, lon, mean.float(), axes, orientation
