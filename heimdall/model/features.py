"""Feature extraction inside the model: a complex STFT as a fixed DFT convolution.

Plain conv1d/elementwise ops only, so it runs on the GPU during training and exports to ONNX.
All n_fft bins are kept (negative and positive frequencies, fft-shifted), so the sign of the
frequency offset survives, and frame-to-frame phase rotation keeps phase information.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from heimdall.data.levels import IQ_FULL_SCALE



class ComplexSTFT(nn.Module):
    """(N, 2, L) IQ -> real and imaginary STFT, each (N, n_fft, frames), bins ordered -f..+f."""

    def __init__(self, n_fft: int, hop: int):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        n = torch.arange(n_fft, dtype=torch.float64)
        k = torch.arange(n_fft, dtype=torch.float64) - n_fft // 2  # fft-shifted bin order
        window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
        theta = 2 * math.pi * k[:, None] * n[None, :] / n_fft
        cos, sin = torch.cos(theta) * window, torch.sin(theta) * window
        # X_k = sum_n w_n (I_n + jQ_n) e^{-j theta}: Re = I cos + Q sin, Im = Q cos - I sin
        real = torch.stack([cos, sin], dim=1)
        imag = torch.stack([-sin, cos], dim=1)
        scale = 1.0 / window.sum()
        self.register_buffer("kernel", (torch.cat([real, imag], 0) * scale).float(), persistent=False)

    def forward(self, iq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = nn.functional.conv1d(iq, self.kernel, stride=self.hop)
        return out[:, : self.n_fft], out[:, self.n_fft:]


class SpectralFeatures(nn.Module):
    """Raw IQ counts (B, R, 2, L) -> per-receiver spectrogram channels and band power.

    Returns (B*R, 3, n_fft, frames-1) [log power dB, cos and sin of the phase rotation between
    frames] and (B, R) mean power in dB re full scale (the RSSI the receiver measured).
    """

    def __init__(self, n_fft: int, hop: int):
        super().__init__()
        self.stft = ComplexSTFT(n_fft, hop)

    def forward(self, iq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, R, _, L = iq.shape
        x = iq.to(torch.float32).reshape(B * R, 2, L) * (1.0 / IQ_FULL_SCALE)
        band_power_db = 10 * torch.log10(x.square().sum(1).mean(-1) + 1e-12).reshape(B, R)
        re, im = self.stft(x)
        power = re.square() + im.square()
        log_power = 10 * torch.log10(power + 1e-12)
        # X_t * conj(X_{t-1}): its angle is the phase advance per hop, i.e. the instantaneous frequency
        rot_re = re[..., 1:] * re[..., :-1] + im[..., 1:] * im[..., :-1]
        rot_im = im[..., 1:] * re[..., :-1] - re[..., 1:] * im[..., :-1]
        norm = torch.sqrt(rot_re.square() + rot_im.square() + 1e-20)
        channels = torch.stack([log_power[..., 1:], rot_re / norm, rot_im / norm], dim=1)
        return channels, band_power_db
