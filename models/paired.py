"""Paired condition images computed from a digit (for pix2pix-style training).

Pure torch, so the pipeline computes ``cond_img`` the same way at ingest, in tests and
at serving time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Sobel (1968) kernels; /8 makes a -1 -> +1 step (an image in [-1, 1]) give |g| = 1.
_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8


def edge_map(x: torch.Tensor, threshold: float = 0.25) -> torch.Tensor:
    """Binary Sobel edge map: (B, C, H, W) in [-1, 1] -> (B, 1, H, W) in {-1, 1} (+1 = edge).

    Channels are averaged to grey first; the gradient magnitude sqrt(gx^2 + gy^2) is
    thresholded, with ``threshold`` in units of a full-range step (1 = black to white).
    """
    grey = x.float().mean(1, keepdim=True)  # (B, 1, H, W)
    kx = _SOBEL_X.to(grey.device)[None, None]  # (1, 1, 3, 3)
    ky = kx.transpose(2, 3)
    padded = F.pad(grey, (1, 1, 1, 1), mode="replicate")  # no false edges at the image border
    gx, gy = F.conv2d(padded, kx), F.conv2d(padded, ky)
    mag = torch.sqrt(gx**2 + gy**2)  # (B, 1, H, W)
    return torch.where(mag > threshold, 1.0, -1.0).to(x.dtype)
