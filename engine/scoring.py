"""Answers against gold: accuracy with its 95% Wilson interval, the majority-class baseline, per-category
figures and the confusion of one model on one set (engine.train.evaluate scores teacher and students
with it), and the teacher's accuracy against gold at curation time (teacher_gold), so a teacher prompt
that makes the teacher answer wrongly shows before anyone trains.

Light on purpose (numpy, no torch): `syllabus run` and `show` use it.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from engine.teachers.answers import normalise_answer, normalise_text

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile
NO_ANSWER = "no answer"  # a reply that names none of the set's labels
ONE_ANSWER_SHARE = 0.9  # a model giving one answer to at least this share of rows is flagged
GOLD = "teacher_gold"  # the key of a version's lineage stats holding teacher_gold()
GOLD_WARN = 0.5  # the teacher matching gold on fewer rows than this share (or than the majority class) is warned of


def wilson(k: int, n: int, z: float = Z95) -> list[float] | None:
    """The Wilson score interval [low, high] for k successes in n trials (None when n is 0)."""
    if n <= 0:
        return None
    p = k / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return [max(0.0, centre - half), min(1.0, centre + half)]




def accuracy(answers: list[str], gold: list[str | None], labels: set[str]) -> float | None:
    """Share of labelled rows whose normalised answer is the normalised gold label."""
    pairs = [(a, g) for a, g in zip(answers, gold) if g is not None]
    if not pairs:
        return None
    return float(np.mean([a == normalise_answer(g, labels) for a, g in pairs]))


def majority_baseline(gold: list[str | None], labels: set[str]) -> dict | None:
    """The most frequent gold label (ties: the first in sorted order) and its share of the labelled rows."""
    normalised = [normalise_answer(g, labels) for g in gold if g is not None]
    if not normalised:
        return None
    counts = Counter(normalised)
    label, k = min(counts.items(), key=lambda item: (-item[1], item[0]))
    return {"label": label, "n": len(normalised), "correct": k, "accuracy": k / len(normalised),
            "ci": wilson(k, len(normalised))}


def shown_answer(answer: str, label_set: set[str]) -> str:
    """An answer as the confusion table counts it: one of the labels, or NO_ANSWER."""
    if not label_set:
        return answer or NO_ANSWER  # no gold labels at all: free answers count as they are
    return answer if answer in label_set else NO_ANSWER


def score(answers: list[str], gold: list[str | None], categories: list[str | None], labels: set[str],
          reference: list[str] | None = None) -> dict:
    """Every figure of one model on one set, from its normalised answers.

    reference: the teacher's normalised answers on the same rows (agreement); None for the teacher.
    """
    label_set = {normalise_text(label) for label in labels}
    golds = [None if g is None else normalise_answer(g, labels) for g in gold]
    labelled = [i for i, g in enumerate(golds) if g is not None]
    correct = [answers[i] == golds[i] for i in labelled]
    k, n = sum(correct), len(labelled)

    per_category: dict[str, dict] = {}
    for i, right in zip(labelled, correct):
        name = categories[i] if categories[i] is not None else "(none)"
        entry = per_category.setdefault(name, {"n": 0, "correct": 0})
        entry["n"] += 1
        entry["correct"] += int(right)
    for entry in per_category.values():
        entry["accuracy"] = entry["correct"] / entry["n"]
        entry["ci"] = wilson(entry["correct"], entry["n"])

    confusion: dict[str, dict[str, int]] = {}
    for i in labelled:
        row = confusion.setdefault(golds[i], {})
        shown = shown_answer(answers[i], label_set)
        row[shown] = row.get(shown, 0) + 1
    shown_all = Counter(shown_answer(a, label_set) for a in answers)
    top, top_n = min(shown_all.items(), key=lambda item: (-item[1], item[0])) if answers else (None, 0)
    share = top_n / len(answers) if answers else None
    result = {
        "n": n,
        "correct": k,
        "accuracy": k / n if n else None,
        "accuracy_ci": wilson(k, n),
        "per_category": dict(sorted(per_category.items())),
        "confusion": {g: dict(sorted(row.items())) for g, row in sorted(confusion.items())},
        "answers": dict(sorted(shown_all.items(), key=lambda item: (-item[1], item[0]))),
        "top_answer": {"answer": top, "share": share, "count": top_n},
        "one_answer": bool(share is not None and len(answers) > 1 and share >= ONE_ANSWER_SHARE),
        "correct_rows": correct,  # per labelled row: retention's bootstrap; saved as eval's correct_by_row
    }
    if reference is not None:
        same = sum(a == t for a, t in zip(answers, reference))
        result.update(agreement=same / len(answers) if answers else None, agreement_n=len(answers),
                      agreement_ci=wilson(same, len(answers)))
    else:
        result.update(agreement=1.0, agreement_n=len(answers), agreement_ci=None)
    return result




# --- the teacher against gold, at curation time ------------------------------------------


def teacher_gold(rows, teacher_field: str = "teacher.prompt") -> dict | None:
    """The teacher's answers against the sources' gold labels over the rows it answered (polars frame with
    `answer`, `label` and, where there is one, `category`); None when no row carries a label.

    Answers are matched as eval matches them (engine.train.evaluate): normalised, and mapped onto the one
    label they name. `warning` is one line when the teacher matches gold on fewer than GOLD_WARN of the
    rows, or on no more than the majority class's share (with two labels or more): the prompt is then
    likely wrong for this teacher, and students would learn its mistakes.
    """
    if "label" not in rows.columns or "answer" not in rows.columns:
        return None
    labelled = rows.filter(rows["label"].is_not_null())
    if not labelled.height:
        return None
    gold = labelled["label"].to_list()
    labels = set(gold)
    answers = [normalise_answer(a or "", labels) for a in labelled["answer"].to_list()]
    categories = labelled["category"].to_list() if "category" in labelled.columns else [None] * labelled.height
    scores = score(answers, gold, categories, labels)
    baseline = majority_baseline(gold, labels)
    found = {key: scores[key] for key in ("n", "correct", "accuracy", "accuracy_ci", "per_category", "top_answer")}
    found.update(rows=rows.height, labels=len(labels), baseline=baseline, warning=None)
    accuracy_ = scores["accuracy"]
    below_majority = len(labels) > 1 and accuracy_ <= baseline["accuracy"]
    if accuracy_ < GOLD_WARN or below_majority:
        top = scores["top_answer"]
        said = (f"; its most frequent answer is {top['answer']!r} ({top['share']:.0%})"
                if top["answer"] is not None and top["share"] >= 0.5 else "")
        found["warning"] = (f"teacher answers match gold on {accuracy_:.0%} of rows (n={scores['n']}; majority class "
                            f"{baseline['label']!r} {baseline['accuracy']:.0%}){said}: check {teacher_field}")
    return found


def gold_lines(gold: dict) -> list[str]:
    """The teacher against gold in a few lines: overall, then per category (n)."""
    def share(entry: dict) -> str:
        ci = entry.get("ci") or entry.get("accuracy_ci")
        interval = f" [{100 * ci[0]:.0f}–{100 * ci[1]:.0f}]" if ci else ""
        return f"{100 * entry['accuracy']:.1f}%{interval}"

    base = gold.get("baseline") or {}
    lines = [f"teacher vs gold: {share(gold)} of {gold['n']} labelled rows"
             + (f" (majority class {base['label']!r} {100 * base['accuracy']:.1f}%)" if base else "")]
    per = gold.get("per_category") or {}
    if len(per) > 1:
        lines.append("  per category: " + "; ".join(f"{name} {share(entry)} ({entry['n']})"
                                                    for name, entry in per.items()))
    return lines
