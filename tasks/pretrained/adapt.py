"""``adapt_pretrained``: a LoRA fine-tune of a user's pretrained pipeline on captioned shards, the driver side.

One MLflow run (tag ``condgen.kind=adapter``, ``condgen.adapter_base`` = the base's URI) around one
Ray Train ``TorchTrainer`` fit of ``tasks.pretrained.train.train_loop_per_worker``. Before Ray
starts: the base is fetched and checked (safetensors only), and the VAE latents and text
embeddings of the shards are computed, or found, once per (encoder fingerprint, dtype)
(``tasks.pretrained.cache``). After the fit: the adapter (``adapter.safetensors`` +
``adapter.json``) and its model card go to ``<storage>/adapters/<run id>`` and the run's
``adapter/`` artifacts, and, with ``register_as``, to the model registry through
``tasks.io.model_store.register`` (alias ``@latest-adapter``, as condgen's own adapters).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from condgen.tasks.data.splits import dataset_info
from condgen.tasks.io import settings, storage, tracking
from condgen.tasks.io.cluster import ensure_ray
from condgen.tasks.io.model_store import ADAPTER_CONFIG, ADAPTER_WEIGHTS, register
from condgen.tasks.pretrained import base, cache, lora
from condgen.tasks.pretrained.train import train_loop_per_worker
from condgen.tasks.training.driver import ray_storage

CARD_JSON, CARD_MD = "model_card.json", "README.md"


@dataclass
class PretrainedAdaptRequest:
    """One fine-tune. ``batch_size`` is the global batch (split over ``num_workers``); ``image_size``
    defaults to the shards' size and must be a multiple of the VAE's downsampling factor."""

    base: str
    shards_uri: str
    steps: int = 100
    batch_size: int = 4
    lr: float = 1e-4
    rank: int = 4
    alpha: float | None = None
    train_text_encoder: bool = False
    targets: list[str] | None = None  # U-Net modules (peft names); default lora.UNET_TARGETS
    image_size: int | None = None
    cond_dropout: float = 0.1
    mixed_precision: str = "no"  # "no" | "bf16" (autocast of the U-Net forward)
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0  # 0: no EMA; else the served adapter is the EMA of the LoRA tensors
    max_grad_norm: float = 1.0
    checkpoint_every: int = 50
    validate_every: int = 0
    validation_prompts: list[str] = field(default_factory=list)
    validation_seeds: list[int] = field(default_factory=lambda: [0, 1])
    validation_steps: int = 20
    guidance_scale: float = 7.5  # diffusers' convention: 1 is no guidance
    num_workers: int = 1
    threads_per_worker: int = 1  # torch intra-op threads of each worker process
    use_gpu: bool = False
    seed: int = 0
    register_as: str | None = None
    run_name: str | None = None
    experiment: str = "condgen"
    storage_path: str | None = None
    max_failures: int = 0


@dataclass
class PretrainedAdaptResult:
    run_id: str
    adapter_uri: str
    metrics: dict[str, Any]
    card: dict[str, Any]
    version: str | None


def check(req: PretrainedAdaptRequest) -> None:
    """Option errors, one line each, before anything loads."""
    if req.mixed_precision not in ("no", "bf16"):
        raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {req.mixed_precision!r}")
    if req.steps < 1 or req.batch_size < req.num_workers or req.checkpoint_every < 1:
        raise ValueError("steps and checkpoint_every must be >= 1 and batch_size >= num_workers")
    if not 0 <= req.cond_dropout < 1 or not 0 <= req.ema_decay < 1:
        raise ValueError("cond_dropout and ema_decay must be in [0, 1)")


def model_card(req: PretrainedAdaptRequest, p: base.Pretrained, adapter_cfg: dict[str, Any], *, samples: int,
               digest: str, trained: int, served: int, metrics: dict[str, Any], run_id: str) -> dict[str, Any]:
    """What the adapter is, on what, from what data, for how long, with what result."""
    return {"kind": lora.KIND, "run_id": run_id, "base": req.base, "base_fingerprint": p.fingerprint,
            "base_components": p.fingerprints, "data": {"shards_uri": req.shards_uri, "source_digest": digest,
                                                         "samples": samples, "image_size": adapter_cfg["image_size"]},
            "steps": req.steps, "global_batch": req.batch_size, "lr": req.lr, "rank": adapter_cfg["rank"],
            "alpha": adapter_cfg["alpha"], "targets": adapter_cfg["targets"], "ema_decay": req.ema_decay,
            "mixed_precision": req.mixed_precision, "cond_dropout": req.cond_dropout,
            "trained_parameters": trained, "share_of_unet": trained / served,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}


def card_markdown(card: dict[str, Any]) -> str:
    m = card["metrics"]
    return (f"# LoRA adapter ({card['kind']})\n\n- base: `{card['base']}` (fingerprint `{card['base_fingerprint']}`)\n"
            f"- data: `{card['data']['shards_uri']}`, {card['data']['samples']} samples at "
            f"{card['data']['image_size']} px (digest `{card['data']['source_digest']}`)\n"
            f"- {card['steps']} steps, global batch {card['global_batch']}, lr {card['lr']}, rank {card['rank']}, "
            f"alpha {card['alpha']}, EMA {card['ema_decay']}\n- trained parameters: {card['trained_parameters']} "
            f"({100 * card['share_of_unet']:.3f}% of the U-Net)\n- final loss: {m.get('loss', 'n/a')}\n")


def adapt_pretrained(req: PretrainedAdaptRequest) -> PretrainedAdaptResult:
    """Fine-tune a LoRA adapter on ``req.base`` through Ray Train; returns the run, the adapter URI, its card."""
    check(req)
    tracking.configure(req.experiment)
    p = base.load(req.base)
    info = dataset_info(req.shards_uri)
    factor = 2 ** (len(p.vae.config.block_out_channels) - 1)
    size = int(req.image_size or info["image_size"])
    if size % factor:
        raise ValueError(f"image_size {size} is not a multiple of the VAE's factor {factor}: pass --image-size")
    dtype = "bfloat16" if req.mixed_precision == "bf16" else "float32"
    latents_uri, latents_reused = cache.latents(p, req.shards_uri, size=size, dtype=dtype)
    text_uri, text_reused = cache.text(p, req.shards_uri, dtype=dtype)
    adapter_cfg = {**lora.settings(req.rank, req.alpha, req.train_text_encoder, p, req.targets), "image_size": size}
    served = sum(prm.numel() for prm in p.unet.parameters())
    trained = sum(prm.numel() for prm in lora.inject(p, adapter_cfg))
    samples = int(cache.read(latents_uri)["mean"].shape[0])
    ensure_ray()
    with mlflow.start_run(run_name=req.run_name or "adapter-pretrained") as run:
        run_id = run.info.run_id
        tracking.log_params({**{k: v for k, v in asdict(req).items() if k not in ("validation_prompts",)},
                             "base_fingerprint": p.fingerprint, "image_size": size, "samples": samples,
                             "adapter.trained_parameters": trained, "adapter.share": trained / served,
                             "cache.latents": latents_uri, "cache.latents_reused": latents_reused,
                             "cache.text": text_uri, "cache.text_reused": text_reused})
        mlflow.set_tags({"condgen.kind": "adapter", "condgen.adapter_base": req.base,
                         "condgen.adapter_kind": lora.KIND, "condgen.shards": req.shards_uri})
        loop_config = {**asdict(req), "adapter": adapter_cfg, "image_size": size,
                       "latents_uri": latents_uri, "text_uri": text_uri, "run_id": run_id,
                       "tracking_uri": mlflow.get_tracking_uri()}
        storage_path, storage_fs = ray_storage(req.storage_path or settings.ray_storage())
        trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=req.num_workers, use_gpu=req.use_gpu,
                                         resources_per_worker={"CPU": req.threads_per_worker}),
            run_config=RunConfig(name=f"adapter-pretrained-{run_id[:8]}", storage_path=storage_path,
                                 storage_filesystem=storage_fs, checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 failure_config=FailureConfig(max_failures=req.max_failures)))
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"the fine-tune produced no checkpoint: {result.error}")
        metrics = dict(result.metrics or {})
        card = model_card(req, p, adapter_cfg, samples=samples, digest=cache.source_digest(req.shards_uri),
                          trained=trained, served=served, metrics=metrics, run_id=run_id)
        dest = storage.join(settings.storage_root(), "adapters", run_id)
        with result.checkpoint.as_directory() as d:
            Path(d, CARD_JSON).write_bytes(storage.dumps_json(card))
            Path(d, CARD_MD).write_text(card_markdown(card), encoding="utf-8")
            for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, CARD_JSON, CARD_MD):
                storage.write_bytes(storage.join(dest, name), Path(d, name).read_bytes())
                mlflow.log_artifact(os.path.join(d, name), artifact_path="adapter")
        mlflow.set_tag("condgen.adapter", dest)
        version = None
        if req.register_as:
            tags = {"condgen.kind": "adapter", "condgen.adapter_kind": lora.KIND, "condgen.adapter_base": req.base,
                    "condgen.base_fingerprint": p.fingerprint}
            version = str(register(run_id, req.register_as, tags=tags, artifact_path="adapter"))
            MlflowClient().set_registered_model_alias(req.register_as, "latest-adapter", version)
        return PretrainedAdaptResult(run_id, dest, metrics, card, version)
