"""Request inputs and outputs of the service: images in and out (base64 PNG, in the served model's
channels: ``L`` or ``RGB``), and raw condition rows
(labels, or CLIP text embeddings) resolved from a label or a prompt for one loaded model."""
from __future__ import annotations

import base64
import binascii
from typing import Any

import torch

from condgen.serving import schema
from condgen.serving.errors import ApiError
from condgen.serving.pool import Loaded
from condgen.tasks.data.attributes import label_from_prompt, label_prompt
from condgen.tasks.generation.inputs import BadImage, decode_for_model
from condgen.tasks.io.images import png_bytes, to_uint8


def decode_image(b64: str, channels: int, size: int) -> torch.Tensor:
    """base64 image -> (1, channels, size, size) float in [-1, 1] for the served model, by the upload policy
    of ``tasks.generation.inputs`` (as ``condgen edit`` reads a file): 422 with the reason otherwise."""
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "image is not valid base64") from None
    try:
        return decode_for_model(data, channels, size, max_side=schema.MAX_IMAGE_SIDE)
    except BadImage as exc:
        raise ApiError(422, str(exc)) from None


def b64_png(x: torch.Tensor) -> list[str]:
    """(B, C, H, W) in [-1, 1] -> base64 PNGs: 8-bit ``L`` for C = 1, 8-bit ``RGB`` for C = 3."""
    return [base64.b64encode(png_bytes(img)).decode() for img in to_uint8(x)]


def condition_rows(loaded: Loaded, clip: Any, label: int | None, prompt: str | None, n: int, what: str = "label"
                   ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Raw condition rows (n,) labels or (n, D) CLIP text (``clip``: the service's CLIP handle, or None)
    for ``loaded``, and what was resolved; 409/422 when the model cannot take them."""
    info = loaded.info
    if info["condition"] == "label":
        if prompt is not None:
            names = info.get("class_names")
            label = label_from_prompt(prompt, info["num_classes"], names)
            if label is None:
                raise ApiError(422, f"{loaded.key} is a label model and the {what} prompt names none of its classes "
                                    + (f"({_listed(names)}); name one or give a label" if names else
                                       f"[0, {info['num_classes'] - 1}]; give a label or a digit in the prompt"))
        if label >= info["num_classes"]:
            raise ApiError(422, f"{what} must be in [0, {info['num_classes'] - 1}], got {label}")
        return torch.full((n,), int(label), dtype=torch.long), {"label": int(label)}
    if clip is None:
        raise ApiError(409, f"{loaded.key} is text-conditioned and this service has no CLIP model configured")
    text = prompt if prompt is not None else prompt_for_label(loaded, int(label), what)
    emb = clip.encode_texts([text])  # (1, D)
    if emb.shape[1] != loaded.model.config.text_dim:
        raise ApiError(409, f"the configured CLIP gives {emb.shape[1]}-d text, {loaded.key} takes "
                            f"{loaded.model.config.text_dim}-d")
    return emb.expand(n, -1).clone(), {"prompt": text}


def prompt_for_label(loaded: Loaded, label: int, what: str = "label") -> str:
    """The text a bare ``label`` stands for with ``loaded``'s training set: "a red circle" when its manifest
    names the classes, "a handwritten digit 3" for a digit set; 422 when the set names no classes (a
    caption-only set: give a prompt) or the label is not one of them."""
    names, digits = loaded.info.get("class_names"), loaded.info.get("digits")
    if names:
        if not 0 <= label < len(names):
            raise ApiError(422, f"{what} must be in [0, {len(names) - 1}] ({_listed(names)}), got {label}")
        return f"a {names[label]}"
    if digits is False:
        raise ApiError(422, f"{loaded.key} was trained on a set whose classes have no names, so a {what} means "
                            "nothing to it; give a prompt")
    return label_prompt(label)  # a digit set, or a model whose run cannot be read (the digit models before v2)


def _listed(names: list[str], k: int = 6) -> str:
    shown = ", ".join(f"{i}: {n}" for i, n in enumerate(names[:k]))
    return shown + (f", ... ({len(names)} classes)" if len(names) > k else "")
