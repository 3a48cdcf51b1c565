"""Images from outside handed to a model (``POST /v1/edit`` uploads, ``condgen edit`` files), and
images handed to a classifier of another colour mode (the safety filter's judge).

Upload policy (declared in ``/v1/edit``'s OpenAPI description and ``condgen edit --help``):

* formats: PNG, JPEG and WebP only (``FORMATS``, handed to ``Image.open``), one still image: no
  other container (ICO, TIFF, ...) is ever parsed, and an animated PNG/WebP is refused;
* the header is read first: width and height must be in [1, ``max_side``] (the service's
  ``schema.MAX_IMAGE_SIDE``), so at most ``max_side``² pixels, and PIL's decompression-bomb limit
  applies, before any pixel is decoded (callers on an event loop decode in a thread);
* 1-channel models (``L``): PIL ``convert("L")`` -- a colour image becomes ITU-R 601-2 luma
  (0.299 R + 0.587 G + 0.114 B), alpha is ignored -- exactly as the greyscale-only service did;
* 3-channel models (``RGB``): a greyscale image is replicated to three channels; an image with
  alpha or a transparency key is composited onto white (ingestion's default background,
  ``tasks/data/items.py``) -- other modes (palette, CMYK, ...) by PIL ``convert("RGB")``;
* size: any other size is resized (stretched, bilinear) to ``image_size`` x ``image_size``, as the
  greyscale-only service did; send a square image to avoid distortion. Never a 422 for size
  alone within the limits above.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from condgen.tasks.io.images import from_uint8

MODES = {1: "L", 3: "RGB"}
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, PIL's convert("L")
WHITE = (255, 255, 255, 255)
FORMATS = ("PNG", "JPEG", "WEBP")  # single-image formats whose header gives the size of what is decoded


class BadImage(ValueError):
    """The bytes are not an image this policy takes; the message says why."""


def model_geometry(model: torch.nn.Module) -> tuple[int, int]:
    """(channels, image_size) of a model's images, from its config (greyscale 28 px by default)."""
    conf = model.config
    return int(getattr(conf, "in_channels", 1)), int(getattr(conf, "image_size", 28))


def mode_of(channels: int) -> str:
    if channels not in MODES:
        raise ValueError(f"images have 1 (L) or 3 (RGB) channels, got {channels}")
    return MODES[channels]


def _in_mode(im: Image.Image, mode: str) -> Image.Image:
    if mode == "RGB" and ("A" in im.getbands() or "transparency" in im.info):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
    return im.convert(mode)


def check_geometry(im: Image.Image, max_side: int | None) -> None:
    """Refuse, from the header alone, an image whose pixels this policy would not decode."""
    w, h = im.size
    if w < 1 or h < 1 or (max_side is not None and max(w, h) > max_side):
        raise BadImage(f"image is {w}x{h}; at most {max_side} per side")
    Image._decompression_bomb_check(im.size)  # PIL's own limit when no max_side is given
    if getattr(im, "n_frames", 1) != 1:
        raise BadImage(f"image has {im.n_frames} frames; send one still image")


def decode_for_model(data: bytes, channels: int, size: int, max_side: int | None = None) -> torch.Tensor:
    """Encoded image bytes -> (1, channels, size, size) float in [-1, 1] by the policy above; BadImage otherwise.

    CPU-bound (up to ``max_side``² pixels): an async caller runs it in a thread."""
    mode = mode_of(channels)
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            check_geometry(im, max_side)
            pixels = np.array(_in_mode(im, mode).resize((size, size), Image.BILINEAR), dtype=np.uint8)
    except BadImage:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise BadImage("image is not a readable PNG, JPEG or WebP") from None
    return from_uint8(pixels[None])


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, channels, H, W): RGB -> luma (the weights of PIL's ``L``; affine
    maps commute with them, so it is the same in [-1, 1]), greyscale -> three equal channels."""
    c = x.shape[1]
    if c == channels:
        return x
    mode_of(channels)
    if c == 3:
        return (x * x.new_tensor(LUMA)[None, :, None, None]).sum(1, keepdim=True)
    if c == 1:
        return x.expand(-1, 3, -1, -1)
    raise ValueError(f"images have 1 or 3 channels, got {c}")
