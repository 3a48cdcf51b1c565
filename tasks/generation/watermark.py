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

The key comes from configuration: ``CONDGEN_WATERMARK_KEY`` (``CONDGEN_PROVENANCE_KEY``, its former
name, is still read). There is no built-in key: without one, records are **unsigned** -- ``sign``
writes ``key_id`` = "unsigned" and ``signature`` = null, ``mark`` leaves the pixels alone, and
``verify``/``detect`` are False -- so an unsigned output can never pass for a signed one. Tests set
a key of their own explicitly (an env var in a fixture, or ``key=``).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Any

import numpy as np

KEY_ENV = "CONDGEN_WATERMARK_KEY"
LEGACY_KEY_ENV = "CONDGEN_PROVENANCE_KEY"
UNSIGNED = "unsigned"  # the key_id of a record made without a key
SIGNED_FIELDS_EXCLUDED = ("signature", "image_sha256")
DEFAULT_THRESHOLD = 0.9


def configured_key() -> str | None:
    """The signing key from the environment, or None (unsigned mode)."""
    return os.environ.get(KEY_ENV) or os.environ.get(LEGACY_KEY_ENV) or None


def _key(key: bytes | str | None = None) -> tuple[bytes | None, str]:
    if key is None:
        key = configured_key()
        if key is None:
            return None, UNSIGNED
    raw = key.encode() if isinstance(key, str) else key
    return raw, hashlib.sha256(raw).hexdigest()[:12]  # an id for the key, never the key itself


def key_id(key: bytes | str | None = None) -> str:
    return _key(key)[1]


def signing(key: bytes | str | None = None) -> bool:
    """Whether records are signed and images marked (a key is given or configured)."""
    return _key(key)[0] is not None


def canonical(record: dict[str, Any]) -> bytes:
    """The bytes that are signed: sorted-key JSON without the signature (and the image hash)."""
    body = {k: v for k, v in record.items() if k not in SIGNED_FIELDS_EXCLUDED}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str).encode()


def sign(record: dict[str, Any], key: bytes | str | None = None) -> dict[str, Any]:
    """A copy of ``record`` with ``key_id`` and ``signature`` (hex HMAC-SHA256; null when unsigned)."""
    raw, kid = _key(key)
    out = {k: v for k, v in record.items() if k != "signature"}
    out["key_id"] = kid
    out["signature"] = hmac.new(raw, canonical(out), hashlib.sha256).hexdigest() if raw is not None else None
    return out


def verify(record: dict[str, Any], key: bytes | str | None = None) -> bool:
    raw, kid = _key(key)
    sig = record.get("signature")
    if raw is None or not isinstance(sig, str) or record.get("key_id") != kid:
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
    """uint8 image (H, W) or (H, W, 3) -> the same image with the record's bits in its LSBs (|change| <= 1);
    unchanged when unsigned (no key)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"embed takes uint8 images, got {image.dtype}")
    if not signing(key):
        return image.copy()
    return (image & np.uint8(0xFE)) | _pattern(record, image.shape, key)


def match_rate(image: np.ndarray, record: dict[str, Any], key: bytes | str | None = None) -> float:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.size == 0 or not signing(key):
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
