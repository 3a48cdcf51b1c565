"""Promotion of a registered pretrained-pipeline LoRA adapter through condgen's gate.

An adapter is judged like every other model: one evaluation, fixed seeds, the same for the
candidate and the current champion (re-scored now, never trusted from a log), and the gate
of ``tasks.judging.promote`` (``Gate`` + ``decide``) moves the alias ``@champion``.

The evaluation is the denoising loss on held-out captioned images (Ho et al. 2020's simple
loss, the objective the adapter was trained on; SimpleTuner's and diffusers' validation loss):
every image of the ``split`` is encoded (the VAE posterior's mode), noised at timesteps and with
noise drawn from ``seed`` (the same draws for every adapter and for the base), and the U-Net's
eps prediction under the image's caption is scored by MSE. The gate's score is the adapter's
relative improvement over the bare base on those draws, ``1 - loss_adapter / loss_base``: 0 is
the base itself, higher is better, so ``Gate(min_accuracy=0)`` asks an adapter to beat its base
and ``tolerance`` bounds how much worse than the champion's score it may be.

Every decision is tagged on the version (``condgen.promoted``, ``condgen.reason``,
``condgen.adapter_score``, ``condgen.heldout_loss``) and the scores are logged on the adapter's
run (``eval/adapter_score``, ``eval/heldout_loss``, ``eval/base_heldout_loss``).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from condgen.tasks.data.splits import load_split
from condgen.tasks.io.model_store import ALIAS, alias_version, resolve
from condgen.tasks.judging.promote import Gate, Promotion, decide
from condgen.tasks.pretrained import base, cache, lora
from condgen.tasks.pretrained.generate import image_size

ADAPTER_GATE = Gate(min_accuracy=0.0, tolerance=0.0)
SCORE = "adapter score (relative held-out loss improvement over the base)"


def heldout_data(p: base.Pretrained, shards_uri: str, *, split: str = "test", size: int | None = None
                 ) -> dict[str, torch.Tensor]:
    """The split's latents (posterior mode, scaled) and caption hidden states, computed once per evaluation."""
    arrays = load_split(shards_uri, split, keys=("x", "caption"))
    if len(arrays["x"]) == 0:
        raise ValueError(f"{shards_uri} has no {split!r} images to evaluate an adapter on; pass another split")
    x = cache.images(arrays, int(size or image_size(p)))
    return {"z0": base.encode_images(p, x), "cond": base.encode_prompts(p, [str(c) for c in arrays["caption"]])}


@torch.no_grad()
def heldout_loss(p: base.Pretrained, data: dict[str, torch.Tensor], *, seed: int = 0, draws: int = 4) -> float:
    """Mean eps-MSE of the active adapter (or the base) over ``draws`` fixed (t, noise) draws per image."""
    g = torch.Generator().manual_seed(seed)
    S, D = p.schedule, base.denoiser(p)
    z0, cond = data["z0"], data["cond"]
    losses = []
    for _ in range(draws):
        t = torch.randint(0, S.T, (len(z0),), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        losses.append(float(F.mse_loss(D(S.q_sample(z0, t, eps), t, cond), eps)))
    return float(np.mean(losses))


def score_adapters(p: base.Pretrained, uris: dict[str, str], data: dict[str, torch.Tensor], *,
                   seed: int = 0, draws: int = 4) -> dict[str, Any]:
    """{``base``: loss, NAME: {loss, score}} for each adapter URI, all on the same draws of the same images."""
    lora.activate(p, None)
    base_loss = heldout_loss(p, data, seed=seed, draws=draws)
    out: dict[str, Any] = {"base": base_loss}
    for name, uri in uris.items():
        key = f"eval_{len(out)}"
        lora.apply_adapter(p, uri, key)
        loss = heldout_loss(p, data, seed=seed, draws=draws)
        lora.remove(p, key)
        out[name] = {"loss": loss, "score": 1.0 - loss / base_loss if base_loss > 0 else float("nan")}
    lora.activate(p, None)
    return out


def promote_adapter(name: str, version: str, shards_uri: str, *, p: base.Pretrained | None = None,
                    gate: Gate = ADAPTER_GATE, split: str = "test", seed: int = 0, draws: int = 4) -> Promotion:
    """Judge version ``version`` of the registered adapter ``name`` against the base and the current
    ``@champion`` on ``shards_uri``'s held-out ``split``; move ``@champion`` to it when the gate passes."""
    client = MlflowClient()
    candidate = f"models:/{name}/{version}"
    if p is None:
        run = client.get_run(resolve(candidate).run_id)
        p = base.load(run.data.params.get("base") or run.data.tags["condgen.adapter_base"])
    prev = alias_version(name, ALIAS)
    uris = {"candidate": candidate}
    if prev is not None and str(prev) != str(version):
        uris["champion"] = f"models:/{name}/{prev}"
    scores = score_adapters(p, uris, heldout_data(p, shards_uri, split=split), seed=seed, draws=draws)
    cand = scores["candidate"]
    champ = scores["champion"]["score"] if "champion" in scores else None
    ok, reason = decide(cand["score"], champ, gate, metric="score")
    reason = f"{SCORE}: {reason}"
    if ok:
        client.set_registered_model_alias(name, ALIAS, version)
    tags = {"condgen.promoted": str(ok).lower(), "condgen.reason": reason,
            "condgen.adapter_score": f"{cand['score']:.6f}", "condgen.heldout_loss": f"{cand['loss']:.6f}",
            "condgen.base_heldout_loss": f"{scores['base']:.6f}", "condgen.eval_split": split}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    run_id = client.get_model_version(name, version).run_id
    for key, value in (("eval/adapter_score", cand["score"]), ("eval/heldout_loss", cand["loss"]),
                       ("eval/base_heldout_loss", scores["base"])):
        if math.isfinite(value):
            client.log_metric(run_id, key, value)
    client.set_tag(run_id, "condgen.promoted", str(ok).lower())
    client.set_tag(run_id, "condgen.promotion_reason", reason)
    return Promotion(name, str(version), ok, reason, cand["score"], champ, None if prev is None else str(prev))
