"""How good a CLIP is: zero-shot digit accuracy, retrieval recall@1, CLIPScore and the
contrastive loss, on uint8 (N, 28, 28) images and their captions.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from condgen.tasks.clip.handle import ClipHandle, as_float_images
from condgen.tasks.data.attributes import DIGIT_WORDS

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


@torch.no_grad()
def contrastive_loss(handle: ClipHandle, images: np.ndarray, texts: Sequence[str]) -> float:
    """open_clip's ClipLoss of paired (image, text) rows under the current model (eval mode)."""
    handle.model.eval()
    img = handle.image_tower(as_float_images(images))
    txt = handle.text_tower(handle.tokenize(texts))
    return float(open_clip.ClipLoss()(img, txt, handle.model.logit_scale.exp()))


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
