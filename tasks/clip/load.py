"""``load_clip(spec)``: one open_clip code path, four kinds of source, the same
:class:`~condgen.tasks.clip.handle.ClipHandle` for each.

* a named pretrained model, ``"ViT-B-32:laion2b_s34b_b79k"``: handed to open_clip as
  ``create_model_and_transforms(name, pretrained=tag)``; it downloads from the hub, so
  offline it fails with :class:`ClipUnavailable` naming the alternatives;
  ``"ViT-B-32:/path/or/s3://…/weights.safetensors"`` loads an open_clip architecture
  from a weights file the user holds;
* a condgen checkpoint, a local path, ``file://`` or ``s3://`` URI of a folder written by
  ``save_clip`` (``tasks/clip/handle.py``). It is fetched through ``tasks.io.storage`` into
  a temp folder and built by open_clip itself (``pretrained=<file>.safetensors``, which
  open_clip reads with safetensors: nothing is unpickled);
* a registry URI, ``"models:/condgen-clip@champion"`` (or ``/<version>``): the MLflow
  model version's ``model/`` artifacts are that same checkpoint folder
  (``tasks/clip/registry.py``);
* ``"embedded"`` (or ``"embedded:<config>"``): the small CLIP fitted on a shard set's
  train captions and cached next to the shards (``tasks/clip/fit.py``).
"""
from __future__ import annotations

import os
import socket
import tempfile
from typing import Any
from urllib.parse import urlparse

import open_clip
import torch

from condgen.tasks.clip.configs import ClipUnavailable, jsonable, register_configs
from condgen.tasks.clip.fit import embedded_clip
from condgen.tasks.clip.handle import ClipHandle, fetch_file, load_checkpoint
from condgen.tasks.clip.registry import load_registered_clip
from condgen.tasks.io.model_store import is_registry_uri


def _is_uri_or_path(spec: str) -> bool:
    return "://" in spec or spec.startswith(("/", "./", "../", "~")) or os.path.exists(spec)


def load_clip(spec: "str | ClipHandle", *, device: str | torch.device = "cpu", data_uri: str | None = None,
              **fit_kwargs: Any) -> ClipHandle:
    """A :class:`ClipHandle` from a spec (see the module docstring).

    ``"embedded"`` needs ``data_uri`` (a shard set): the CLIP fitted on its train split is
    loaded from ``{data_uri}/clip/…`` or fitted and saved there (``fit_kwargs`` go to
    :func:`fit_clip`).
    """
    if isinstance(spec, ClipHandle):
        return spec
    spec = os.path.expanduser(spec) if spec.startswith("~") else spec
    if is_registry_uri(spec):
        return load_registered_clip(spec, device=device)
    if spec == "embedded" or spec.startswith("embedded:"):
        if data_uri is None:
            raise ValueError("the embedded CLIP is fitted on a shard set's captions: pass data_uri=<shards URI>")
        if spec.startswith("embedded:"):  # embedded:<config>, e.g. embedded:condgen-clip-minilm
            fit_kwargs = {**fit_kwargs, "config": spec.split(":", 1)[1]}
        return embedded_clip(data_uri, device=device, **fit_kwargs)
    if _is_uri_or_path(spec):
        return load_checkpoint(spec, device=device)
    name, sep, tag = spec.partition(":")
    register_configs()
    if not sep or name not in open_clip.list_models():
        raise ValueError(f"unknown CLIP spec {spec!r}: expected 'embedded', a checkpoint path/URI (file://, s3://), "
                         f"or '<open_clip model>:<pretrained tag or weights URI>' "
                         f"(models: {', '.join(open_clip.list_models()[:6])}, …)")
    return _load_pretrained(name, tag, spec, device)


def _load_pretrained(name: str, tag: str, spec: str, device) -> ClipHandle:
    model_cfg = jsonable(open_clip.get_model_config(name))
    if _is_uri_or_path(tag):  # the user's own open_clip weights for a known architecture
        if not tag.endswith(".safetensors"):
            raise ValueError(f"{tag!r}: only .safetensors weights are loaded (no unpickling of checkpoint files)")
        with tempfile.TemporaryDirectory(prefix="condgen-clip-") as tmp:
            path = fetch_file(tag, tmp)
            model, _, _ = open_clip.create_model_and_transforms(name, pretrained=path, device=device)
    else:
        if not open_clip.get_pretrained_cfg(name, tag):
            raise ValueError(f"open_clip has no pretrained tag {tag!r} for {name}; "
                             f"known: {open_clip.list_pretrained_tags_by_model(name)}")
        if not _hub_reachable():
            raise ClipUnavailable(
                f"pretrained CLIP {spec!r} must be downloaded and the model hub is unreachable (offline?). Use a "
                f"local checkpoint (path, file:// or s3:// URI from save_clip) or 'embedded'; with the weights "
                f"already in the Hugging Face cache, set HF_HUB_OFFLINE=1.")
        try:
            model, _, _ = open_clip.create_model_and_transforms(name, pretrained=tag, device=device)
        except Exception as e:  # noqa: BLE001 - the hub client raises many kinds
            raise ClipUnavailable(
                f"could not get pretrained CLIP {spec!r} ({type(e).__name__}: {str(e)[:200]}). Offline? Use a "
                f"local checkpoint (path, file:// or s3:// URI from save_clip) or 'embedded'.") from e
    preprocess_cfg = jsonable(open_clip.get_model_preprocess_cfg(model))
    return ClipHandle(model.eval(), open_clip.get_tokenizer(name), name, model_cfg, preprocess_cfg, source=spec)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can we open a TCP connection to the model hub? Checked before open_clip's download,
    whose client retries for ~45 s before failing when there is no network. Behind a proxy,
    or with HF_HUB_OFFLINE set (cache only), the download client decides by itself."""

    if os.environ.get("HF_HUB_OFFLINE") or any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy",
                                                                           "ALL_PROXY", "all_proxy")):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
