"""Provenance for generated images: an HMAC-signed record plus an invisible, record-bound mark.

* ``sign(record)`` adds ``signature`` = HMAC-SHA256(key, canonical JSON of the record), so a
  record (model name/version, parameters, seed, ...) cannot be altered without the key.
* ``embed(image, record)`` writes a keyed pseudo-random bit pattern, derived from the
  record, into the least significant bit of every pixel value (each channel of an RGB image):
  at most ±1 level, invisible, and lossless under PNG. The pattern is HMAC(key, "wm" + record), so an image carries
  the mark of exactly the record it was generated with.
* ``detect(image, record)`` is True when the signature verifies *and* at least
  ``threshold`` of the pixel values carry the expected bit. For an unmarked image each bit
  matches with probability 1/2, so over a 28x28 image (784 bits) the chance of a false
  positive at threshold 0.9 is P(Binomial(784, 0.5) >= 706) < 1e-100; a marked image
  matches 100% until it is re-quantised or edited.

It is a fragile watermark (it proves "this exact output came from that record"),
not one that survives resizing or JPEG; a robust one (spread spectrum) would need
images larger than 28x28 digits to hide in.

The key comes from ``CONDGEN_PROVENANCE_KEY``; without it an embedded development key
is used (the record says so: ``key_id`` = "dev"), so a deployment sets its own.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Any

import numpy as np

KEY_ENV = "CONDGEN_PROVENANCE_KEY"
_DEV_KEY = b"condgen-development-provenance-key"
SIGNED_FIELDS_EXCLUDED = ("signature", "image_sha256")
DEFAULT_THRESHOLD = 0.9


def _key(key: bytes | str | None = None) -> tuple[bytes, str]:
    if key is None:
        env = os.environ.get(KEY_ENV)
        if not env:
            return _DEV_KEY, "dev"
        key = env
    raw = key.encode() if isinstance(key, str) else key
    return raw, hashlib.sha256(raw).hexdigest()[:12]  # an id for the key, never the key itself


def key_id(key: bytes | str | None = None) -> str:
    return _key(key)[1]


def canonical(record: dict[str, Any]) -> bytes:
    """The bytes that are signed: sorted-key JSON without the signature (and the image hash)."""
    body = {k: v for k, v in record.items() if k not in SIGNED_FIELDS_EXCLUDED}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str).encode()


def sign(record: dict[str, Any], key: bytes | str | None = None) -> dict[str, Any]:
    """A copy of ``record`` with ``key_id`` and ``signature`` (hex HMAC-SHA256)."""
    raw, kid = _key(key)
    out = {k: v for k, v in record.items() if k != "signature"}
    out["key_id"] = kid
    out["signature"] = hmac.new(raw, canonical(out), hashlib.sha256).hexdigest()
    return out


def verify(record: dict[str, Any], key: bytes | str | None = None) -> bool:
    raw, kid = _key(key)
    sig = record.get("signature")
    if not isinstance(sig, str) or record.get("key_id") != kid:
        return False
    return hmac.compare_digest(sig, hmac.new(raw, canonical(record), hashlib.sha256).hexdigest())


def _pattern(record: dict[str, Any], shape: tuple[int, ...], key: bytes | str | None) -> np.ndarray:
    """Keyed bits (uint8 0/1) of ``shape`` from HMAC-SHA256 in counter mode over the record."""
    raw, _ = _key(key)
    n = int(np.prod(shape))
    seed = hmac.new(raw, b"wm\0" + canonical(record), hashlib.sha256).digest()
    stream = b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range((n + 255) // 256))
    return np.unpackbits(np.frombuffer(stream, np.uint8))[:n].reshape(shape)


def embed(image: np.ndarray, record: dict[str, Any], key: bytes | str | None = None) -> np.ndarray:
    """uint8 image (H, W) or (H, W, 3) -> the same image with the record's bits in its LSBs (|change| <= 1)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"embed takes uint8 images, got {image.dtype}")
    return (image & np.uint8(0xFE)) | _pattern(record, image.shape, key)


def match_rate(image: np.ndarray, record: dict[str, Any], key: bytes | str | None = None) -> float:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.size == 0:
        return 0.0
    return float(((image & 1) == _pattern(record, image.shape, key)).mean())


def detect(image: np.ndarray, record: dict[str, Any], key: bytes | str | None = None,
           threshold: float = DEFAULT_THRESHOLD) -> bool:
    """True if ``record`` is signed with our key and ``image`` carries its mark."""
    return verify(record, key) and match_rate(image, record, key) >= threshold


def mark(image: np.ndarray, record: dict[str, Any], key: bytes | str | None = None) -> tuple[np.ndarray, dict]:
    """Sign the record, embed its mark, and add the marked image's sha256 (of its raw pixels)."""
    signed = sign(record, key)
    marked = embed(image, signed, key)
    signed["image_sha256"] = hashlib.sha256(np.ascontiguousarray(marked).tobytes()).hexdigest()
    return marked, signed
