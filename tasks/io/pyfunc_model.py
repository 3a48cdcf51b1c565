"""condgen checkpoints as MLflow **pyfunc** models, so that plain MLflow loads a registered version:

    import mlflow, pandas as pd
    model = mlflow.pyfunc.load_model("models:/condgen-cvae@champion")
    images = model.predict(pd.DataFrame([{"condition": 7, "n": 4, "seed": 0}]))   # (4, H, W, C) uint8

How it is stored (``log_pyfunc``): a run's ``model/`` folder already holds ``model.safetensors`` +
``config.json`` (``tasks/io/checkpoint.py``); the pyfunc files are written *beside* them (``MLmodel``,
the entry file, the environment files, an input example), so the weights exist once and condgen's
own loader keeps reading the same folder. The model is "models from code" (MLflow >= 2.12): the
entry file ``condgen_pyfunc.py`` imports :class:`CondgenModel` from the installed condgen package
and hands MLflow an instance built on the folder it sits in. Nothing is pickled (MLflow 3 refuses
to unpickle a cloudpickled model by default), and loading parses safetensors and JSON only.

Input (a ``pandas.DataFrame``, a dict or a list of dicts; one row = one request; every column but ``condition`` optional;
an integer column (``n``, ``seed``, ``steps``) is given for every row of a DataFrame or for none):

| column     | type   | meaning                                                                      |
|------------|--------|------------------------------------------------------------------------------|
| `condition`| int or str | the class to draw, or a caption naming it: "a small red circle" when the |
|            |        | training set names its classes (``class_names.json``), "a seven" for digits |
| `n`        | int    | images for this row (default 1, at most ``MAX_N``)                           |
| `seed`     | int    | the seed of this row's noise (default 0): same row, same images              |
| `guidance` | float  | classifier-free guidance weight w (diffusion; default: the model's)          |
| `steps`    | int    | DDIM steps (diffusion; default: the model's ``sample_steps``)                |

Output: one ``numpy.uint8`` array ``(sum of n, H, W, C)`` (C = 1 greyscale, 3 RGB), the rows' images in
order; ``condgen.tasks.io.images.png_bytes(img[..., 0] if C == 1 else img)`` makes a PNG of one.

Sampling is the models' own ``sample(cond, generator)`` contract (``models/base.py``), with a CPU
generator seeded per row; for a diffusion model that is ``ConditionalDiffusion.sample`` (DDIM +
CFG), which the service's batched path equals (``tasks/generation/batching.py``).
Text-conditioned models need a CLIP text encoder, which this model does not carry: they are served by
``condgen serve --clip`` and their pyfunc ``predict`` says so in one line.
"""
from __future__ import annotations

import json
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types.schema import AnyType, ColSpec, Schema, TensorSpec

from condgen.models.diffusion.ddpm import ConditionalDiffusion
from condgen.tasks.io import checkpoint as ckpt_io
from condgen.tasks.io.labels import label_from_text
from condgen.tasks.io.model_store import load_trained
from condgen.tasks.io.tracking import run_shard_set

ENTRY = "condgen_pyfunc.py"
MAX_N = 256
# the families whose sample(cond, generator) needs nothing but a label or text row (not image-to-image
# translators, ControlNet's hint or a component)
SAMPLED = ("cvae", "cgan", "acgan", "diffusion", "latent_diffusion")
ENTRY_CODE = '''"""condgen's MLflow pyfunc entry point (models from code): the checkpoint is the folder of this file.
See condgen.tasks.io.pyfunc_model for the input and output."""
from pathlib import Path

import mlflow

from condgen.tasks.io.pyfunc_model import CondgenModel

mlflow.models.set_model(CondgenModel(Path(__file__).resolve().parent))
'''
# ``condition`` takes an int label or a caption (MLflow's Any type); the integers are longs, so a column
# must be given for every row or for none in one DataFrame (an integer column cannot hold a missing value).
INPUT_SCHEMA = Schema([
    ColSpec(AnyType(), "condition"),
    ColSpec("long", "n", required=False),
    ColSpec("long", "seed", required=False),
    ColSpec("double", "guidance", required=False),
    ColSpec("long", "steps", required=False),
])
CLASSES_FILE = "class_names.json"  # the training set's class names, beside the pyfunc files (when it names them)


def _records(model_input: Any) -> list[dict[str, Any]]:
    """DataFrame / dict / list of dicts -> one dict per request, missing values dropped."""
    if isinstance(model_input, pd.DataFrame):
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, dict):
        rows = [model_input]
    else:
        rows = list(model_input)
    return [{k: v for k, v in r.items() if v is not None and not (isinstance(v, float) and np.isnan(v))}
            for r in rows]


def _whole(row: dict[str, Any], key: str, default: int | None) -> int | None:
    """``row[key]`` as an int (a whole number, also when it came as a float), or ``default``."""
    if key not in row:
        return default
    value = float(row[key])
    if not value.is_integer():
        raise ValueError(f"{key} must be a whole number, got {row[key]!r}")
    return int(value)


def channels_last(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8 (C kept, also for greyscale)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


class CondgenModel(mlflow.pyfunc.PythonModel):
    """A condgen generator behind MLflow's pyfunc interface (the module docstring has the input/output)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else None
        self.model: torch.nn.Module | None = None
        self.meta: dict[str, Any] = {}
        self.class_names: list[str] | None = None

    def load_context(self, context) -> None:
        """Load ``model.safetensors`` + ``config.json`` from the model folder with condgen's loader."""
        root = self.root or Path(context.artifacts["checkpoint"])
        self.model, self.meta = load_trained(root.as_uri())
        self.model.eval()
        names = root / CLASSES_FILE
        self.class_names = [str(n) for n in json.loads(names.read_text())] if names.is_file() else None

    def _condition(self, row: dict[str, Any], n: int) -> torch.Tensor:
        conf = self.model.config
        if getattr(conf, "condition", "label") != "label":
            raise ValueError(f"{self.meta.get('model')} is text-conditioned: it needs a CLIP text encoder; "
                             "serve it with `condgen serve --clip …` and send the caption there")
        num_classes = int(getattr(conf, "num_classes", 10))
        condition = row.get("condition")
        if isinstance(condition, str):
            label = label_from_text(condition, num_classes, self.class_names)
            if label is None:
                named = (f"none of the classes ({', '.join(self.class_names[:6])}{', ...' * (len(self.class_names) > 6)})"
                         if self.class_names else f"no class in [0, {num_classes - 1}]")
                raise ValueError(f"caption {condition[:60]!r} names {named}; give a label or a caption naming one")
        else:
            label = _whole(row, "condition", None)
        if label is None or not 0 <= label < num_classes:
            raise ValueError(f"condition must be a label in [0, {num_classes - 1}] or a caption naming one, "
                             f"got {str(condition)[:60]!r}")
        return torch.full((n,), label, dtype=torch.long)

    @torch.no_grad()
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        """Images for every request row, (sum n, H, W, C) uint8, seeded per row."""
        if self.model is None:
            self.load_context(context)
        out = []
        for row in _records(model_input):
            n = _whole(row, "n", 1)
            if not 1 <= n <= MAX_N:
                raise ValueError(f"n must be in [1, {MAX_N}], got {n}")
            cond = self._condition(row, n)
            gen = torch.Generator(device="cpu").manual_seed(_whole(row, "seed", 0))
            if isinstance(self.model, ConditionalDiffusion):
                steps = _whole(row, "steps", None)
                w = float(row["guidance"]) if "guidance" in row else None
                x = self.model.sample(cond, gen, steps=steps, guidance_scale=w)
            else:
                x = self.model.sample(cond, generator=gen)
            out.append(channels_last(x))
        return np.concatenate(out)


def supports(meta: dict[str, Any]) -> bool:
    """Whether a checkpoint is a generator the pyfunc samples from a condition alone (``SAMPLED``)."""
    return meta.get("model") in SAMPLED


def input_example(meta: dict[str, Any], class_names: list[str] | None = None) -> pd.DataFrame:
    """Two requests, a label and (for a label model) a caption, with every column filled in."""
    conf = meta.get("config", {})
    caption = f"a {class_names[min(3, len(class_names) - 1)]}" if class_names else "a handwritten three"
    rows = [{"condition": 1, "n": 2, "seed": 0}, {"condition": caption, "n": 1, "seed": 1}]
    if conf.get("condition", "label") != "label":
        rows[1]["condition"] = 3
    if meta.get("model") in ("diffusion", "latent_diffusion"):
        for r in rows:
            r.update(guidance=float(conf.get("guidance_scale", 1.0)), steps=int(conf.get("sample_steps", 10)))
    return pd.DataFrame(rows)


def requirements() -> list[str]:
    """What a fresh environment needs (MLflow adds itself): condgen and the versions it was logged with."""
    out = []
    for dist in ("condgen", "torch", "safetensors", "numpy", "pandas"):
        try:
            out.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
        except metadata.PackageNotFoundError:
            out.append(dist)
    return out


def log_pyfunc(run_id: str, artifact_path: str = "model") -> bool:
    """Make the run's checkpoint folder ``artifact_path`` a pyfunc model (signature, input example,
    requirements); the weights are not copied. Returns False (and writes nothing) for a checkpoint
    the pyfunc cannot sample (a component, an image-conditioned translator)."""
    client = mlflow.tracking.MlflowClient()
    with tempfile.TemporaryDirectory(prefix="condgen-pyfunc-") as tmp:
        ckpt = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=tmp))
        meta = ckpt_io.read_meta(ckpt)
        if not supports(meta):
            return False
        (ckpt / ENTRY).write_text(ENTRY_CODE)
        names = training_class_names(client, run_id)
        if names:
            (ckpt / CLASSES_FILE).write_text(json.dumps(names))
        example = input_example(meta, names)
        wrapper = CondgenModel(ckpt)
        if meta["config"].get("condition", "label") == "label":
            output = wrapper.predict(None, example)
        else:  # no CLIP here: the output's shape from one step on an all-zero text row
            wrapper.load_context(None)
            text = torch.zeros(1, int(wrapper.model.config.text_dim))
            output = channels_last(wrapper.model.sample(text, torch.Generator().manual_seed(0), steps=1))
        signature = ModelSignature(inputs=INPUT_SCHEMA, outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *output.shape[1:]))]))
        out = Path(tmp, "pyfunc")
        mlflow.pyfunc.save_model(str(out), python_model=str(ckpt / ENTRY), signature=signature,
                                 input_example=example, pip_requirements=requirements())
        if names:
            (out / CLASSES_FILE).write_text(json.dumps(names))
        client.log_artifacts(run_id, str(out), artifact_path)
    return True


def training_class_names(client: mlflow.tracking.MlflowClient, run_id: str) -> list[str] | None:
    """The class names of the shard set the run trained on (its ``condgen.shards`` tag), or None: a digit
    set, a run without the tag, or a manifest that cannot be read (then captions name digits)."""
    try:
        found = run_shard_set(run_id, client)
    except Exception:  # noqa: BLE001 - the names are a convenience; a missing manifest keeps the digit rule
        return None
    names = found[1].get("class_names") if found else None
    return [str(n) for n in names] if names else None

