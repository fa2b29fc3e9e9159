"""LocalizationNet: raw IQ from a set of receivers -> position (east/north metres) + 2-D Gaussian.

Each receiver is encoded from its spectrogram, band power, position and state (heimdall.data.states:
whether it hears the transmitter or is online but silent); masked self-attention lets receivers
compare what they heard; a masked mean/max pool makes the result independent of receiver order and
of how many take part, and a sum over the silent receivers gives the head each non-detection apart.
Absent receivers never influence the output, whatever they hold; a row where no receiver hears gets
NaN outputs. With receiver_states=2 silent receivers count as absent (the models trained before
receiver states existed).
The coordinate frame and feature normalisation are buffers fitted on the train split, so they
travel in every checkpoint and export.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from heimdall.config import ModelConfig
from heimdall.data.states import ABSENT, HEARD, SILENT
from heimdall.model.features import SpectralFeatures

MASK_FILL = -1e4  # attention bias for receivers that take no part (finite: -inf gives NaN when all masked)


class ReceiverEncoder(nn.Module):
    """Spectrogram channels -> one vector per receiver."""

    def __init__(self, channels: int, out: int):
        super().__init__()
        c = channels
        self.conv = nn.Sequential(
            nn.Conv2d(3, c, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1), nn.GELU(),
        )
        self.proj = nn.Linear(2 * c, out)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(spec).mean(dim=(2, 3)))


class MaskedSelfAttention(nn.Module):
    """Pre-norm transformer block over receivers; receivers that take no part are masked out."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        B, R, W = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, R, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) * (1.0 / math.sqrt(W // self.heads)) + key_bias[:, None, None, :]
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, R, W)
        x = x + self.drop(self.out(attended))
        return x + self.drop(self.mlp(self.norm2(x)))


class LocalizationNet(nn.Module):
    def __init__(self, n_fft: int, hop: int, conv_channels: int, width: int, heads: int, layers: int,
                 dropout: float = 0.0, receiver_states: int = 3, silent_sum: bool = True):
        super().__init__()
        self.receiver_states = receiver_states
        self.features = SpectralFeatures(n_fft, hop)
        self.encoder = ReceiverEncoder(conv_channels, width)
        self.context = nn.Linear(4, width)  # band power, east, north, altitude
        if receiver_states == 3:
            self.silent = nn.Parameter(torch.zeros(width))  # what marks a receiver that does not hear
        self.silent_sum = receiver_states == 3 and silent_sum
        self.blocks = nn.ModuleList(MaskedSelfAttention(width, heads, dropout) for _ in range(layers))
        pooled = (3 if self.silent_sum else 2) * width
        self.head = nn.Sequential(nn.LayerNorm(pooled), nn.Linear(pooled, 2 * width), nn.GELU(),
                                  nn.Dropout(dropout), nn.Linear(2 * width, 5))
        # Fitted on the train split (see normalization.py); defaults are placeholders.
        self.register_buffer("ref_lat", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("ref_lon", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("pos_scale_m", torch.tensor(1.0))
        self.register_buffer("log_power_stats", torch.tensor([0.0, 1.0]))  # dB mean, std
        self.register_buffer("band_power_stats", torch.tensor([0.0, 1.0]))

    def forward(self, iq: torch.Tensor, rx_pos: torch.Tensor, rx_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """iq (B, R, 2, L) raw counts, rx_pos (B, R, 3) local east/north/alt metres, rx_state (B, R)
        0 absent, 1 silent, 2 heard.

        Returns mean (B, 2) east/north metres and scale_tril (B, 2, 2) metres (Cholesky of covariance).
        """
        B, R = rx_state.shape
        state = rx_state.to(torch.int32)  # ONNX Runtime compares int32, not int8
        heard = state == HEARD
        taking_part = state != ABSENT if self.receiver_states == 3 else heard
        # Absent receivers may hold anything (garbage IQ, NaN or inf positions): zero them before any
        # arithmetic, since 0 * NaN is NaN and a masked-out NaN would still reach every output.
        iq = torch.where(taking_part[:, :, None, None], iq.to(torch.float32), 0.0)  # ONNX Runtime has no int16 Where
        rx_pos = torch.where(taking_part[:, :, None], rx_pos, 0.0)
        spec, band_db = self.features(iq)
        lp_mean, lp_std = self.log_power_stats[0], self.log_power_stats[1]
        spec = torch.cat([(spec[:, :1] - lp_mean) / lp_std, spec[:, 1:]], dim=1)
        band = (band_db - self.band_power_stats[0]) / self.band_power_stats[1]
        context = torch.cat([band[..., None], rx_pos[..., :2] / self.pos_scale_m, rx_pos[..., 2:] / 1000.0], -1)
        x = self.encoder(spec).reshape(B, R, -1) + self.context(context)
        if self.receiver_states == 3:
            x = x + (~heard)[..., None].to(x.dtype) * self.silent
        taking = taking_part.to(x.dtype)
        key_bias = (1.0 - taking) * MASK_FILL
        for block in self.blocks:
            x = block(x, key_bias)
        weights = taking[..., None]
        mean_pool = (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        max_pool = (x + (1.0 - weights) * MASK_FILL).amax(1)
        pools = [mean_pool, max_pool]
        if self.silent_sum:
            # Each silent receiver is a constraint of its own (the reference adds their log-likelihoods),
            # so the head reads their sum apart from the pools the heard receivers dominate.
            pools.append((x * (state == SILENT)[..., None].to(x.dtype)).sum(1))
        out = self.head(torch.cat(pools, -1))
        scale = self.pos_scale_m
        # No receiver hears, no estimate: NaN marks the row (a finite guess would look like a fix).
        out = torch.where(heard.any(1, keepdim=True), out, torch.full_like(out, float("nan")))
        mean = out[:, :2] * scale
        diag = torch.exp(out[:, 2:4].clamp(-9.0, 6.0)) * scale
        zero = torch.zeros_like(diag[:, 0])
        tril = torch.stack([torch.stack([diag[:, 0], zero], -1),
                            torch.stack([out[:, 4] * scale, diag[:, 1]], -1)], -2)
        return mean, tril


def build_model(config: ModelConfig) -> LocalizationNet:
    return LocalizationNet(**config.resolved())
