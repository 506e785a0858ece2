"""Text utilities shared by training data, evaluation and the demo: whole-word matching, putting the identifier
into captions, and the naming metrics (recall, precision, F1 of the identifier as a whole word)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass


def word_pattern(word: str) -> re.Pattern:
    """`word` as a whole word: "Max" matches in "Max is" but not in "Maxine"."""
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)")


def with_identifier(caption: str, name: str, identifier: str, *, person: bool = False) -> str:
    """Put the identifier where the caption names the concept (for people also the title-cased name)."""
    names = {name, name.title()} if person else {name}
    for word in sorted(names, key=len, reverse=True):
        if word != identifier:
            caption = word_pattern(word).sub(identifier, caption)
    return caption


def name_class_word(caption: str, class_word: str, identifier: str) -> str:
    """Replace the first 'a/the <adjectives> <class word>' phrase of a base caption by the identifier ("" if none)."""
    pattern = rf"\b(?:a|an|the)\s+(?:[\w-]+\s+){{0,3}}?{re.escape(class_word)}s?\b"
    named, count = re.subn(pattern, identifier, caption, count=1, flags=re.IGNORECASE)
    if not count:
        named, count = re.subn(rf"\b{re.escape(class_word)}\b", identifier, caption, count=1, flags=re.IGNORECASE)
    return named if count else ""


@dataclass(frozen=True)
class NamingMetrics:
    """How exactly captions name a concept: recall over its photos, precision over the captions that name it."""

    recall: float
    precision: float
    f1: float


def naming_metrics(texts: Sequence[str], identifier: str, is_positive: Sequence[bool]) -> NamingMetrics:
    """Recall, precision and F1 of `identifier` as a whole word in `texts`, against which photos show the concept."""
    pattern = word_pattern(identifier)
    named = [pattern.search(text) is not None for text in texts]
    n_positive = sum(is_positive)
    hits = sum(n and p for n, p in zip(named, is_positive, strict=True))
    recall = hits / n_positive if n_positive else 0.0
    precision = hits / sum(named) if any(named) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return NamingMetrics(recall, precision, f1)
