"""A model config fitted to its data: channels, image size and classes come from the shard manifest.

A spec never repeats what the data already says. ``fit_to_data(model, config, info)`` takes a spec's
config dict and the shard set's ``tasks.data.splits.dataset_info`` and returns the config to build:

* ``in_channels``, ``image_size`` and ``num_classes``, in every family whose config has the field, are
  taken from the data (``channels``, ``image_size``, ``num_classes``) when the spec leaves them out; a
  spec that sets one to another value than the data's is an error (raised before Ray starts).
* A frozen part's architecture (latent diffusion's ``autoencoder``, a ControlNet's ``base``, a
  super-resolution stage's ``base_config``) is read from the checkpoint its ``*_uri`` names when the spec
  leaves it out (``tasks.data.latents.checkpoint_meta``: config.json only), otherwise fitted like a top
  level config; either way it must agree with the data: the autoencoder and the ControlNet base in
  channels and size (the ControlNet base in classes too), a cascade's base in channels and classes (its
  size may be lower: ``superres`` resizes its sample).
* A super-resolution stage without ``low_size`` gets half its image size (14 for 28 px digits, its default).

For MNIST (greyscale, 28 px, 10 classes) every filled value equals the dataclass default, so a spec
gives exactly the config it gave before. A manifest that does not know a value (0) fills nothing.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from condgen.models.registry import config_class
from condgen.tasks.data.latents import checkpoint_meta

# config field -> dataset_info key
DATA_FIELDS = {"in_channels": "channels", "image_size": "image_size", "num_classes": "num_classes"}

# family -> (URI field, nested config field, registry name of the part or None = the checkpoint says,
#            data fields the part must share with the data)
FROZEN_PARTS: dict[str, tuple[str, str, str | None, tuple[str, ...]]] = {
    "latent_diffusion": ("autoencoder_uri", "autoencoder", "autoencoder", ("in_channels", "image_size")),
    "controlnet": ("base_uri", "base", "diffusion", ("in_channels", "image_size", "num_classes")),
    "superres": ("base_uri", "base_config", None, ("in_channels", "num_classes")),
}


def data_values(info: dict[str, Any]) -> dict[str, int]:
    """The config values a shard set fixes: {field: value} for the fields its manifest knows (> 0)."""
    return {field: int(info[key]) for field, key in DATA_FIELDS.items() if int(info.get(key) or 0) > 0}


def fit_to_data(model: str, config: dict[str, Any], info: dict[str, Any], *, where: str = "the data",
                read_meta: Callable[[str], dict[str, Any]] = checkpoint_meta) -> dict[str, Any]:
    """``config`` (a spec's JSON-like dict for registry name ``model``) with the data's channels, size and
    classes filled in and checked, frozen parts' architectures included (module docstring). ``where`` names
    the data in error messages. ValueError on a disagreement."""
    values = data_values(info)
    out = _fill(model, config, values, where, fields=tuple(DATA_FIELDS))
    if model == "superres" and "low_size" not in config and "image_size" in out:
        out["low_size"] = out["image_size"] // 2  # only set when the data's size is not the default 28
    if model in FROZEN_PARTS:
        uri_field, nested, part, shared = FROZEN_PARTS[model]
        sub = config.get(nested)
        if sub is None and config.get(uri_field):  # the checkpoint holds the architecture
            meta = read_meta(config[uri_field])
            if part is not None and meta.get("model") != part:
                raise ValueError(f"{config[uri_field]} holds a {meta.get('model')!r} checkpoint, expected {part!r}")
            sub = meta["config"]
            if model == "superres":
                out.setdefault("base_model", meta["model"])
            _check(f"{model}'s {nested} ({config[uri_field]})", sub, values, where, shared)
            out[nested] = sub
        elif part or out.get("base_model"):  # given, or built untrained from the defaults: fit it like the top
            filled = _fill(part or out["base_model"], dict(sub or {}), values, where, fields=shared,
                           what=f"{model}'s {nested}")
            if sub is not None or filled:
                out[nested] = filled
    return out


def _fill(model: str, config: dict[str, Any], values: dict[str, int], where: str, fields: tuple[str, ...],
          what: str | None = None) -> dict[str, Any]:
    """Set the ``fields`` the family's config has and ``config`` lacks, where the data's value is not the
    field's default anyway (so a digits spec stays as it was, nested dicts included); check the ones it sets."""
    defaults = {f.name: f.default for f in dataclasses.fields(config_class(model))}
    out = dict(config)
    for field in fields:
        if field in defaults and field in values and field not in out and values[field] != defaults[field]:
            out[field] = values[field]
    _check(what or model, out, values, where, tuple(f for f in fields if f in defaults))
    return out


def _check(what: str, config: dict[str, Any], values: dict[str, int], where: str, fields: tuple[str, ...]) -> None:
    bad = {f: (config[f], values[f]) for f in fields if f in config and f in values and config[f] != values[f]}
    if bad:
        said = ", ".join(f"{f}={mine!r} but the data has {f}={theirs!r}" for f, (mine, theirs) in bad.items())
        raise ValueError(f"{what}: the config sets {said} ({where}, from its manifest); leave these keys out of "
                         "the spec to take the data's values, or train on data of that shape")
