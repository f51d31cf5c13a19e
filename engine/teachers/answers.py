"""Answers: split a response at the answer marker, normalise answers for comparison, and measure how
far several answers to one prompt agree.

The teacher often wraps a one-word answer in a sentence ("The sentiment is positive."),
so comparison maps an answer onto the label set when exactly one label occurs in it.
A response that lacks the answer marker the spec asks for breaks the answer format: its answer
is None (never a guess), and it matches no label and agrees with no other answer.
"""

from __future__ import annotations

from collections import Counter

from engine.text import normalise_text


def split_answer(response: str, marker: str | None) -> tuple[str, str | None]:
    """(reasoning, answer): text before and after the last answer marker.

    Without a marker the whole response is the answer. With one the response lacks, the format
    is broken: the answer is None and the whole response is the reasoning.
    """
    if not marker:
        return "", response.strip()
    if marker not in response:
        return response.strip(), None
    reasoning, _, answer = response.rpartition(marker)
    return reasoning.strip(), answer.strip()


def normalise_answer(answer: str | None, labels: set[str] | frozenset[str] = frozenset()) -> str:
    """Lower-cased, punctuation-free answer; the one label it mentions, when exactly one.

    None (a response without the answer marker) is the empty answer: it names no label."""
    text = normalise_text(answer or "")
    if labels:
        words = f" {text} "
        found = {normalise_text(label) for label in labels if f" {normalise_text(label)} " in words}
        if len(found) == 1:
            return found.pop()
    return text


def self_consistency(answers: list[str | None], labels: set[str] | frozenset[str] = frozenset()) -> float | None:
    """Share of the answers equal (normalised) to the most common one; None for no answers.

    A missing answer (None: the format broke) agrees with nothing, not even another missing one,
    so broken samples lower the share rather than forming a majority of their own.
    """
    if not answers:
        return None
    counts = Counter(normalise_answer(a, labels) for a in answers if a is not None)
    return max(counts.values(), default=0) / len(answers)
