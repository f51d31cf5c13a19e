"""How answers are compared as text: NFKC, lower-cased, punctuation dropped, whitespace collapsed.

A leaf (imports nothing of ours): the spec checks its answer sets with it and the answer parsing
compares with it, so the two can never drift apart."""

from __future__ import annotations

import re
import unicodedata

_PUNCT = re.compile(r"[^\w\s]")


def normalise_text(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_PUNCT.sub(" ", text).split())
