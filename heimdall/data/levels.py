"""Received levels measured from IQ alone: power, noise floor and SNR, in dB re full scale.

The noise floor comes from the median periodogram bin: for complex Gaussian noise each bin's power
is exponential, whose median is ln 2 times its mean. A narrowband signal occupies few bins, so the
median bin stays a noise bin. Used where no world model says what the noise is (recordings).
"""
from __future__ import annotations

import numpy as np

IQ_FULL_SCALE = 32767.0  # int16 IQ counts at full scale, for every source


def power_dbfs(iq: np.ndarray) -> np.ndarray:
    """(..., 2, L) int16 IQ -> (...) mean power in dB re full scale."""
    p = np.square(iq.astype(np.float32) / IQ_FULL_SCALE).sum(-2).mean(-1)
    return 10 * np.log10(np.maximum(p, 1e-20))


def noise_dbfs(iq: np.ndarray) -> np.ndarray:
    """(..., 2, L) int16 IQ -> (...) noise power estimate in dB re full scale."""
    z = iq[..., 0, :].astype(np.float32) + 1j * iq[..., 1, :].astype(np.float32)
    bins = np.square(np.abs(np.fft.fft(z / IQ_FULL_SCALE, axis=-1))) / z.shape[-1]
    return 10 * np.log10(np.maximum(np.median(bins, -1) / np.log(2), 1e-20))


def snr_db(iq: np.ndarray) -> np.ndarray:
    """(..., 2, L) int16 IQ -> (...) estimated signal-to-noise ratio in dB (floored at -30 dB)."""
    total, noise = 10 ** (power_dbfs(iq) / 10), 10 ** (noise_dbfs(iq) / 10)
    return 10 * np.log10(np.maximum(total - noise, noise * 1e-3) / noise)
