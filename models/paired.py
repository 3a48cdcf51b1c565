"""Paired condition images computed from an image (for pix2pix-style training).

Pure torch, so the pipeline computes ``cond_img`` the same way at ingest, in tests and
at serving time. ``PAIRINGS`` names each derived pairing (``Pix2PixConfig.pairing``):

* ``"edges"``: the binary Sobel edge map (edges -> image);
* ``"colorize"``: the greyscale (luma) of a colour image, the "automatic colorization"
  task of Isola et al. 2017 (§4; Zhang et al. 2016): grey -> colour.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# ITU-R BT.601 luma weights, as PIL's convert("L")
LUMA = (0.299, 0.587, 0.114)
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


def greyscale(x: torch.Tensor) -> torch.Tensor:
    """Luma of an RGB image: (B, 3, H, W) in [-1, 1] -> (B, 1, H, W) in [-1, 1] (BT.601 weights, which
    sum to 1, so the range is kept); a (B, 1, H, W) image is returned as it is."""
    if x.shape[1] == 1:
        return x
    if x.shape[1] != 3:
        raise ValueError(f"greyscale takes 1 or 3 channels, got {x.shape[1]}")
    w = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


PAIRINGS = {"edges": edge_map, "colorize": greyscale}


def paired_condition(x: torch.Tensor, pairing: str) -> torch.Tensor:
    """The condition image of a derived pairing (``PAIRINGS``) for images x (B, C, H, W): (B, 1, H, W)."""
    if pairing not in PAIRINGS:
        raise ValueError(f"unknown pairing {pairing!r}; choose one of {sorted(PAIRINGS)}")
    return PAIRINGS[pairing](x)
