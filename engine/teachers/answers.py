"""Answers: split a response at the answer marker, and normalise answers for comparison.

The teacher often wraps a one-word answer in a sentence ("The sentiment is positive."),
so comparison maps an answer onto the label set when exactly one label occurs in it.
"""

from __future__ import annotations

import re
import unicodedata

_PUNCT = re.compile(r"[^\w\s]")


def split_answer(response: str, marker: str | None) -> tuple[str, str]:
    """(reasoning, answer): text before and after the last answer marker.

    Without a marker, or when the response has none, the whole response is the answer.
    """
    if marker and marker in response:
        reasoning, _, answer = response.rpartition(marker)
        return reasoning.strip(), answer.strip()
    return "", response.strip()


def normalise_text(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_PUNCT.sub(" ", text).split())


def normalise_answer(answer: str, labels: set[str] | frozenset[str] = frozenset()) -> str:
    """Lower-cased, punctuation-free answer; the one label it mentions, when exactly one."""
    text = normalise_text(answer)
    if labels:
        words = f" {text} "
        found = {normalise_text(label) for label in labels if f" {normalise_text(label)} " in words}
        if len(found) == 1:
            return found.pop()
    return text
