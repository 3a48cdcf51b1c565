"""Linear maps between two models' latent spaces: the spaces, support sets, fitting,
scores and the map files. The studies built on them (the map table over support sizes,
interpolation, attribute edits, CLIP-guided optimisation) are ``tasks/judging/latent_studies.py``.

Latent maps follow Asperti & Tonelli 2023 ("Comparing the latent space of generative
models", seed 000). A *support set* of images is located in both spaces: a CVAE locates
an image by its encoder (the posterior mean mu(x, c)), a GAN by inverting its generator
(``models.latent_map.invert_generator``). A bias-free linear map W (z_b ≈ z_a W) is fitted
on the support set, in closed form (ridge least squares) and by gradient descent, and is
scored on held-out images x with label c, embedded in both spaces as z_a(x), z_b(x):

* ``R`` reconstruction error: pixel MSE between x and G_b(z_b(x), c): how well the target
  space itself holds x; the floor for any map;
* ``L`` latent error: MSE per dimension between z_b(x) and z_a(x) W (``L_rel``: the same
  divided by the variance of z_b, so 1 means "no better than the mean latent");
* ``M`` mapped-image error: pixel MSE between x and G_b(z_a(x) W, c);
* ``class_kept``: share of mapped images G_b(z_a(x) W, c) the judge assigns to c.

Pixel MSEs are on the [0, 1] intensity scale. Two baselines keep the figures honest: a
random latent of the target space under the same label (``M_random``, ``class_random``):
with conditional models the label alone already fixes the class, so ``class_kept`` is
only informative next to ``class_random`` and ``M`` next to ``M_random``.

Support modes: ``"real"`` embeds real images in both spaces (a GAN side costs an
inversion per image); ``"generated"`` draws z from one model (a GAN when there is one,
so its z is exact), generates x, and embeds x in the other model (the paper's cheap way
for VAE <-> GAN: no inversion at all when the other side is a CVAE).

A fitted map is saved as ``map.safetensors`` (W) + ``map.json`` (source and target model
URIs and weight fingerprints, fit settings, scores) and logged as an MLflow artifact;
``load_map(uri)`` + ``translate(z, m)`` use it at serving time, and ``check_models`` refuses
a map whose models' weights changed since it was fitted.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file
from torch import nn

from condgen.models import latent_map as lm
from condgen.models.cvae import CVAE
from condgen.models.gan import _ConditionalGAN
from condgen.tasks.io import storage
from condgen.tasks.io.checkpoint import state_fingerprint
from condgen.tasks.io.model_store import load_trained
from condgen.tasks.judging.evaluate import predict

MAP_FORMAT = "condgen-latent-map/1"
MAP_WEIGHTS = "map.safetensors"
MAP_META = "map.json"
SUPPORT_SIZES = (10, 100, 1000)
DECODE_BATCH = 500  # rows per decoder/encoder call when a whole set is processed


# -- a model's latent space ---------------------------------------------------------------------
@dataclass(eq=False)
class LatentSpace:
    """One model's latent space through the operations a map needs: decode and embed."""

    model: nn.Module
    kind: str  # "cvae" | "gan"
    name: str
    uri: str | None = None
    fingerprint: str = ""

    @property
    def latent_dim(self) -> int:
        return int(self.model.config.latent_dim)

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """z (B, d), c (B,) -> (B, C, H, W) in [-1, 1], differentiable in z."""
        if self.kind == "cvae":
            return self.model.decode(z, c)
        return self.model.generate(z, c)

    @torch.no_grad()
    def decode_all(self, z: torch.Tensor, c: torch.Tensor, bs: int = DECODE_BATCH) -> torch.Tensor:
        """:meth:`decode` of a whole set, ``bs`` rows at a time, without gradients."""
        return torch.cat([self.decode(z[i:i + bs], c[i:i + bs]) for i in range(0, len(c), bs)])

    def embed(self, x: torch.Tensor, c: torch.Tensor, *, steps: int = 200, lr: float = 0.05, restarts: int = 1,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Where x lies in this space: (z (B, d), reconstruction MSE in [0, 1] units (B,)).
        CVAE: the posterior mean mu(x, c); GAN: inversion of G by optimisation."""
        if self.kind == "cvae":
            bs = DECODE_BATCH
            with torch.no_grad():
                z = torch.cat([self.model.encode(x[i:i + bs], c[i:i + bs])[0] for i in range(0, len(x), bs)])
            rec = self.decode_all(z, c)
            return z, (rec - x).pow(2).flatten(1).mean(-1) / 4
        z, err = lm.invert_generator(self.model.generate, x, c, steps=steps, lr=lr, generator=generator,
                                     latent_dim=self.latent_dim, restarts=restarts)
        return z, err / 4

    def prior_sample(self, c: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z from the model's prior for conditions c, (B, d) (a CVAE's learned prior included)."""
        with torch.no_grad():
            eps = torch.randn(len(c), self.latent_dim, generator=generator)
            if self.kind == "cvae":
                mu, logvar = self.model.prior(c)
                return mu + eps * (0.5 * logvar).exp()
            return eps

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "uri": self.uri, "fingerprint": self.fingerprint,
                "latent_dim": self.latent_dim}


def space_kind(model: nn.Module) -> str | None:
    """"cvae" | "gan" for models with a latent space this module can map, else None."""

    if isinstance(model, CVAE) and getattr(model.config, "condition", "label") == "label":
        return "cvae"
    if isinstance(model, _ConditionalGAN) and getattr(model.config, "condition", "label") == "label":
        return "gan"
    return None


def latent_space(model: nn.Module, *, name: str | None = None, uri: str | None = None) -> LatentSpace:
    kind = space_kind(model)
    if kind is None:
        raise ValueError(f"{type(model).__name__} (condition={getattr(model.config, 'condition', '?')}) has no "
                         "label-conditioned latent space to map (CVAE and cGAN/AC-GAN with condition='label')")
    model.eval()  # inversion and CLIP optimisation take gradients w.r.t. z only (autograd.grad)
    return LatentSpace(model, kind, name or type(model).__name__.lower(), uri, state_fingerprint(model))


def load_space(checkpoint_uri: str, name: str | None = None) -> LatentSpace:

    model, meta = load_trained(checkpoint_uri)
    return latent_space(model, name=name or meta.get("model"), uri=checkpoint_uri)


# -- support sets ---------------------------------------------------------------------------------
@dataclass
class Support:
    """Images located in two spaces: x (N, 1, H, W), y (N,), z_a (N, d_a), z_b (N, d_b) and each
    space's reconstruction MSE of x (N,) ([0, 1] units; 0 where x was generated from that z)."""

    x: torch.Tensor
    y: torch.Tensor
    z_a: torch.Tensor
    z_b: torch.Tensor
    rec_a: torch.Tensor
    rec_b: torch.Tensor
    mode: str

    def __len__(self) -> int:
        return len(self.y)

    def take(self, n: int) -> "Support":
        return Support(self.x[:n], self.y[:n], self.z_a[:n], self.z_b[:n], self.rec_a[:n], self.rec_b[:n], self.mode)

    def swap(self) -> "Support":
        return Support(self.x, self.y, self.z_b, self.z_a, self.rec_b, self.rec_a, self.mode)


def build_support(a: LatentSpace, b: LatentSpace, x: torch.Tensor | None, y: torch.Tensor, *, mode: str = "real",
                  inversion_steps: int = 200, inversion_lr: float = 0.05, restarts: int = 1,
                  seed: int = 0) -> Support:
    """Locate a support set in spaces a and b (see the module doc for ``mode``).

    ``x`` real images in [-1, 1] (``mode="real"``; ignored for ``"generated"``), ``y`` labels.
    """
    g = torch.Generator().manual_seed(seed)
    y = y.long()
    kw = {"steps": inversion_steps, "lr": inversion_lr, "restarts": restarts, "generator": g}
    if mode == "real":
        if x is None:
            raise ValueError("mode='real' needs images x")
        z_a, rec_a = a.embed(x, y, **kw)
        z_b, rec_b = b.embed(x, y, **kw)
        return Support(x, y, z_a, z_b, rec_a, rec_b, mode)
    if mode != "generated":
        raise ValueError(f"mode must be 'real' or 'generated', got {mode!r}")
    # Generate from the side whose embedding would cost an inversion (its z is then exact).
    flip = a.kind == "cvae" and b.kind == "gan"
    src, dst = (b, a) if flip else (a, b)
    z_src = src.prior_sample(y, generator=g)
    x_gen = src.decode_all(z_src, y)
    z_dst, rec_dst = dst.embed(x_gen, y, **kw)
    zero = torch.zeros(len(y))
    if flip:
        return Support(x_gen, y, z_dst, z_src, rec_dst, zero, mode)
    return Support(x_gen, y, z_src, z_dst, zero, rec_dst, mode)


# -- maps ----------------------------------------------------------------------------------------
@dataclass
class LatentMap:
    """W (d_a, d_b): z_b ≈ z_a W, with where it came from."""

    W: torch.Tensor
    source: dict[str, Any]
    target: dict[str, Any]
    method: str  # "lstsq" | "gd"
    support_size: int
    support_mode: str
    fit: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def meta(self) -> dict[str, Any]:
        return {"format": MAP_FORMAT, "source": self.source, "target": self.target, "method": self.method,
                "support_size": self.support_size, "support_mode": self.support_mode, "fit": self.fit,
                "metrics": self.metrics, "shape": list(self.W.shape)}


def fit_map(support: Support, a: LatentSpace, b: LatentSpace, method: str = "lstsq", *, ridge: float = 1.0,
            gd_steps: int = 2000, gd_lr: float = 1e-2, gd_weight_decay: float = 1e-3, seed: int = 0) -> LatentMap:
    """Fit a -> b on the support set with the closed form (``"lstsq"``) or gradient descent (``"gd"``)."""
    if method == "lstsq":
        w = lm.fit_linear_map(support.z_a, support.z_b, ridge=ridge)
        fit = {"ridge": ridge}
    elif method == "gd":
        w = lm.fit_linear_map_gd(support.z_a, support.z_b, steps=gd_steps, lr=gd_lr, weight_decay=gd_weight_decay,
                                 generator=torch.Generator().manual_seed(seed))
        fit = {"steps": gd_steps, "lr": gd_lr, "weight_decay": gd_weight_decay, "seed": seed}
    else:
        raise ValueError(f"method must be 'lstsq' or 'gd', got {method!r}")
    return LatentMap(w, a.describe(), b.describe(), method, len(support), support.mode, fit)


def translate(z: torch.Tensor | np.ndarray, m: LatentMap) -> torch.Tensor:
    """Latents of the source space (N, d_a) -> the target space (N, d_b)."""
    z = torch.as_tensor(np.asarray(z) if not torch.is_tensor(z) else z, dtype=torch.float32)
    if z.ndim == 1:
        z = z[None]
    if z.shape[-1] != m.W.shape[0]:
        raise ValueError(f"map expects {m.W.shape[0]}-d source latents, got {z.shape[-1]}")
    return lm.apply_map(z, m.W)


def check_models(m: LatentMap, source: nn.Module, target: nn.Module) -> None:
    """Refuse a map fitted for other weights than the models it is about to connect."""
    for role, model, want in (("source", source, m.source), ("target", target, m.target)):
        have = state_fingerprint(model)
        if want.get("fingerprint") and have != want["fingerprint"]:
            raise ValueError(f"latent map {role} was fitted on weights {want['fingerprint'][:12]} "
                             f"({want.get('uri')}), not {have[:12]}")


def save_map(m: LatentMap, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"W": m.W.detach().float().contiguous()}, str(directory / MAP_WEIGHTS))
    (directory / MAP_META).write_text(json.dumps(m.meta(), indent=2, sort_keys=True, default=float))
    return directory


def _map_from_dir(directory: str | Path) -> LatentMap:
    meta = json.loads(Path(directory, MAP_META).read_text())
    if meta.get("format") != MAP_FORMAT:
        raise ValueError(f"{directory} is not a {MAP_FORMAT} map (format={meta.get('format')!r})")
    w = load_file(str(Path(directory, MAP_WEIGHTS)))["W"]
    return LatentMap(w, meta["source"], meta["target"], meta["method"], meta["support_size"],
                     meta["support_mode"], meta.get("fit", {}), meta.get("metrics", {}))


def load_map(uri: str) -> LatentMap:
    """A map from a folder: local path, ``file://``, ``s3://`` or an MLflow artifact URI
    (``runs:/<run_id>/<path>``, ``mlflow-artifacts:/…``). Reads JSON + safetensors only."""
    if uri.startswith(("runs:/", "mlflow-artifacts:", "models:/")):
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
            return _map_from_dir(local)
    with tempfile.TemporaryDirectory() as tmp:
        for name in (MAP_WEIGHTS, MAP_META):
            Path(tmp, name).write_bytes(storage.read_bytes(storage.join(uri, name)))
        return _map_from_dir(tmp)


def log_map(m: LatentMap, run_id: str, artifact_path: str) -> str:
    """Log a map to an MLflow run; returns its ``runs:/`` URI (what ``load_map`` takes)."""

    with tempfile.TemporaryDirectory() as tmp:
        save_map(m, tmp)
        MlflowClient().log_artifacts(run_id, tmp, artifact_path)
    return f"runs:/{run_id}/{artifact_path}"


# -- scores ----------------------------------------------------------------------------------------
@torch.no_grad()
def map_errors(m: LatentMap, b: LatentSpace, test: Support, judge=None, *, seed: int = 0) -> dict[str, float]:
    """R, L, L_rel, M (+ class_kept and the random-latent baselines when a judge is given) on a
    held-out support set located in a (``z_a``) and b (``z_b``)."""

    z_hat = translate(test.z_a, m)  # (N, d_b)
    x_map = b.decode_all(z_hat, test.y)
    z_rand = b.prior_sample(test.y, generator=torch.Generator().manual_seed(seed))
    x_rand = b.decode_all(z_rand, test.y)
    var_b = test.z_b.var(0).mean().clamp_min(1e-12)
    out = {
        "R": float(test.rec_b.mean()),
        "L": float((test.z_b - z_hat).pow(2).mean()),
        "L_rel": float((test.z_b - z_hat).pow(2).mean() / var_b),
        "M": float((x_map - test.x).pow(2).mean() / 4),
        "M_random": float((x_rand - test.x).pow(2).mean() / 4),
    }
    if judge is not None:
        model = getattr(judge, "model", judge)
        p_map, _ = predict(model, x_map)
        p_rand, _ = predict(model, x_rand)
        out["class_kept"] = float((p_map.argmax(-1) == test.y).float().mean())
        out["class_random"] = float((p_rand.argmax(-1) == test.y).float().mean())
    return out
