"""Image helpers shared by training, evaluation, serving and batch generation."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 1, H, W) in [-1, 1] -> (B, H, W) uint8."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x[:, 0].numpy()


def from_uint8(a: np.ndarray) -> torch.Tensor:
    """(B, H, W) uint8 -> (B, 1, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(a)).float().div(127.5).sub(1).unsqueeze(1)


def png_bytes(img: np.ndarray) -> bytes:
    """One (H, W) uint8 image as PNG bytes (deterministic: no metadata)."""
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def grid(images: np.ndarray, nrow: int, pad: int = 2, scale: int = 2) -> np.ndarray:
    """Tile (N, H, W) uint8 images into one (rows*H', nrow*W') image, row-major."""
    n, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    if scale > 1:
        out = out.repeat(scale, 0).repeat(scale, 1)
    return out
