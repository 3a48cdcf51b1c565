"""Fitting a CLIP from scratch, and the embedded default CLIP of a shard set.

:func:`fit_clip` trains an open_clip model (``condgen-clip-tiny`` by default, see
``tasks/clip/configs.py``) with open_clip's ``ClipLoss`` on (image, captions) pairs.
:func:`embedded_clip` is what the ``"embedded"`` spec loads: the CLIP fitted on a shard
set's train captions, cached next to the shards so every later call reuses it. A new fit is
tracked as an MLflow run (settings, contrastive loss, zero-shot accuracy) and registered as
a new version of ``condgen-clip`` under the ``champion`` alias (``tasks/clip/registry.py``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from typing import Any, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from condgen.tasks.clip.configs import DEFAULT_CONFIG, portable, register_configs
from condgen.tasks.clip.handle import CONFIG, ClipHandle, as_float_images, load_checkpoint, new_clip, save_clip
from condgen.tasks.clip.quality import contrastive_loss, zero_shot_accuracy
from condgen.tasks.clip.registry import REGISTERED_NAME, REGISTRY_NOTE, register_clip
from condgen.tasks.data.splits import load_split
from condgen.tasks.io import storage

log = logging.getLogger(__name__)


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
    images_t = as_float_images(images)  # (N, 28, 28) or (N, 3, H, W) in [-1, 1]
    images_t = images_t.unsqueeze(1) if images_t.ndim == 3 else images_t
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
                                     "fit": settings, "model_cfg": portable(open_clip.get_model_config(config))},
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
