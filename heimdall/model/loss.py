"""Gaussian negative log-likelihood of the true position, in metres."""
from __future__ import annotations

import math

import torch


def whiten(target: torch.Tensor, mean: torch.Tensor, scale_tril: torch.Tensor) -> torch.Tensor:
    """Solve L z = (target - mean) for the 2x2 lower-triangular L: z is the whitened error."""
    d = target - mean
    z1 = d[:, 0] / scale_tril[:, 0, 0]
    z2 = (d[:, 1] - scale_tril[:, 1, 0] * z1) / scale_tril[:, 1, 1]
    return torch.stack([z1, z2], -1)


def gaussian_nll(target: torch.Tensor, mean: torch.Tensor, scale_tril: torch.Tensor) -> torch.Tensor:
    """Per-sample NLL (nats) of a 2-D Gaussian with covariance L L^T; all positions in metres."""
    z = whiten(target, mean, scale_tril)
    log_det_half = torch.log(scale_tril[:, 0, 0]) + torch.log(scale_tril[:, 1, 1])
    return 0.5 * z.square().sum(-1) + log_det_half + math.log(2 * math.pi)
