"""Image helpers shared by training, evaluation, serving and batch generation.

Arrays are uint8 (N, H, W) for greyscale and (N, H, W, 3) for RGB; tensors are float
(N, C, H, W) in [-1, 1] with C = 1 or 3. Greyscale results are exactly those of the
greyscale-only helpers these replace.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 1, H, W) in [-1, 1] -> (B, H, W) uint8; (B, 3, H, W) -> (B, H, W, 3)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        return x[:, 0].numpy()
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def from_uint8(a: np.ndarray) -> torch.Tensor:
    """(B, H, W) uint8 -> (B, 1, H, W) float in [-1, 1]; (B, H, W, 3) -> (B, 3, H, W)."""
    t = torch.from_numpy(np.ascontiguousarray(a)).float().div(127.5).sub(1)
    if _is_colour(a, 4):
        return t.permute(0, 3, 1, 2).contiguous()
    return t.unsqueeze(1)


def png_bytes(img: np.ndarray) -> bytes:
    """One (H, W) or (H, W, 3) uint8 image as PNG bytes (deterministic: no metadata)."""
    buf = io.BytesIO()
    Image.fromarray(img, mode="RGB" if _is_colour(img, 3) else "L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def grid(images: np.ndarray, nrow: int, pad: int = 2, scale: int = 2) -> np.ndarray:
    """Tile (N, H, W) uint8 images into one (rows*H', nrow*W') image, row-major; (N, H, W, 3)
    images into one (rows*H', nrow*W', 3) image. Padding is white."""
    n, h, w = images.shape[:3]
    rows = (n + nrow - 1) // nrow
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, *images.shape[3:]), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    if scale > 1:
        out = out.repeat(scale, 0).repeat(scale, 1)
    return out


def _is_colour(a: np.ndarray, ndim: int) -> bool:
    return a.ndim == ndim and a.shape[-1] == 3
